"""Checkpoint conversion: Hugging Face ⇄ Megatron-core per-rank (TP / PP / EP) layouts, LoRA merges.

    layout.py    model shapes, the parallel layout, names and split rules of every tensor
    hf.py        memory-mapped safetensors reading, shard-by-shard writing
    megatron.py  the per-rank directory layout (iter_*/mp_rank_*/model_optim_rng.pt)
    dcp.py       torch.distributed.checkpoint directories (mtpkit's own sharded format)
    lora.py      peft adapters: read, merge, export
    reshard.py   the conversions; command.py the `mtpkit convert` flags

Nothing is imported here, so `mtpkit --help` does not load torch.
"""
