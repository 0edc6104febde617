"""Block-diffusion heads (dMTP): a masked-diffusion denoiser of the next L tokens."""

from mtpkit.heads.base import HeadFamily
from mtpkit.heads.diffusion.drafter import DiffusionDrafter
from mtpkit.heads.diffusion.model import (
    DiffusionConfig,
    DiffusionHead,
    alpha,
    loss_weight,
    sample_masks,
    unmask_counts,
)

FAMILY = HeadFamily(
    name="diffusion",
    config=DiffusionConfig,
    model=DiffusionHead,
    drafter=DiffusionDrafter,
    export_formats=(),  # no serving engine runs block-diffusion drafts yet: native only
    description="block diffusion (mtpkit eval only)",
)

__all__ = [
    "FAMILY",
    "DiffusionConfig",
    "DiffusionDrafter",
    "DiffusionHead",
    "alpha",
    "loss_weight",
    "sample_masks",
    "unmask_counts",
]
