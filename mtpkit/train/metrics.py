"""Per-depth training metrics shared by every recipe: loss, top-1 accuracy and simulated τ —
and the one walk over step boundaries that both simulated τ and eval's exact replay use.

Stats are the per-depth dicts `train.losses.depth_losses` returns; sums accumulate over
batches (and data-parallel ranks) before the means are taken, so they reduce exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def leading_runs(hits: torch.Tensor) -> torch.Tensor:
    """hits [K, ...] (bool; depth j−1, row r: draft j at anchor r is right) → the number of
    leading hits per row [...], i.e. the drafts a verification at that anchor accepts."""
    return hits.int().cumprod(0).sum(0)


def walk(runs: list[int], first_row: int, end_row: int, k: int) -> list[int]:
    """Accepted count of every step of a greedy speculative decode with K = k.

    runs[r]: leading hits at anchor row r (up to any depth ≥ k). The first step anchors at
    `first_row` (= P − 1: the prompt's P rows and the token they produce are verified), the
    output ends once the anchor reaches `end_row` (= P + G − 2 for G generated tokens). A step
    at r accepts a = min(runs[r], k) drafts and adds a + 1 tokens (bonus included)."""
    out = []
    r = first_row
    while r < end_row:
        a = min(runs[r], k)
        out.append(a)
        r += a + 1
    return out


def spans(mask: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(start, end) of every run of True in a 1-d bool tensor."""
    m = mask.int().tolist()
    start = None
    for i, v in enumerate([*m, 0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            yield start, i
            start = None


def simulated_tau(stats: list[dict], max_k: int) -> dict[int, tuple[float, int]]:
    """Greedy speculative decoding of every loss-masked answer span, simulated with the eval
    replay's walk (`walk` below, which `mtpkit.decode.replay` uses): the prompt is what precedes the span, steps
    advance by accepted + 1 from its first token, and a step counts while every depth up to K
    has a label (drafts past the data cannot be scored). Returns {K: (Σ(accepted + 1), steps)}."""
    out = {}
    if max_k < 1 or not stats:
        return out
    runs = leading_runs(torch.stack([s["hits"] for s in stats[:max_k]])).cpu().tolist()  # [B][T]
    answers = stats[0]["valid"].cpu()  # depth 1, row i: t_{i+2} is an answer token
    for K in range(1, min(max_k, len(stats)) + 1):
        accepted, steps = 0, 0
        for b, row_runs in enumerate(runs):
            # An answer span t_a..t_{e−1} is the run [a−2, e−2) of depth-1 validity; its first
            # step anchors at row a − 1, and row r has labels up to depth K while r < e − K − 1.
            for s, f in spans(answers[b]):
                got = walk(row_runs, s + 1, f - K + 1, K)
                accepted += sum(got) + len(got)
                steps += len(got)
        out[K] = (float(accepted), steps)
    return out


def add_depth_stats(sums: dict[str, float], stats: list[dict]) -> None:
    """Accumulate per-depth loss sums, top-1 hits and counts (from `batch_loss`) into `sums`."""
    for k, s in enumerate(stats, start=1):
        sums[f"loss_sum_d{k}"] = sums.get(f"loss_sum_d{k}", 0.0) + float(s["loss_sum"])
        sums[f"loss_count_d{k}"] = sums.get(f"loss_count_d{k}", 0.0) + s.get("loss_count", s["count"])
        sums[f"hits_d{k}"] = sums.get(f"hits_d{k}", 0.0) + float(s["hits"].sum())
        sums[f"count_d{k}"] = sums.get(f"count_d{k}", 0.0) + s["count"]


def depth_metrics(sums: dict[str, float], depths: int) -> dict[str, float]:
    """Mean loss and top-1 accuracy per depth from accumulated sums."""
    metrics = {}
    for k in range(1, depths + 1):
        n = max(sums.get(f"count_d{k}", 0.0), 1.0)
        metrics[f"loss_d{k}"] = sums.get(f"loss_sum_d{k}", 0.0) / max(sums.get(f"loss_count_d{k}", n), 1.0)
        metrics[f"acc_d{k}"] = sums.get(f"hits_d{k}", 0.0) / n
    return metrics


def add_sim_tau(sums: dict[str, float], stats: list[dict], max_k: int) -> None:
    """Accumulate the simulated-τ numerators and row counts of a batch (from `simulated_tau`)."""
    for K, (acc, rows) in simulated_tau(stats, max_k).items():
        sums[f"tau_sum_k{K}"] = sums.get(f"tau_sum_k{K}", 0.0) + acc
        sums[f"tau_rows_k{K}"] = sums.get(f"tau_rows_k{K}", 0.0) + rows


def sim_tau_metrics(sums: dict[str, float], max_k: int) -> dict[str, float]:
    """sim_tau_k{K} for every K with rows, from sums built by `add_sim_tau`."""
    return {
        f"sim_tau_k{K}": sums[f"tau_sum_k{K}"] / sums[f"tau_rows_k{K}"]
        for K in range(1, max_k + 1)
        if sums.get(f"tau_rows_k{K}")
    }


# ---------------------------------------------------------------------------- logging
