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

from mtpkit.heads import DraftHead
from mtpkit.heads.common import LinearView

LOSS_KINDS = ("ce", "kl", "tv", "lk", "lk_lambda")
LK_ETA = 3.0  # η of LK^λ: the paper's best setting (speculators' default)
_LK_EPS = 1e-12  # floor of α before the log: an α of exactly 0 (disjoint supports) stays finite


def depth_weights(num: int, weights: list[float] | None = None, decay: float = 1.0) -> list[float]:
    """Per-depth loss weights summing to 1: an explicit list, or decay^(k−1) normalised."""
    raw = list(weights) if weights is not None else [decay**k for k in range(num)]
    if len(raw) != num:
        raise ValueError(f"loss.depth_weights has {len(raw)} entries for {num} trained depths")
    if any(w < 0 for w in raw) or sum(raw) <= 0:
        raise ValueError(f"loss.depth_weights must be non-negative with a positive sum, got {raw}")
    total = sum(raw)
    return [w / total for w in raw]


def depth_losses(
    head: DraftHead,
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: list[float],
    kind: str = "ce",
    chunk_size: int = 1024,
    depths: int | None = None,
    features: torch.Tensor | None = None,
    counts: list[int] | None = None,
    lk_eta: float = LK_ETA,
):
    """Weighted per-depth mean loss of a right-padded batch and per-depth stats (loss sum,
    counts, hits [B, T], valid [B, T]); `hidden` is the target's final post-norm state, `features`
    the other target layers a head reads instead (EAGLE-3), `counts` the per-depth label counts
    of the global batch under data parallelism (each rank's loss is then its share of the sum).

    Depth k, row i predicts t_{i+k+1} for every head family. The head supplies its LM head and
    teacher (`output_layers`), its vocabulary (`draft_labels`: others are misses, kept out of the
    loss) and optional per-row loss weights (diffusion: only masked positions, schedule-weighted).
    """
    outputs = head.train_outputs(input_ids, features if features is not None else hidden, depths)
    row_weights = outputs.row_weights
    total = hidden.new_zeros(())
    stats = []
    for k, h in enumerate(outputs.states, start=1):
        labels, valid = shifted_labels(input_ids, loss_mask, k)
        student, teacher_head = head.output_layers(k)
        asked = valid if row_weights is None else valid & (row_weights[k - 1] > 0)
        labels, inside = head.draft_labels(labels)
        rows = asked & inside
        teacher = None
        if kind != "ce":  # the target's distribution for t_{i+k+1} comes from h0 at i+k
            T = hidden.shape[1]
            shifted = torch.zeros_like(hidden)
            shifted[:, : T - k] = hidden[:, k:]
            teacher = shifted[rows]
        loss_sum, hit = lm_loss(
            h[rows],
            labels[rows],
            student,
            kind,
            teacher,
            chunk_size,
            teacher_head,
            None if row_weights is None else row_weights[k - 1][rows],
            lk_eta,
        )
        loss_count = int(rows.sum())
        hits = torch.zeros_like(valid)
        hits[rows] = hit
        stats.append(
            {
                "loss_sum": loss_sum.detach(),
                "count": int(asked.sum()),  # accuracy counts out-of-vocabulary labels as misses
                "loss_count": loss_count,
                "hits": hits,
                "valid": valid,
            }
        )
        if k <= len(weights):
            total = total + weights[k - 1] * loss_sum / max(counts[k - 1] if counts else loss_count, 1)
    return total, stats


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


