"""DeepSeek-V3-style MTP heads: D chained modules, each a decoder layer of the target's family."""

from mtpkit.heads.base import HeadFamily
from mtpkit.heads.mtp.drafter import MTPDrafter
from mtpkit.heads.mtp.model import MTPConfig, MTPHead

FAMILY = HeadFamily(
    name="mtp",
    config=MTPConfig,
    model=MTPHead,
    drafter=MTPDrafter,
    export_formats=("vllm-mtp", "sglang-nextn", "transformers"),
    description="DeepSeek-V3 MTP modules (vLLM method=mtp, SGLang NEXTN)",
)

__all__ = ["FAMILY", "MTPConfig", "MTPDrafter", "MTPHead"]
