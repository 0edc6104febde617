"""`mtpkit train`: the one training loop for draft heads on a frozen target.

Reads a `collect` store (or runs the target online), trains the head with AdamW under a
warmup + decay schedule, evaluates per-depth loss / top-1 accuracy / simulated acceptance
on a held-out split, logs to the console, JSONL and TensorBoard, and checkpoints so that a
killed run resumes to the same loss curve.
"""

from __future__ import annotations

import logging
import math

import torch

from mtpkit.config import to_dict
from mtpkit.data.store import Store
from mtpkit.distributed import init_parallel
from mtpkit.distributed.checkpoint import consolidate_head
from mtpkit.distributed.fsdp import clip_grad_norm, shard_head
from mtpkit.distributed.tensor_parallel import load_parallel_target, parallelize_target
from mtpkit.errors import MtpkitError
from mtpkit.heads import build_head, head_dir, load_head
from mtpkit.models import Target
from mtpkit.models.loader import identity_differences
from mtpkit.train.checkpoint import check_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from mtpkit.train.config import TrainConfig
from mtpkit.train.data import Batch, OnlineSource, StoreSource
from mtpkit.train.frame import Cadence, Run, lr_lambda, seed_everything
from mtpkit.train.losses import depth_losses, depth_weights, global_label_counts
from mtpkit.train.metrics import add_depth_stats, add_sim_tau, depth_metrics, sim_tau_metrics

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
        cfg.loss.lk_eta,
    )
    return total * cfg.loss.scaling_factor, stats


@torch.no_grad()
def held_out_metrics(head, batches: list[Batch], cfg: TrainConfig, weights: list[float], reduce=dict) -> dict:
    """Held-out metrics; `reduce` sums the per-rank sums over data-parallel ranks."""
    depths = max(head.cfg.train_depths, cfg.simulate_k)
    sums: dict[str, float] = {}
    for batch in batches:
        _, stats = batch_loss(head, batch, cfg, weights, depths)
        add_depth_stats(sums, stats[: head.cfg.train_depths])
        add_sim_tau(sums, stats, cfg.simulate_k)
    sums = reduce(sums)
    return {**depth_metrics(sums, head.cfg.train_depths), **sim_tau_metrics(sums, cfg.simulate_k)}


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
        target,
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
    run = Run(cfg.out, resume, TrainingError, par.is_main)
    if resume and (ckpt := latest_checkpoint(run.dir)) is not None:
        check_checkpoint(ckpt)  # a broken checkpoint fails before anything in `run` is written
    par.barrier()  # every rank has looked at `run` before rank 0 writes into it
    target = parallelize_target(target, par) if target else load_parallel_target(_target_spec(cfg), par)
    seed_everything(cfg.seed)
    head = (
        load_head(head_dir(cfg.init_from), target)
        if cfg.init_from
        else build_head(target, cfg.head_type, cfg.head)
    )
    # Heads on the final state read `hidden`, which every batch carries; others get `features`.
    features = None if head.feature_layers == [target.num_layers] else head.feature_layers
    source = _source(cfg, target, features, (par.dp_rank, par.dp))
    if head.needs_token_counts and not cfg.init_from:  # e.g. a reduced vocabulary from the data's tokens
        head.init_vocab(source.token_counts(target.vocab_size))
    head = shard_head(head, par, cfg.precision)
    head.train()
    decay = cfg.loss.depth_decay if cfg.loss.depth_decay is not None else head.default_depth_decay
    weights = depth_weights(head.cfg.train_depths, cfg.loss.depth_weights, decay)
    params = [p for p in head.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(o.warmup_steps, o.schedule, o.min_lr_ratio, cfg.max_steps)
    )

    resolved = to_dict(cfg)
    resolved["head"] = head.describe()
    run.open(resolved)
    progress = {"tokens_seen": 0}
    state = run.restore(lambda ckpt: load_checkpoint(ckpt, head, target, optimizer, scheduler))
    step = 0
    if state is not None:
        source.load_state_dict(state["data"])
        step, progress["tokens_seen"] = state["step"], state["tokens_seen"]

    eval_batches = [par.to_device(b) for b in source.eval_batches()]
    autocast = torch.autocast(par.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def train_step(step: int) -> dict:
        optimizer.zero_grad(set_to_none=True)
        loss_value, stats_sum, step_tokens = 0.0, {}, 0
        for _ in range(o.grad_accum):
            batch = par.to_device(source.next_batch())
            counts = global_label_counts(batch, head.cfg.train_depths, par)
            with autocast:
                loss, stats = batch_loss(head, batch, cfg, weights, counts=counts)
            # Data-parallel gradients are averaged over dp ranks; each loss is a share of the sum.
            # (Always a graph, even without loss tokens: lm_loss runs an empty chunk.)
            (loss * par.dp / o.grad_accum).backward()
            loss_value += loss.item() / o.grad_accum
            step_tokens += batch.num_tokens
            add_depth_stats(stats_sum, stats)
        stats_sum = par.reduce_sums({**stats_sum, "loss": loss_value, "tokens": step_tokens})
        loss_value = stats_sum.pop("loss")
        progress["tokens_seen"] += int(stats_sum.pop("tokens"))
        if not math.isfinite(loss_value):
            good = latest_checkpoint(run.dir)
            raise TrainingError(
                f"step {step + 1}: loss is {loss_value}; stopped. Last good checkpoint: {good or 'none'} "
                "(lower optim.lr, or use precision: fp32)"
            )
        grad_norm = clip_grad_norm(params, o.grad_clip, par)
        optimizer.step()
        scheduler.step()
        return {
            "loss": loss_value,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens": progress["tokens_seen"],
            **depth_metrics(stats_sum, head.cfg.train_depths),
        }

    def evaluate_held_out() -> dict:
        head.eval()
        with autocast:  # the training precision (FSDP's bf16 parameters need it)
            metrics = held_out_metrics(head, eval_batches, cfg, weights, par.reduce_sums)
        head.train()
        return metrics

    def save(step: int) -> None:
        save_checkpoint(
            run.dir,
            step,
            head,
            target,
            optimizer,
            scheduler,
            {"data": source.state_dict(), "tokens_seen": progress["tokens_seen"]},
        )

    step, last_eval = run.loop(
        Cadence(cfg.max_steps, cfg.log_every, cfg.save_every, cfg.eval_every),
        step,
        train_step,
        save,
        evaluate_held_out if eval_batches else None,
        progress=cfg.progress and par.is_main,
        postfix=lambda m: {
            "loss": f"{m['loss']:.3f}",
            "acc1": f"{m['acc_d1']:.3f}",
            "tok_s": f"{m['tokens_per_s']:.0f}",
        },
        tokens_at_start=progress["tokens_seen"],
    )
    if par.is_main:  # the last checkpoint, gathered into one safetensors head
        consolidate_head(latest_checkpoint(run.dir), run.dir / "head")
    par.barrier()
    return {
        "run": str(run.dir),
        "head": str(run.dir / "head"),
        "step": step,
        "tokens_seen": progress["tokens_seen"],
        "eval": last_eval,
    }
