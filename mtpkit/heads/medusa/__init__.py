"""Medusa-1 heads: K parallel residual blocks on the final hidden state."""

from mtpkit.heads.base import HeadFamily
from mtpkit.heads.medusa.drafter import MedusaDrafter
from mtpkit.heads.medusa.model import MedusaConfig, MedusaHead

FAMILY = HeadFamily(
    name="medusa",
    config=MedusaConfig,
    model=MedusaHead,
    drafter=MedusaDrafter,
    export_formats=("vllm-medusa",),
    description="Medusa-1 (vLLM <= 0.32 method=medusa)",
)

__all__ = ["FAMILY", "MedusaConfig", "MedusaDrafter", "MedusaHead"]
