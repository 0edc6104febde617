"""Checkpoint conversion: Hugging Face ⇄ Megatron-core per-rank (TP / PP / EP) layouts, LoRA merges."""

from mtpkit.convert.layout import ConvertError, Layout, ModelSpec, build_plan, model_spec
from mtpkit.convert.lora import LoraAdapter
from mtpkit.convert.reshard import (
    HFSource,
    MegatronSource,
    hf_to_hf,
    hf_to_sharded,
    inspect_sharded,
    sharded_to_hf,
    sharded_to_sharded,
)

__all__ = [
    "ConvertError",
    "HFSource",
    "Layout",
    "LoraAdapter",
    "MegatronSource",
    "ModelSpec",
    "build_plan",
    "hf_to_hf",
    "hf_to_sharded",
    "inspect_sharded",
    "model_spec",
    "sharded_to_hf",
    "sharded_to_sharded",
]
