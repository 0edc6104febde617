"""Per-depth training metrics shared by every recipe: loss, top-1 accuracy and simulated τ.

Stats are the per-depth dicts `train.losses.depth_losses` returns; sums accumulate over
batches (and data-parallel ranks) before the means are taken, so they reduce exactly.
"""

from __future__ import annotations

import torch


def simulated_tau(stats: list[dict], max_k: int) -> dict[int, tuple[float, int]]:
    """Teacher-forced chain-acceptance estimate per K: 1 + E[Σ_j Π_{d≤j} hit_d] over rows
    where every depth up to K has a label. Returns {K: (sum of accepted + 1, rows)}."""
    out = {}
    for K in range(1, min(max_k, len(stats)) + 1):
        rows = torch.stack([s["valid"] for s in stats[:K]]).all(0)
        chain = torch.stack([s["hits"] for s in stats[:K]]).int().cumprod(0)  # [K, B, T]
        accepted = chain.sum(0)[rows].float()
        out[K] = (float((accepted + 1).sum()), int(rows.sum()))
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
