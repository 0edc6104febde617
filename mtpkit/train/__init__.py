"""Training: the loop, losses, data sources, checkpoints."""
