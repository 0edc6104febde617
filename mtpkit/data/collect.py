"""`mtpkit collect`: regenerate answers with the target and store its hidden states.

Draft heads must learn the target's own distribution, so (as EAGLE, Medusa self-distillation,
SpecForge and speculators do) the target answers the prompts itself. Each sample stores the
token ids, a loss mask over the answer tokens, and hidden states from a separate
teacher-forced forward over the whole sequence (never stitched from generation steps).

Resumability: the prompts form a deterministic stream (file order, optionally shuffled by
seed). The store's manifest keeps, per job (a hash of everything that defines the stream
and what is generated from it), how many stream items are consumed. Items are processed in
batches and committed only at batch boundaries, so rerunning the same command after a crash
rebuilds the same batches and continues where the last commit ended.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass

import torch

from mtpkit.config import FieldError, check_fields, checked
from mtpkit.data import chat
from mtpkit.data.generation import Job, generate_continuous
from mtpkit.data.megatron import TokenDocument, fingerprint, load_megatron, megatron_prefix
from mtpkit.data.prompts import (
    FORMATS,
    PromptFormatError,
    load_documents,
    load_prompts,
    no_prompts_error,
    resolve_source,
)
from mtpkit.data.store import KINDS, STORE_DTYPES, Sample, Store
from mtpkit.models import Target, load_target
from mtpkit.progress import EVERY_S, Progress

log = logging.getLogger(__name__)

MODES = ("generate", "corpus")
_FP16_MAX = 65504.0


@dataclass
class CollectConfig:
    model: str
    prompts: list[str]
    out: str
    mode: str = checked("generate", choices=MODES)
    format: str | None = checked(None, choices=FORMATS)  # force a record format instead of detecting it
    text_field: str | None = None
    all_turns: bool = False
    system_prompt: str | None = None
    max_new_tokens: int = checked(256, ge=1)
    temperature: float = checked(0.0, ge=0, meaning="0 = greedy")
    top_p: float = checked(1.0, gt=0, le=1)
    batch_size: int = checked(8, ge=1)  # generation slots (continuous batching)
    round_prompts: int | None = checked(None, ge=1)  # items per commit unit; default 4 x batch_size
    layers: list[int] | None = checked(None, ge=0)  # HF hidden_states ids; default [num_layers] = final
    dtype: str = checked("bfloat16", choices=sorted(STORE_DTYPES))  # storage dtype of hidden states
    store_kind: str = checked("hidden", choices=KINDS)  # tokens: ids + masks only, recomputed in training
    model_dtype: str = checked("float32", choices=("float32", "bfloat16", "float16"))
    max_prompts: int | None = checked(None, ge=1)  # None: every item of the stream
    max_samples: int | None = checked(None, ge=1)  # None: no limit
    # this run starts no round after M minutes (None: no limit)
    max_minutes: float | None = checked(None, gt=0)
    seed: int = 0
    shuffle: bool = False
    sample_size: int = checked(2048, ge=2)  # corpus mode: tokens per window
    stride: int | None = checked(None, ge=1)  # corpus mode: default = sample_size (no overlap)
    max_length: int = checked(4096, ge=2)  # longest stored sequence; longer prompts are skipped
    skip_bad: bool = False
    shard_mb: float = checked(256.0, gt=0)
    commit_every_s: float = checked(300.0, gt=0)  # also commit at least this often, to bound lost work
    forward_tokens: int = checked(16384, ge=1)  # token budget of one teacher-forced forward
    progress: bool = True
    progress_every_s: float = checked(EVERY_S, gt=0)  # off a terminal: a progress line this often

    def __post_init__(self):
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        check_fields(self)
        if not self.prompts:
            raise FieldError("prompts", "at least one prompt source is required")
        if self.mode == "generate" and self.max_length <= self.max_new_tokens:
            raise FieldError(
                "max_length",
                f"max_length ({self.max_length}) must exceed max_new_tokens ({self.max_new_tokens}): "
                "prompt + answer must fit, so every prompt would be skipped",
            )


def job_key(cfg: CollectConfig, layers: list[int]) -> tuple[str, dict]:
    """Identify the stream of a run: same key = same items in the same order, same generation."""
    sources = []
    for p in cfg.prompts:
        prefix = megatron_prefix(p) if cfg.mode == "corpus" else None
        if prefix is not None:
            sources.append({"path": str(prefix.resolve()), "megatron": fingerprint(prefix)})
            continue
        path = resolve_source(p)
        sources.append(
            {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
        )
    job = {
        "mode": cfg.mode,
        "sources": sources,
        "format": cfg.format,
        "text_field": cfg.text_field,
        "shuffle": cfg.shuffle,
        "seed": cfg.seed,
        "max_length": cfg.max_length,
        "layers": layers,
    }
    if cfg.mode == "generate":
        job.update(
            all_turns=cfg.all_turns,
            system_prompt=cfg.system_prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
        )
    else:
        job.update(sample_size=cfg.sample_size, stride=cfg.stride or cfg.sample_size)
    key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    return key, job


# ---------------------------------------------------------------------------- model work
def generate_answers(
    target: Target,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Answer tokenized prompts (continuous batching over `batch_size` slots, default all);
    each answer ends at its first EOS, kept. Prompt i samples from its own generator (seed + i)."""
    jobs = [Job(p, _generator(seed + i) if temperature > 0 else None) for i, p in enumerate(prompts)]
    generate_continuous(target, jobs, max_new_tokens, batch_size or len(prompts), temperature, top_p)
    return [j.answer for j in jobs]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def teacher_forced_hidden(
    target: Target, sequences: list[list[int]], layers: list[int], dtype: torch.dtype, forward_tokens: int
) -> list[torch.Tensor]:
    """Hidden states [T, n_layers, H] of each sequence, from right-padded batched forwards."""
    results: list[torch.Tensor | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    start = 0
    while start < len(order):
        # Grow the sub-batch while (batch x longest) fits the token budget.
        end = start + 1
        while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= forward_tokens:
            end += 1
        idx = order[start:end]
        width = len(sequences[idx[-1]])
        ids = torch.full((len(idx), width), target.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        hidden = target.hidden_states(ids.to(target.device), mask.to(target.device), layers)
        for row, i in enumerate(idx):
            real = hidden[row, : len(sequences[i])]  # padding rows are never stored, never checked
            if dtype == torch.float16 and real.abs().max() > _FP16_MAX:
                raise ValueError("hidden states exceed the float16 range; collect with --dtype bfloat16")
            results[i] = real.to(dtype).cpu()
        start = end
    return results


# ---------------------------------------------------------------------------- streams
def corpus_windows(target: Target, cfg: CollectConfig, docs) -> list[tuple[list[int], str]]:
    """Cut each document (tokenized, EOS appended) into `sample_size` windows every `stride` tokens."""
    size, stride = cfg.sample_size, cfg.stride or cfg.sample_size
    if size > cfg.max_length:
        raise ValueError(f"sample_size {size} exceeds max_length {cfg.max_length}")
    eos = target.tokenizer.eos_token_id
    windows = []
    for doc in docs:
        if isinstance(doc, TokenDocument):  # pre-tokenized (Megatron): its EOD is already in it
            ids = doc.ids.tolist()
        else:
            ids = target.tokenizer(doc.text)["input_ids"] + ([eos] if eos is not None else [])
        start = 0
        while True:
            window = ids[start : start + size]
            if len(window) >= 2:
                windows.append((window, f"{doc.source}@{start}"))
            if start + size >= len(ids):
                break
            start += stride
    return windows


def generate_conversations(
    target: Target,
    cfg: CollectConfig,
    batch,
    seed: int,
    on_tokens=None,
    layers: list[int] | None = None,
    feature_dtype: torch.dtype = torch.bfloat16,
) -> tuple[list, int, int]:
    """Conversations for a batch of prompts; returns (samples, generated tokens, skipped).

    With `layers` each sample is (ids, mask, source, hidden): the hidden states the generating
    forwards computed ([T, n_layers, H]; the last token, never fed back, gets a zero row: no
    head reads past the end), or None where the conversation's ids are not what was run."""
    tok, eos = target.tokenizer, target.eos_token_ids
    budget = cfg.max_length - cfg.max_new_tokens
    convs, positions, skipped = [], [], 0
    for pos, prompt in enumerate(batch):
        conv = chat.start(tok, prompt, cfg.system_prompt)
        if len(conv.ids) > budget:
            log.warning(
                "%s: prompt of %d tokens exceeds max_length - max_new_tokens; skipped",
                prompt.source,
                len(conv.ids),
            )
            skipped += 1
        else:
            convs.append(conv)
            positions.append(pos)
    # Prompt i of the batch samples from its own generator: its answer depends on (seed + i) only,
    # not on which prompts share the slots with it -> resumable and batch-size independent.
    sampling = cfg.temperature > 0
    generated = 0
    features: dict[int, list[torch.Tensor]] = {}

    def done(job: Job) -> Job | None:
        nonlocal generated
        conv = job.tag
        chat.add_answer(tok, conv, job.answer, eos)
        generated += len(job.answer)
        features[id(conv)] = job.features
        if cfg.all_turns and chat.next_turn(tok, conv, max_tokens=budget):
            return Job(conv.ids, job.generator, tag=conv)
        return None

    jobs = [
        Job(c.ids, _generator(seed + pos) if sampling else None, tag=c)
        for pos, c in zip(positions, convs, strict=True)
    ]
    generate_continuous(
        target,
        jobs,
        cfg.max_new_tokens,
        cfg.batch_size,
        cfg.temperature,
        cfg.top_p,
        done,
        on_tokens,
        layers,
        feature_dtype,
    )
    if layers is None:
        return [(c.ids, c.mask, c.prompt.source) for c in convs], generated, skipped
    samples = []
    for c in convs:
        rows = torch.cat(features.pop(id(c)))
        hidden = None
        if len(rows) == len(c.ids) - 1:
            hidden = torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])
        samples.append((c.ids, c.mask, c.prompt.source, hidden))
    return samples, generated, skipped


