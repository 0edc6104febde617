"""`mtpkit train`: the one training loop for draft heads on a frozen target.

Reads a `collect` store (or runs the target online), trains the head with AdamW under a
warmup + decay schedule, evaluates per-depth loss / top-1 accuracy / simulated acceptance
on a held-out split, logs to the console, JSONL and TensorBoard, and checkpoints so that a
killed run resumes to the same loss curve.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from mtpkit.config import to_dict
from mtpkit.data.store import Store
from mtpkit.decode.replay import leading_runs, spans, walk
from mtpkit.distributed import init_parallel
from mtpkit.distributed.checkpoint import export_head
from mtpkit.distributed.fsdp import clip_grad_norm, shard_head
from mtpkit.distributed.sampler import global_label_counts
from mtpkit.distributed.tensor_parallel import load_parallel_target, parallelize_target
from mtpkit.errors import MtpkitError
from mtpkit.heads import build_head, head_dir, load_head
from mtpkit.models import Target
from mtpkit.models.loader import identity_differences
from mtpkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mtpkit.train.config import TrainConfig
from mtpkit.train.data import Batch, OnlineSource, StoreSource
from mtpkit.train.losses import depth_losses, depth_weights

log = logging.getLogger(__name__)


class TrainingError(MtpkitError, RuntimeError):
    pass


# ---------------------------------------------------------------------------- loss of one batch
def batch_loss(
    head, batch: Batch, cfg: TrainConfig, weights: list[float], depths: int | None = None, counts=None
):
    """Weighted per-depth loss of a batch, and per-depth stats (see `depth_losses`).

    counts: per-depth label counts of the global batch when it is split over data-parallel
    ranks, so each rank's share is its loss sum over the global count and the shares add up.
    """
    total, stats = depth_losses(
        head,
        batch.input_ids,
        batch.hidden,
        batch.loss_mask,
        weights,
        cfg.loss.kind,
        cfg.loss.chunk_size,
        depths,
        batch.features,
        counts,
    )
    return total * cfg.loss.scaling_factor, stats


def simulated_tau(stats: list[dict], max_k: int) -> dict[int, tuple[float, int]]:
    """Greedy speculative decoding of every loss-masked answer span, simulated with the eval
    replay's walk (`mtpkit.decode.replay.walk`): the prompt is what precedes the span, steps
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


