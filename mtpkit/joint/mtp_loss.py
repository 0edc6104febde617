"""The MTP loss of joint training: the head learns from the hidden states of the model's own
training forward pass, added to the main loss as `scaling_factor · mtp_loss`.

By default every path from the MTP loss into the model is cut (`detach`): the trunk's hidden
states, the embedding of the shifted tokens and the shared LM head. The head then learns while
the model's update is exactly what it would be without the head — an MTP gradient flowing into
the trunk inflates grad norms and collapses entropy in RL (veRL, SkyRL). Undetached training is
opt-in and logged.

Targets: `ce` (hard labels: the shifted tokens), `soft_ce` (the model's own detached next-token
distribution; computed as KL(p‖q), which differs from soft CE by the constant H(p) and has the
same gradient), `tv` (total variation; 1 − TV is the expected acceptance of one draft).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from mtpkit.config import check_fields, checked
from mtpkit.train.losses import depth_losses, depth_weights

log = logging.getLogger(__name__)

TARGETS = {"ce": "ce", "soft_ce": "kl", "tv": "tv"}  # our name -> train.losses kind
DETACHABLE = ("hidden", "embed", "lm_head")


@dataclass
class MTPLossConfig:
    enabled: bool = True
    scaling_factor: float = 0.1  # veRL's mtp_loss_scaling_factor, Megatron's --mtp-loss-scaling-factor
    target: str = "ce"  # ce | soft_ce | tv
    detach: list[str] = field(default_factory=lambda: list(DETACHABLE))  # any of hidden, embed, lm_head
    depth_weights: list[float] | None = checked(None, ge=0)
    depth_decay: float = checked(1.0, gt=0)
    chunk_size: int = checked(1024, ge=1)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"mtp.target must be one of {sorted(TARGETS)}, got {self.target!r}")
        unknown = sorted(set(self.detach) - set(DETACHABLE))
        if unknown:
            raise ValueError(f"mtp.detach: unknown entries {unknown}; choose from {list(DETACHABLE)}")
        if self.scaling_factor < 0:
            raise ValueError(f"mtp.scaling_factor must be >= 0, got {self.scaling_factor}")
        check_fields(self)

    @property
    def active(self) -> bool:
        """Whether the MTP loss is computed at all (α = 0 is the same as off)."""
        return self.enabled and self.scaling_factor > 0


def warn_if_undetached(cfg: MTPLossConfig) -> None:
    missing = [d for d in DETACHABLE if d not in cfg.detach]
    if cfg.active and missing:
        log.warning(
            "MTP loss is not detached from %s: its gradient reaches the model and changes the policy "
            "update (reported to inflate grad norms and collapse entropy in RL)",
            ", ".join(missing),
        )


class _DetachedEmbedding(nn.Module):
    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.weight = embed.weight.detach()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class _DetachedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()


@contextlib.contextmanager
def _frozen_views(head, detach: list[str]):
    """Point the head's borrowed embedding / LM head at detached views for one forward."""
    embed, lm_head = head._frozen
    head._frozen = (
        _DetachedEmbedding(embed) if "embed" in detach else embed,
        _DetachedLinear(lm_head) if "lm_head" in detach else lm_head,
    )
    try:
        yield
    finally:
        head._frozen = (embed, lm_head)


def mtp_loss(
    head,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    target: str = "ce",
    detach: list[str] | tuple[str, ...] = DETACHABLE,
    weights: list[float] | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, list[dict]]:
    """Weighted per-depth mean MTP loss (unscaled) of a right-padded batch, and per-depth stats.

    hidden [B, T, H]: the model's final post-norm hidden states from the training forward pass;
    ids [B, T]; mask [B, T] bool: tokens that may serve as labels (padding and prompt are 0). Row
    i of depth k is trained where t_{i+k+1} exists and is masked in. Stats as `train.losses`.
    """
    if target not in TARGETS:
        raise ValueError(f"MTP target must be one of {sorted(TARGETS)}, got {target!r}")
    weights = weights if weights is not None else depth_weights(head.cfg.train_depths)
    if "hidden" in detach:
        hidden = hidden.detach()
    with _frozen_views(head, list(detach)):
        return depth_losses(head, ids, hidden, mask.bool(), weights, TARGETS[target], chunk_size)


def mtp_loss_from_config(head, hidden, ids, mask, cfg: MTPLossConfig):
    weights = depth_weights(head.cfg.train_depths, cfg.depth_weights, cfg.depth_decay)
    return mtp_loss(head, hidden, ids, mask, cfg.target, cfg.detach, weights, cfg.chunk_size)