def stream_items(target: Target, cfg: CollectConfig) -> list:
    """The job's items in order: prompts (generate) or token windows (corpus), shuffled by seed
    if asked (documents before windowing), cut to `max_prompts`."""
    if cfg.mode == "generate":
        for spec in cfg.prompts:
            if megatron_prefix(spec) is not None:
                raise PromptFormatError(f"{spec}: a Megatron indexed dataset is raw text; use --mode corpus")
        items = load_prompts(cfg.prompts, cfg.format, cfg.text_field, cfg.skip_bad)
    else:
        items = []
        for spec in cfg.prompts:  # in order; Megatron .bin/.idx datasets are token documents
            prefix = megatron_prefix(spec)
            if prefix is not None:
                items += load_megatron(prefix, target.vocab_size)
            else:
                items += load_documents([spec], cfg.format, cfg.text_field, cfg.skip_bad)
    if not items:
        raise no_prompts_error(cfg.prompts, "prompts" if cfg.mode == "generate" else "documents")
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(items)
    if cfg.mode == "corpus":
        items = corpus_windows(target, cfg, items)
    return items if cfg.max_prompts is None else items[: cfg.max_prompts]


# ---------------------------------------------------------------------------- the job
def collect(cfg: CollectConfig, target: Target | None = None) -> dict:
    """Run (or resume) a collection job; return the summary."""
    target = target or load_target(cfg.model, dtype=cfg.model_dtype)
    layers = target.check_layers(cfg.layers if cfg.layers is not None else [target.num_layers])
    store_dtype = STORE_DTYPES[cfg.dtype]

    # Read every source before touching the store: bad input fails here, with nothing written.
    items = stream_items(target, cfg)
    key, job = job_key(cfg, layers)

    store = Store.open_for_append(cfg.out, target.identity(), layers, cfg.dtype, cfg.store_kind)
    try:
        return _run(cfg, target, store, items, key, job, layers, store_dtype)
    finally:
        store.close()