@torch.no_grad()
def evaluate(head, batches: list[Batch], cfg: TrainConfig, weights: list[float], reduce=dict) -> dict:
    """Held-out metrics; `reduce` sums the per-rank sums over data-parallel ranks."""
    depths = max(head.cfg.train_depths, cfg.simulate_k)
    sums: dict[str, float] = {}
    for batch in batches:
        _, stats = batch_loss(head, batch, cfg, weights, depths)
        add_depth_stats(sums, stats[: head.cfg.train_depths])
        add_sim_tau(sums, stats, cfg.simulate_k)
    sums = reduce(sums)
    return {**depth_metrics(sums, head.cfg.train_depths), **sim_tau_metrics(sums, cfg.simulate_k)}


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
class MetricsLogger:
    """JSONL (the record) + TensorBoard (the plots). Appends, so a resumed run continues both."""

    def __init__(self, run: Path, enabled: bool = True):
        self.path = run / "metrics.jsonl"
        self._tb, self.enabled = None, enabled  # only rank 0 of a distributed run writes
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run / "tb"))
        except ImportError:  # tensorboard is a dependency, but never fail a run over plots
            log.warning("tensorboard not installed; metrics go to %s only", self.path)

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            "split": split,
            **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a run resumes from)."""
        if self.enabled and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay

    return factor


# ---------------------------------------------------------------------------- setup
def _source(
    cfg: TrainConfig, target: Target, feature_layers: list[int] | None = None, shard: tuple[int, int] = (0, 1)
):
    d = cfg.data
    if (d.store is None) == (d.online is None):
        raise TrainingError("set exactly one of data.store (offline) and data.online (online mode)")
    if d.online is not None:
        return OnlineSource(target, d.online, d.max_seq_len, cfg.seed, feature_layers, shard)
    store = Store(d.store)
    check_store(store, target)
    return StoreSource(
        store,
        d.token_budget,
        d.max_seq_len,
        d.eval_fraction,
        d.eval_max_samples,
        cfg.seed,
        feature_layers,
        shard,
    )


def check_store(store: Store, target: Target) -> None:
    """Refuse a store collected from another target, saying what differs."""
    have, here = store.manifest["model"], target.identity()
    keys = ("hidden_size", "vocab_size", "num_layers", "config_hash", "tokenizer_hash", "weights_hash")
    diffs = identity_differences(have, here, keys, "store", "target")
    if diffs:
        raise TrainingError(
            f"{store.root}: collected from {have.get('model_id')!r}, not {target.name!r} — "
            + "; ".join(diffs)
        )
    if target.num_layers not in store.layers:
        raise TrainingError(
            f"{store.root}: stores layers {store.layers} but MTP heads need the final hidden state "
            f"(layer {target.num_layers}); collect with --layers including {target.num_layers}"
        )


def _target_spec(cfg: TrainConfig) -> str:
    if cfg.model:
        return cfg.model
    if cfg.data.store:
        return Store(cfg.data.store).manifest["model"]["model_id"]
    raise TrainingError("set model: the target spec (or train from a store, which records it)")


def train(cfg: TrainConfig, resume: bool = False, target: Target | None = None) -> dict:
    """Train (or resume) a head; returns the final eval metrics and paths.

    Under torchrun every process calls this: the head is data-parallel over the `dp` ranks
    (each takes a part of every global batch) and the target tensor-parallel over `tp`.
    """
    par = init_parallel(cfg.distributed)
    try:
        return _train(cfg, resume, target, par)
    finally:
        par.close()


def _train(cfg: TrainConfig, resume: bool, target: Target | None, par) -> dict:
    run = Path(cfg.out)
    existing = run.exists() and any(run.iterdir())
    if existing and not resume:
        raise TrainingError(
            f"{run}: run directory is not empty; pass --resume to continue it or choose another --out"
        )
    par.barrier()  # every rank has looked at `run` before rank 0 writes into it
    target = parallelize_target(target, par) if target else load_parallel_target(_target_spec(cfg), par)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    head = (
        load_head(head_dir(cfg.init_from), target)
        if cfg.init_from
        else build_head(target, cfg.head_type, cfg.head)
    )
    source = _source(cfg, target, getattr(head, "feature_layers", None), (par.dp_rank, par.dp))
    if hasattr(head, "init_vocab") and not cfg.init_from:  # a reduced vocabulary from the data's tokens
        head.init_vocab(source.token_counts(target.vocab_size))
    head = shard_head(head, par, cfg.precision)
    head.train()
    decay = (
        cfg.loss.depth_decay
        if cfg.loss.depth_decay is not None
        else getattr(head, "default_depth_decay", 1.0)
    )
    weights = depth_weights(head.cfg.train_depths, cfg.loss.depth_weights, decay)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    if par.is_main:
        run.mkdir(parents=True, exist_ok=True)
        resolved = to_dict(cfg)
        resolved["head"] = head.describe()
        (run / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    logger = MetricsLogger(run, enabled=par.is_main)
    step, tokens_seen = 0, 0
    ckpt = latest_checkpoint(run) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, head, target, optimizer, scheduler)
        source.load_state_dict(state["data"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        logger.truncate_after(step)
        log.info("resumed %s at step %d", ckpt, step)
    elif resume and existing:
        log.warning("%s: no checkpoint to resume from; starting at step 0", run)
        logger.truncate_after(0)

    eval_batches = [par.to_device(b) for b in source.eval_batches()]
    autocast = torch.autocast(par.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    quiet = not cfg.progress or not par.is_main
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=quiet or None, dynamic_ncols=True)
    t_last, tokens_last = time.perf_counter(), tokens_seen
    last_eval: dict = {}
    try:
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            loss_value, stats_sum, step_tokens = 0.0, {}, 0
            for _ in range(cfg.optim.grad_accum):
                batch = par.to_device(source.next_batch())
                counts = global_label_counts(batch, head.cfg.train_depths, par)
                with autocast:
                    loss, stats = batch_loss(head, batch, cfg, weights, counts=counts)
                # Data-parallel gradients are averaged over dp ranks; each loss is a share of the sum.
                # (Always a graph, even without loss tokens: lm_loss runs an empty chunk.)
                (loss * par.dp / cfg.optim.grad_accum).backward()
                loss_value += loss.item() / cfg.optim.grad_accum
                step_tokens += batch.num_tokens
                add_depth_stats(stats_sum, stats)
            stats_sum = par.reduce_sums({**stats_sum, "loss": loss_value, "tokens": step_tokens})
            loss_value, tokens_seen = stats_sum.pop("loss"), tokens_seen + int(stats_sum.pop("tokens"))
            if not math.isfinite(loss_value):
                good = latest_checkpoint(run)
                raise TrainingError(
                    f"step {step + 1}: loss is {loss_value}; stopped. Last good checkpoint: {good or 'none'} "
                    "(lower optim.lr, or use precision: fp32)"
                )
            grad_norm = clip_grad_norm(params, cfg.optim.grad_clip, par)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                metrics = {
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": (tokens_seen - tokens_last) / max(now - t_last, 1e-9),
                    "tokens": tokens_seen,
                    **depth_metrics(stats_sum, head.cfg.train_depths),
                }
                logger.log(step, "train", metrics)
                bar.set_postfix(
                    loss=f"{loss_value:.3f}",
                    acc1=f"{metrics['acc_d1']:.3f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}",
                )
                t_last, tokens_last = now, tokens_seen
            if eval_batches and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                head.eval()
                with autocast:  # the training precision (FSDP's bf16 parameters need it)
                    last_eval = evaluate(head, eval_batches, cfg, weights, par.reduce_sums)
                head.train()
                logger.log(step, "eval", last_eval)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(
                    run,
                    step,
                    head,
                    target,
                    optimizer,
                    scheduler,
                    {"data": source.state_dict(), "tokens_seen": tokens_seen},
                )
    finally:
        bar.close()
        logger.close()
    if par.is_main:  # the last checkpoint, gathered into one safetensors head
        export_head(latest_checkpoint(run), run / "head")
    par.barrier()
    return {
        "run": str(run),
        "head": str(run / "head"),
        "step": step,
        "tokens_seen": tokens_seen,
        "eval": last_eval,
    }
