"""Per-depth MTP losses through the frozen LM head, chunked so memory stays bounded.

A 49k-token vocabulary makes logits the largest tensor in head training (8k positions x 49k x
4 bytes = 1.6 GB per depth). Logits are therefore computed for loss-masked rows only, a chunk
at a time, under activation checkpointing: the backward pass recomputes each chunk's logits
instead of keeping them all. Distillation targets come from the target's stored final hidden
states through the same frozen LM head, so no logits are ever stored on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_KINDS = ("ce", "kl", "tv")


def depth_weights(num: int, weights: list[float] | None = None, decay: float = 1.0) -> list[float]:
    """Per-depth loss weights summing to 1: an explicit list, or decay^(k−1) normalised."""
    raw = list(weights) if weights is not None else [decay**k for k in range(num)]
    if len(raw) != num:
        raise ValueError(f"loss.depth_weights has {len(raw)} entries for {num} trained depths")
    if any(w < 0 for w in raw) or sum(raw) <= 0:
        raise ValueError(f"loss.depth_weights must be non-negative with a positive sum, got {raw}")
    total = sum(raw)
    return [w / total for w in raw]


def shifted_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor, depth: int):
    """Labels and validity for depth k (1-based): row i predicts t_{i+k+1}, trained where masked."""
    _B, T = input_ids.shape
    shift = depth + 1
    labels = torch.zeros_like(input_ids)
    valid = torch.zeros_like(loss_mask, dtype=torch.bool)
    if shift < T:
        labels[:, : T - shift] = input_ids[:, shift:]
        valid[:, : T - shift] = loss_mask[:, shift:]
    return labels, valid


def _chunk(hidden, weight, bias, labels, teacher_hidden, kind: str):
    logits = F.linear(hidden, weight, bias).float()
    correct = logits.argmax(-1) == labels
    if kind == "ce":
        return F.cross_entropy(logits, labels, reduction="sum"), correct
    with torch.no_grad():
        p = F.softmax(F.linear(teacher_hidden, weight, bias).float(), dim=-1)
    logq = F.log_softmax(logits, dim=-1)
    if kind == "kl":  # KL(p_target || q_head) = Σ p (log p − log q)
        return F.kl_div(logq, p, reduction="sum"), correct
    # Total variation: 1 − TV is the expected acceptance of one draft under rejection sampling.
    return 0.5 * (p - logq.exp()).abs().sum(), correct


def lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Linear,
    kind: str = "ce",
    teacher_hidden: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss over rows of `hidden` [N, H] and the per-row top-1 hit [N] (bool).

    kind: `ce` against `labels`; `kl` / `tv` against softmax(lm_head(teacher_hidden)).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    if kind != "ce" and teacher_hidden is None:
        raise ValueError(f"loss kind {kind!r} needs the target's hidden states (teacher_hidden)")
    total = hidden.new_zeros((), dtype=torch.float32)
    hits = []
    # At least one (possibly empty) chunk: a rank without labels still backpropagates zeros
    # through the whole head, so its data-parallel gradient collectives match the other ranks'.
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        sl = slice(start, start + chunk_size)
        teacher = teacher_hidden[sl] if teacher_hidden is not None else None
        args = (hidden[sl], lm_head.weight, lm_head.bias, labels[sl], teacher, kind)
        if torch.is_grad_enabled() and hidden.requires_grad:
            loss, hit = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            loss, hit = _chunk(*args)
        total = total + loss
        hits.append(hit)
    hit = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return total, hit