def _run(cfg, target, store: Store, items, key, job, layers, store_dtype) -> dict:
    state = dict(store.job(key))
    state.setdefault("generated_tokens", 0)
    state.setdefault("skipped", 0)
    state["spec"] = job  # the manifest's name for it (docs/store.md)
    consumed = resumed_at = state["consumed"]
    if consumed:
        log.info(
            "resuming job %s at item %d of %d (%d samples stored)",
            key,
            consumed,
            len(items),
            state["samples"],
        )

    shard_bytes = cfg.shard_mb * 2**20
    bytes_per_token = (
        4 + 1 + (len(layers) * target.hidden_size * store_dtype.itemsize if store.kind == "hidden" else 0)
    )
    pending: list[Sample] = []
    t0 = last_commit = time.perf_counter()
    run = {"samples": 0, "tokens": 0, "generated_tokens": 0}
    unit = "prompt" if cfg.mode == "generate" else "window"
    bar = Progress(len(items), consumed, unit, "collect", enabled=cfg.progress, every_s=cfg.progress_every_s)

    round_tokens = 0

    def on_tokens(n: int) -> None:  # inside a round: keep the rate and the log line alive
        nonlocal round_tokens
        round_tokens += n
        elapsed = time.perf_counter() - t0
        bar.set_postfix(
            samples_s=f"{run['samples'] / elapsed:.2f}",
            tok_s=f"{run['tokens'] / elapsed:.0f}",
            gen_tok_s=f"{(run['generated_tokens'] + round_tokens) / elapsed:.1f}",
        )
        bar.tick()

    def commit() -> None:
        nonlocal pending, last_commit
        store.commit(pending, key, dict(state, consumed=consumed, done=consumed >= len(items)))
        pending, last_commit = [], time.perf_counter()

    # bf16 hidden stores keep the generating forwards' states (fp16 needs the overflow check)
    captured = cfg.mode == "generate" and store.kind == "hidden" and store_dtype == torch.bfloat16
    while consumed < len(items):
        room = None if cfg.max_samples is None else cfg.max_samples - state["samples"]  # pending included
        if room is not None and room <= 0:
            break
        if cfg.max_minutes is not None and time.perf_counter() - t0 >= 60 * cfg.max_minutes:
            log.info(
                "collect: %.0f-minute budget spent; stopping after %d items (rerun to continue)",
                cfg.max_minutes,
                consumed,
            )
            break
        # A round of items is one unit of work and of commit; within it, finished answers are
        # replaced by queued prompts, so only the round's tail waits for its longest answer.
        # Each item yields at most one sample, so a round no larger than `room` cannot overshoot.
        per_round = cfg.round_prompts or 4 * cfg.batch_size
        take = per_round if room is None else min(per_round, room)
        batch = items[consumed : consumed + take]
        if cfg.mode == "generate":
            seqs, generated, skipped = generate_conversations(
                target,
                cfg,
                batch,
                seed=cfg.seed * 1_000_003 + consumed,
                on_tokens=on_tokens,
                layers=layers if captured else None,
            )
        else:
            seqs, generated, skipped = [(ids, [True] * len(ids), src) for ids, src in batch], 0, 0
        if store.kind == "tokens":  # the trainer recomputes them: no forward here
            hidden = [None] * len(seqs)
        elif captured:  # kept while generating; a teacher-forced pass only where that failed
            hidden = [s[3] for s in seqs]
            redo = [i for i, h in enumerate(hidden) if h is None]
            for i, h in zip(
                redo,
                teacher_forced_hidden(
                    target, [seqs[i][0] for i in redo], layers, store_dtype, cfg.forward_tokens
                ),
                strict=True,
            ):
                hidden[i] = h
            seqs = [s[:3] for s in seqs]
        else:
            hidden = teacher_forced_hidden(
                target, [s[0] for s in seqs], layers, store_dtype, cfg.forward_tokens
            )
        for (ids, mask, source), h in zip(seqs, hidden, strict=True):
            pending.append(Sample(torch.tensor(ids), torch.tensor(mask), h, source))
        n_tokens = sum(len(s[0]) for s in seqs)
        consumed += len(batch)
        state["samples"] += len(seqs)
        state["tokens"] = state.get("tokens", 0) + n_tokens
        state["generated_tokens"] += generated
        state["skipped"] += skipped
        run["samples"] += len(seqs)
        run["tokens"] += n_tokens
        run["generated_tokens"] += generated
        elapsed = time.perf_counter() - t0
        round_tokens = 0
        bar.set_postfix(
            samples_s=f"{run['samples'] / elapsed:.2f}",
            tok_s=f"{run['tokens'] / elapsed:.0f}",
            gen_tok_s=f"{run['generated_tokens'] / elapsed:.1f}",
        )
        bar.update(len(batch))
        pending_bytes = sum(len(s.input_ids) for s in pending) * bytes_per_token
        if pending_bytes >= shard_bytes or time.perf_counter() - last_commit >= cfg.commit_every_s:
            commit()
    if pending or consumed != resumed_at or key not in store.manifest["jobs"]:
        commit()
    bar.close()

    elapsed = time.perf_counter() - t0
    disk = store.bytes_on_disk()
    m = store.manifest
    return {
        "store": str(store.root),
        "job": key,
        "mode": cfg.mode,
        "items_consumed": consumed,
        "items_total": len(items),
        "skipped": state["skipped"],
        "run_samples": run["samples"],
        "run_tokens": run["tokens"],
        "run_generated_tokens": run["generated_tokens"],
        "run_seconds": round(elapsed, 2),
        "run_tokens_per_s": round(run["tokens"] / elapsed, 1) if elapsed > 0 else 0.0,
        "run_generated_tokens_per_s": round(run["generated_tokens"] / elapsed, 1) if elapsed > 0 else 0.0,
        "store_samples": m["num_samples"],
        "store_tokens": m["num_tokens"],
        "store_loss_tokens": m["num_loss_tokens"],
        "store_bytes": disk,
        "bytes_per_token": round(disk / m["num_tokens"], 1) if m["num_tokens"] else 0.0,
        "layers": layers,
        "dtype": cfg.dtype,
        "store_kind": store.kind,
    }


def format_summary(summary: dict) -> str:
    rows = [
        ("store", summary["store"]),
        (
            "items consumed",
            f"{summary['items_consumed']} / {summary['items_total']} (skipped {summary['skipped']})",
        ),
        ("samples (this run / store)", f"{summary['run_samples']} / {summary['store_samples']}"),
        ("tokens (this run / store)", f"{summary['run_tokens']} / {summary['store_tokens']}"),
        ("loss tokens (store)", summary["store_loss_tokens"]),
        ("generated tokens/s", summary["run_generated_tokens_per_s"]),
        ("stored tokens/s", summary["run_tokens_per_s"]),
        ("bytes on disk", f"{summary['store_bytes']:,}"),
        ("bytes per token", summary["bytes_per_token"]),
        ("layers / dtype", f"{summary['layers']} / {summary['dtype']}"),
        ("seconds", summary["run_seconds"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