def _chunk(
    hidden, weight, bias, labels, teacher_hidden, t_weight, t_bias, row_weight, kind: str, t_log_z, eta
):
    logits = F.linear(hidden, weight, bias).float()
    correct = logits.argmax(-1) == labels
    if kind == "ce":
        per_row = F.cross_entropy(logits, labels, reduction="none")
    else:
        with torch.no_grad():
            t_logits = F.linear(teacher_hidden, t_weight, t_bias).float()
            p = F.softmax(t_logits, dim=-1)  # renormalised over the head's vocabulary
            if kind in ("lk", "lk_lambda"):
                # Acceptance needs the target's own probabilities of these tokens: with a reduced
                # vocabulary the mass outside it can never be accepted (SpecForge's target_p_on_draft).
                log_z = t_log_z[:, None] if t_log_z is not None else t_logits.logsumexp(-1, keepdim=True)
                p_accept = (t_logits - log_z).exp()
        logq = F.log_softmax(logits, dim=-1)
        if kind == "kl":  # KL(p_target || q_head) = Σ p (log p − log q)
            per_row = F.kl_div(logq, p, reduction="none").sum(-1)
        elif kind == "tv":  # total variation; 1 − TV is the acceptance of one draft (see below)
            per_row = 0.5 * (p - logq.exp()).abs().sum(-1)
        else:
            # LK losses (Samarin et al., "LK Losses: Direct Acceptance Rate Optimization for
            # Speculative Decoding", arXiv 2602.23881). The acceptance rate of one draft token
            # under rejection sampling is α(p, q) = Σ_v min(p_v, q_v) = 1 − TV(p, q); the losses
            # maximise it directly instead of through the KL proxy, which a small head cannot
            # drive to 0 and whose minimiser at limited capacity need not maximise α.
            #   LK^α = −log α            (`lk`: hyperparameter-free; ∇ = ∇TV / α, so the
            #                             vanishing TV gradient of a cold start is amplified;
            #                             a one-hot p makes it CE)
            #   LK^λ = λ·KL(p‖q) + (1 − λ)·TV(p, q),  λ = exp(−η·sg[α])   (`lk_lambda`: KL's
            #                             strong gradient while α is small, TV as α grows)
            # λ is per row, as speculators and AngelSpec compute it (SpecForge uses the batch
            # mean of α); the KL term uses p renormalised over the head's vocabulary, as `kl`.
            # A reduced vocabulary V_d caps α at the target's mass on it, P(V_d): once q_v ≥ p_v
            # on every draft token −log α sits at −log P(V_d) and has no gradient left.
            alpha = torch.minimum(p_accept, logq.exp()).sum(-1)
            if kind == "lk":
                per_row = -alpha.clamp_min(_LK_EPS).log()
            else:
                lam = torch.exp(-eta * alpha.detach())
                per_row = lam * F.kl_div(logq, p, reduction="none").sum(-1) + (1 - lam) * (1 - alpha)
    if row_weight is not None:
        per_row = per_row * row_weight
    return per_row.sum(), correct


def lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Linear,
    kind: str = "ce",
    teacher_hidden: torch.Tensor | None = None,
    chunk_size: int = 1024,
    teacher_head: torch.nn.Module | None = None,
    row_weight: torch.Tensor | None = None,
    lk_eta: float = LK_ETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss over rows of `hidden` [N, H] and the per-row top-1 hit [N] (bool).

    kind: `ce` against `labels`; `kl` / `tv` / `lk` / `lk_lambda` against
    softmax(teacher_head(teacher_hidden)), where the teacher head defaults to `lm_head` (a
    reduced-vocabulary head passes the target's LM head restricted to its vocabulary, with the
    whole head as its `.full`: the LK losses' acceptance uses the target's unrenormalised
    probabilities). `lm_head` / `teacher_head` need only `.weight` and `.bias`. `row_weight` [N]
    scales each row's loss (diffusion schedule weights); `lk_eta` is η of `lk_lambda`.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    if kind != "ce" and teacher_hidden is None:
        raise ValueError(f"loss kind {kind!r} needs the target's hidden states (teacher_hidden)")
    t_head = teacher_head if teacher_head is not None else lm_head
    full = t_head.full if isinstance(t_head, LinearView) and kind in ("lk", "lk_lambda") else None
    total = hidden.new_zeros((), dtype=torch.float32)
    hits = []
    # At least one (possibly empty) chunk: a rank without labels still backpropagates zeros
    # through the whole head, so its data-parallel gradient collectives match the other ranks'.
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        sl = slice(start, start + chunk_size)
        teacher = teacher_hidden[sl] if teacher_hidden is not None else None
        weight = row_weight[sl] if row_weight is not None else None
        log_z = None
        if full is not None:  # once per chunk, outside the checkpoint: backward does not redo it
            with torch.no_grad():
                log_z = F.linear(teacher, full.weight, full.bias).float().logsumexp(-1)
        args = (
            hidden[sl],
            lm_head.weight,
            lm_head.bias,
            labels[sl],
            teacher,
            t_head.weight,
            t_head.bias,
            weight,
            kind,
            log_z,
            lk_eta,
        )
        if torch.is_grad_enabled() and hidden.requires_grad:
            loss, hit = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            loss, hit = _chunk(*args)
        total = total + loss
        hits.append(hit)
    hit = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return total, hit


def global_label_counts(batch, depths: int, par) -> list[int] | None:
    """Per-depth label counts of the global batch, summed over the dp ranks' parts.

    Each rank divides its loss sum by these, so the ranks' losses (and gradients) add up to
    the one-process loss of the whole batch. None in a single process: its batch is global.
    """
    if par.dp == 1:
        return None
    local = {
        f"{k:03d}": int(shifted_labels(batch.input_ids, batch.loss_mask, k)[1].sum())
        for k in range(1, depths + 1)
    }
    return [int(v) for _, v in sorted(par.reduce_sums(local).items())]
