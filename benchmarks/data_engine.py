"""Target-aligned training tokens per CPU-hour, per data path, on the embedded SmolLM2-135M target.

Run from the repository root, under the machine-wide lock (it loads the real model):

    flock /tmp/mtpkit-heavy.lock .venv/bin/python benchmarks/data_engine.py --quick

Paths (training prompts / text from ../shared/data/prompts only, never the eval sets):

- generate@B: continuous-batching greedy generation (collect's path) with B slots; the training
  tokens are the answer tokens (what the loss mask covers). Reported with generation alone (a
  tokens store, hidden states recomputed in training) and with the teacher-forced forward that
  a hidden store adds. B = 1 / 8 / 32 / 64, float32 target; B = 32 also with a bfloat16 target.
  Greedy answers at every B are compared with the B = 1 answers of the same prompts.
- teacher-forced: corpus windows of human text (GSM8K training answers), one forward per batch,
  every token a training token (the `loss.kind: kl` path: no generation at all).
- online recompute vs disk: a training batch's hidden states recomputed by the target (tokens
  store / online) against read from a hidden store on disk (page cache warm), tokens/s.
- bytes per token of each store kind, from real `collect` runs.

CPU time is the process's user + system time (both cores count), so "per CPU-hour" is per hour
of one core; wall-clock rates are reported beside it. Writes benchmarks/results/data_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from mtpkit.data import chat
from mtpkit.data.collect import CollectConfig, collect, teacher_forced_hidden
from mtpkit.data.generation import Job, generate_continuous
from mtpkit.data.prompts import load_documents, load_prompts
from mtpkit.data.store import Store
from mtpkit.models import EMBEDDED_ALIAS, load_target
from mtpkit.train.data import StoreSource, target_batch

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO.parent / "shared" / "data" / "prompts"
GEN_PROMPTS = [PROMPTS / "vicuna_bench.jsonl", PROMPTS / "self_instruct_user_oriented.jsonl"]
CORPUS = PROMPTS / "gsm8k_train.jsonl"
OUT = REPO / "benchmarks" / "results" / "data_engine.json"


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def rates(tokens: int, clock: Clock) -> dict:
    return {
        "tokens": tokens,
        "wall_s": round(clock.wall, 2),
        "cpu_s": round(clock.cpu, 2),
        "tokens_per_s": round(tokens / clock.wall, 1),
        "tokens_per_cpu_hour": round(tokens / clock.cpu * 3600),
    }


def gen_prompts(target, n: int) -> list[list[int]]:
    prompts = load_prompts([str(p) for p in GEN_PROMPTS])
    return [chat.start(target.tokenizer, p).ids for p in prompts[:n]]


def bench_generation(target, batch: int, n_prompts: int, max_new: int) -> tuple[dict, list[list[int]]]:
    prompts = gen_prompts(target, n_prompts)
    jobs = [Job(p) for p in prompts]
    with Clock() as gen:
        generate_continuous(target, jobs, max_new, batch)
    answer_tokens = sum(len(j.answer) for j in jobs)
    seqs = [j.prompt + j.answer for j in jobs]
    with Clock() as tf:
        teacher_forced_hidden(target, seqs, [target.num_layers], torch.bfloat16, 16384)
    both = Clock()
    both.wall, both.cpu = gen.wall + tf.wall, gen.cpu + tf.cpu
    row = {
        "batch": batch,
        "prompts": len(prompts),
        "generated_tokens_per_s": round(answer_tokens / gen.wall, 1),
        "generate_only": rates(answer_tokens, gen),
        "generate_plus_hidden": rates(answer_tokens, both),
    }
    return row, [j.answer for j in jobs]


def bench_padded_generate(target, batch: int, n_prompts: int, max_new: int) -> dict:
    """The previous collect path: `model.generate` on left-padded batches (each batch runs until
    its longest answer ends)."""
    from transformers import GenerationConfig

    prompts = gen_prompts(target, n_prompts)
    pad, eos = target.tokenizer.pad_token_id, target.eos_token_ids
    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    tokens = 0
    with Clock() as c:
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            with torch.no_grad():
                out = target.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            for row in out[:, width:].tolist():
                tokens += next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
    return {"batch": batch, "prompts": len(prompts), **rates(tokens, c)}


def bench_teacher_forced(target, n_docs: int, window: int, dtype) -> dict:
    docs = load_documents([str(CORPUS)], text_field="answer")[:n_docs]
    seqs = []
    for d in docs:  # the windows corpus mode makes (documents are short: one window each mostly)
        ids = target.tokenizer(d.text)["input_ids"] + [target.tokenizer.eos_token_id]
        seqs += [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]
    tokens = sum(map(len, seqs))
    with Clock() as c:
        teacher_forced_hidden(target, seqs, [target.num_layers], dtype, 16384)
    return {**rates(tokens, c), "sequences": len(seqs)}


def bench_stores(target, tmp: Path, n_prompts: int, max_new: int) -> dict:
    """Bytes per token of each kind; a training batch read from disk vs recomputed."""
    out = {}
    for kind in ("hidden", "tokens"):
        cfg = CollectConfig(
            model=target.name,
            prompts=[str(CORPUS)],
            text_field="answer",
            mode="corpus",
            out=str(tmp / kind),
            sample_size=256,
            max_prompts=n_prompts * 4,
            store_kind=kind,
            progress=False,
            max_new_tokens=max_new,
        )
        summary = collect(cfg, target)
        out[kind] = {"bytes_per_token": summary["bytes_per_token"], "store_tokens": summary["store_tokens"]}
    hidden = StoreSource(Store(tmp / "hidden"), 4096, 2048, 0.0, 0, seed=0)
    tokens = StoreSource(Store(tmp / "tokens"), 4096, 2048, 0.0, 0, seed=0, target=target)
    for name, source in (("read_from_disk", hidden), ("recompute", tokens)):
        n = 0
        source.next_batch()  # warm: shard handles, page cache
        with Clock() as c:
            for _ in range(len(source._plan) - 1):
                n += int(source.next_batch().input_ids.ne(0).sum())
        out[name] = rates(n, c)
    # plain recompute cost of the same batches, without the store read (what online training pays)
    seqs = [(s.input_ids.tolist(), s.loss_mask.tolist()) for s in Store(tmp / "tokens")]
    with Clock() as c:
        target_batch(target, seqs[:32], 2048, None)
    out["online_forward"] = rates(sum(len(s[0]) for s in seqs[:32]), c)
    return out


def first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_ALIAS)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in < 8 minutes on 2 cores")
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    quick = args.quick
    max_new = 48 if quick else 256
    batches = [int(x) for x in args.batch_sizes.split(",")]
    per_batch = (lambda b: max(3, int(1.5 * b))) if quick else (lambda b: max(8, 4 * b))

    t0 = time.perf_counter()
    target = load_target(args.model)
    result = {
        "model": args.model,
        "quick": quick,
        "max_new_tokens": max_new,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "generation": [],
    }
    answers = {}
    for b in batches:
        row, answers[b] = bench_generation(target, b, per_batch(b), max_new)
        result["generation"].append(row)
        print(f"generate@{b}: {row['generated_tokens_per_s']} tok/s", flush=True)
    # greedy agreement with batch 1 on the prompts batch 1 answered
    base = answers[min(batches)]
    result["greedy_vs_batch1"] = {
        str(b): {
            "prompts": len(base),
            "differ": sum(
                first_diff(x, y) is not None or len(x) != len(y) for x, y in zip(base, ans, strict=False)
            ),
        }
        for b, ans in answers.items()
        if b != min(batches)
    }
    result["padded_generate_baseline"] = bench_padded_generate(target, 8, per_batch(8), max_new)
    print(f"padded generate@8: {result['padded_generate_baseline']['tokens_per_s']} tok/s", flush=True)
    bf16 = load_target(args.model, dtype="bfloat16")
    b16 = 32 if 32 in batches else batches[-1]
    # bf16 matmuls are emulated on CPUs without AVX-512 BF16 / AMX: keep the bf16 runs small
    row, _ = bench_generation(bf16, b16, b16 if quick else per_batch(b16), 16 if quick else max_new)
    result["generation_bf16"] = row
    print(f"generate@{b16} bf16: {row['generated_tokens_per_s']} tok/s", flush=True)
    n_docs = 96 if quick else 1024
    result["teacher_forced"] = bench_teacher_forced(target, n_docs, 2048, torch.bfloat16)
    result["teacher_forced_bf16_target"] = bench_teacher_forced(bf16, n_docs // 4, 2048, torch.bfloat16)
    del bf16
    print(f"teacher-forced: {result['teacher_forced']['tokens_per_s']} tok/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["stores"] = bench_stores(target, Path(tmp), 32 if quick else 256, max_new)
    result["seconds"] = round(time.perf_counter() - t0, 1)

    table = [("path", "tok/s (wall)", "tokens / CPU-hour")]
    for r in result["generation"]:
        table.append(
            (
                f"generate@{r['batch']} (tokens store)",
                r["generate_only"]["tokens_per_s"],
                r["generate_only"]["tokens_per_cpu_hour"],
            )
        )
        table.append(
            (
                f"generate@{r['batch']} + hidden states",
                r["generate_plus_hidden"]["tokens_per_s"],
                r["generate_plus_hidden"]["tokens_per_cpu_hour"],
            )
        )
    g = result["padded_generate_baseline"]
    table.append(("model.generate@8 padded (before)", g["tokens_per_s"], g["tokens_per_cpu_hour"]))
    g = result["generation_bf16"]
    table.append(
        (
            f"generate@{g['batch']} bf16 target",
            g["generate_only"]["tokens_per_s"],
            g["generate_only"]["tokens_per_cpu_hour"],
        )
    )
    for key, name in (
        ("teacher_forced", "teacher-forced windows"),
        ("teacher_forced_bf16_target", "teacher-forced, bf16 target"),
    ):
        table.append((name, result[key]["tokens_per_s"], result[key]["tokens_per_cpu_hour"]))
    s = result["stores"]
    for key, name in (
        ("online_forward", "online recompute (forward)"),
        ("recompute", "tokens store + recompute"),
        ("read_from_disk", "hidden store read"),
    ):
        table.append((name, s[key]["tokens_per_s"], s[key]["tokens_per_cpu_hour"]))
    result["table"] = [dict(zip(table[0], row, strict=True)) for row in table[1:]]
    width = max(len(r[0]) for r in table)
    for r in table:
        print(f"{r[0]:<{width}}  {r[1]!s:>12}  {r[2]!s:>18}")
    print(f"bytes/token: hidden {s['hidden']['bytes_per_token']}, tokens {s['tokens']['bytes_per_token']}")
    print(f"greedy answers differing from batch 1: {result['greedy_vs_batch1']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
