"""EAGLE-3 heads: fused low/mid/high target features, one decoder layer, a reduced vocabulary."""

from mtpkit.heads.base import HeadFamily
from mtpkit.heads.eagle3.drafter import Eagle3Drafter
from mtpkit.heads.eagle3.model import Eagle3Config, Eagle3Head, default_layers, ttt_allowed

FAMILY = HeadFamily(
    name="eagle3",
    config=Eagle3Config,
    model=Eagle3Head,
    drafter=Eagle3Drafter,
    export_formats=("vllm-eagle3", "sglang-eagle3", "speculators"),
    description="EAGLE-3 (vLLM / SGLang method eagle3, vllm-project/speculators)",
)

__all__ = ["FAMILY", "Eagle3Config", "Eagle3Drafter", "Eagle3Head", "default_layers", "ttt_allowed"]
