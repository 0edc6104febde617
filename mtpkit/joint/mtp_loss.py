"""The MTP loss of joint training: the head learns from the hidden states of the model's own
training forward pass, added to the main loss as `scaling_factor · mtp_loss`.

By default every path from the MTP loss into the model is cut (`detach`): the trunk's hidden
states, the embedding of the shifted tokens and the shared LM head. The head then learns while
the model's update is exactly what it would be without the head — an MTP gradient flowing into
the trunk inflates grad norms and collapses entropy in RL (veRL, SkyRL). Undetached training is
opt-in and logged.

Loss kinds, as in head training: `ce` (hard labels: the shifted tokens), `kl` (the model's own
detached next-token distribution — soft CE, which differs from KL(p‖q) by the constant H(p) and
has the same gradient; `target: soft_ce` in older configs), `tv` (total variation; 1 − TV is the
expected acceptance of one draft).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from mtpkit.config import checked
from mtpkit.heads import (
    FAMILIES,
    DraftHead,
    HeadError,
    TargetModules,
    build_head,
    head_dir,
    head_family,
    load_head,
    read_head_config,
)
from mtpkit.models import Target
from mtpkit.train.config import LossConfig
from mtpkit.train.losses import LK_ETA, depth_losses, depth_weights

log = logging.getLogger(__name__)

# our name -> train.losses kind
TARGETS = {"ce": "ce", "soft_ce": "kl", "tv": "tv", "lk": "lk", "lk_lambda": "lk_lambda"}
DETACHABLE = ("hidden", "embed", "lm_head")


@dataclass
class MTPLossConfig(LossConfig):
    """The head trainer's loss settings (`kind`: ce | kl | tv | lk | lk_lambda, depth weights,
    chunking) plus what joint training adds: on/off, α and which paths into the model are cut."""

    enabled: bool = True
    scaling_factor: float = checked(
        0.1, ge=0
    )  # veRL's mtp_loss_scaling_factor, Megatron's --mtp-loss-scaling-factor
    detach: list[str] = field(default_factory=lambda: list(DETACHABLE))  # any of hidden, embed, lm_head
    target: str | None = None  # the older name of `kind`: ce | soft_ce (= kl) | tv

    def __post_init__(self):
        if self.target is not None:
            if self.target not in TARGETS:
                raise ValueError(f"mtp.target must be one of {sorted(TARGETS)}, got {self.target!r}")
            self.kind = TARGETS[self.target]
        super().__post_init__()
        unknown = sorted(set(self.detach) - set(DETACHABLE))
        if unknown:
            raise ValueError(f"mtp.detach: unknown entries {unknown}; choose from {list(DETACHABLE)}")
        if self.scaling_factor < 0:
            raise ValueError(f"mtp.scaling_factor must be >= 0, got {self.scaling_factor}")

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # diffusion heads decode through it in eval
        return nn.functional.linear(x, self.weight, self.bias)


def detached_views(head: DraftHead, detach: list[str]) -> TargetModules:
    """The head's borrowed embedding / LM head, as detached views where `detach` asks."""
    embed, lm_head = head.embed_tokens, head.target_lm_head
    return TargetModules(
        _DetachedEmbedding(embed) if "embed" in detach else embed,
        _DetachedLinear(lm_head) if "lm_head" in detach else lm_head,
    )


def check_joint_head(head_type: str) -> None:
    """Refuse up front a head family joint training cannot train, naming those it can."""
    family = head_family(head_type)
    if not family.model.supports_joint:
        supported = sorted(name for name, f in FAMILIES.items() if f.model.supports_joint)
        raise HeadError(
            f"head_type {head_type!r} cannot be trained jointly (it reads target layers other than the "
            f"final hidden state, which the model's training forward does not provide); supported: {supported}"
        )


def mtp_loss(
    head: DraftHead,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    target: str = "ce",
    detach: list[str] | tuple[str, ...] = DETACHABLE,
    weights: list[float] | None = None,
    chunk_size: int = 1024,
    lk_eta: float = LK_ETA,
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
    with head.borrowing(detached_views(head, list(detach))):
        return depth_losses(
            head, ids, hidden, mask.bool(), weights, TARGETS[target], chunk_size, lk_eta=lk_eta
        )


def mtp_loss_from_config(head: DraftHead, hidden, ids, mask, cfg: MTPLossConfig):
    decay = cfg.depth_decay if cfg.depth_decay is not None else head.default_depth_decay
    weights = depth_weights(head.cfg.train_depths, cfg.depth_weights, decay)
    target = {kind: name for name, kind in TARGETS.items()}[cfg.kind]
    return mtp_loss(head, hidden, ids, mask, target, cfg.detach, weights, cfg.chunk_size, cfg.lk_eta)


def joint_head_type(head_type: str, init_head: str | None) -> str:
    """The family a joint recipe will train (`init_head`'s, if given), refused — naming the
    families that work — when joint training cannot train it. Cheap: call it before any work."""
    if init_head:
        head_type = read_head_config(head_dir(init_head))["head_type"]
    check_joint_head(head_type)
    return head_type


def build_joint_head(head_type: str, fields: dict, init_head: str | None, target: Target) -> DraftHead:
    """The head a joint recipe trains: loaded from `init_head` or built fresh."""
    head_type = joint_head_type(head_type, init_head)
    return load_head(head_dir(init_head), target) if init_head else build_head(target, head_type, fields)
