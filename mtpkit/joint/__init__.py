"""Joint training of a model and its MTP head: the MTP loss, SFT and RL (GRPO / DAPO)."""
