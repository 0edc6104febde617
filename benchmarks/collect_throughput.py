"""Throughput and storage cost of `mtpkit collect` on the embedded SmolLM2-135M-Instruct target.

Run from the repository root:

    .venv/bin/python benchmarks/collect_throughput.py

Three measurements, all on the same prompts (taken round-robin from the `--prompts` files):

1. Generation: generated tokens/s of `collect.generate_answers` (greedy) at each `--batch-sizes` value.
2. Teacher-forced hidden states: tokens/s of `collect.teacher_forced_hidden` (what collect runs,
   cast and copy to CPU included) against a plain `target.model(...)` forward over identically
   right-padded batches of the prompt + answer sequences from step 1. Methods are interleaved
   over `--rounds` rounds and the median is reported. Goal: ratio (a)/(b) >= 0.9.
3. Storage: bytes on disk per stored token of a real `collect` run into a temporary store,
   against the goal 2 * hidden * n_layers + 4 (int32 id) + 1 (uint8 mask).

Prints a table and writes every number plus machine info to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from mtpkit.data import chat
from mtpkit.data.collect import CollectConfig, collect, generate_answers, teacher_forced_hidden
from mtpkit.data.prompts import Prompt, load_prompts
from mtpkit.models import EMBEDDED_ALIAS, Target, load_target

REPO = Path(__file__).resolve().parent.parent
PROMPTS_DIR = REPO.parent / "shared" / "data" / "prompts"
DEFAULT_PROMPTS = [PROMPTS_DIR / "vicuna_bench.jsonl", PROMPTS_DIR / "gsm8k_train.jsonl"]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "collect_throughput.json"
MULTI_LAYERS = [2, 15, 27, 30]  # EAGLE-3-style low / mid / high + final
RATIO_GOAL = 0.9
STORE_DTYPE = torch.bfloat16


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_ALIAS)
    p.add_argument(
        "--prompts",
        nargs="+",
        type=Path,
        default=DEFAULT_PROMPTS,
        help="prompt files; prompts are taken round-robin across them",
    )
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--batch-sizes", type=int_list, default=[1, 4, 8], help="generation batch sizes, e.g. 1,4,8"
    )
    p.add_argument("--tf-batch-size", type=int, default=4, help="sequences per teacher-forced batch")
    p.add_argument("--multi-layers", type=int_list, default=MULTI_LAYERS)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median is reported)")
    p.add_argument(
        "--bytes-tolerance",
        type=float,
        default=0.01,
        help="storage goal met when bytes/token <= goal * (1 + tolerance) (manifest, headers, offsets)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if args.num_prompts < 1 or args.rounds < 1 or args.tf_batch_size < 1 or not args.batch_sizes:
        p.error("--num-prompts, --rounds and --tf-batch-size must be >= 1, --batch-sizes non-empty")
    return args


# ---------------------------------------------------------------------------- helpers
def pick_prompts(paths: list[Path], n: int) -> list[Prompt]:
    """The first `n` prompts taken round-robin over the files, so every source is represented."""
    per_file = [load_prompts([path]) for path in paths]
    picked: list[Prompt] = []
    for i in range(max(len(ps) for ps in per_file)):
        for ps in per_file:
            if i < len(ps) and len(picked) < n:
                picked.append(ps[i])
    return picked


def write_prompts(prompts: list[Prompt], path: Path) -> None:
    """The picked prompts as a `turns`-format JSONL, so `collect` sees exactly the same ones."""
    with open(path, "w", encoding="utf-8") as f:
        for prompt in prompts:
            record: dict = {"turns": list(prompt.turns)}
            if prompt.system is not None:
                record["system"] = prompt.system
            f.write(json.dumps(record) + "\n")


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def right_pad(target: Target, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same right padding `teacher_forced_hidden` builds for a batch that fits its budget."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), target.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    return ids.to(target.device), mask.to(target.device)


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


# ---------------------------------------------------------------------------- 1. generation
def bench_generation(
    target: Target, prompt_ids: list[list[int]], batch_sizes: list[int], max_new_tokens: int, rounds: int
) -> tuple[list[dict], list[list[int]]]:
    """Median generated tokens/s per batch size; also returns the batch-1 answers."""
    generate_answers(target, prompt_ids[:1], 4)  # warm-up: first-call allocations and lazy init
    answers: dict[int, list[list[int]]] = {}
    seconds: dict[int, list[float]] = {bs: [] for bs in batch_sizes}
    for r in range(rounds):
        order = batch_sizes if r % 2 == 0 else batch_sizes[::-1]
        for bs in order:
            start = time.perf_counter()
            out = [
                a for batch in chunks(prompt_ids, bs) for a in generate_answers(target, batch, max_new_tokens)
            ]
            seconds[bs].append(time.perf_counter() - start)
            answers.setdefault(bs, out)
    reference = answers[1] if 1 in answers else answers[batch_sizes[0]]
    rows = []
    for bs in batch_sizes:
        tokens = sum(len(a) for a in answers[bs])
        secs = statistics.median(seconds[bs])
        rows.append(
            {
                "batch_size": bs,
                "generated_tokens": tokens,
                "seconds_median": round(secs, 3),
                "seconds_min": round(min(seconds[bs]), 3),
                "seconds_all": [round(s, 3) for s in seconds[bs]],
                "tokens_per_s": round(tokens / secs, 1),
                "answers_equal_to_reference": sum(
                    a == b for a, b in zip(answers[bs], reference, strict=True)
                ),
            }
        )
    base = next((r for r in rows if r["batch_size"] == 1), rows[0])
    for row in rows:
        row["ratio_vs_bs1"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
    return rows, reference


# ---------------------------------------------------------------------------- 2. teacher forcing
def bench_teacher_forced(
    target: Target, sequences: list[list[int]], batch_size: int, multi_layers: list[int], rounds: int
) -> list[dict]:
    """Interleaved, repeated timings of each method over the same right-padded batches."""
    batches = chunks(sequences, batch_size)
    padded = [right_pad(target, b) for b in batches]
    final = [target.num_layers]

    def tf(layers: list[int]) -> Callable[[], object]:
        return lambda: [
            teacher_forced_hidden(target, b, layers, STORE_DTYPE, forward_tokens=16384) for b in batches
        ]

    @torch.no_grad()
    def plain() -> None:
        for ids, mask in padded:
            target.model(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def backbone() -> None:
        for ids, mask in padded:
            target.backbone(input_ids=ids, attention_mask=mask, use_cache=False)

    methods: dict[str, tuple[str, Callable[[], object]]] = {
        "plain": ("(b) target.model forward (logits)", plain),
        "tf_final": (f"(a) teacher_forced_hidden {final}", tf(final)),
        "tf_multi": (f"    teacher_forced_hidden {multi_layers}", tf(multi_layers)),
        "backbone": ("    backbone forward, no LM head", backbone),
    }
    for _, fn in methods.values():  # warm-up
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in methods}
    keys = list(methods)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate the order every round
            seconds[k].append(timed(methods[k][1]))

    real_tokens = sum(len(s) for s in sequences)
    padded_tokens = sum(ids.numel() for ids, _ in padded)
    plain_secs = statistics.median(seconds["plain"])
    rows = []
    for k, (label, _) in methods.items():
        secs = statistics.median(seconds[k])
        rows.append(
            {
                "method": k,
                "label": label,
                "tokens": real_tokens,
                "padded_tokens": padded_tokens,
                "seconds_median": round(secs, 4),
                "seconds_min": round(min(seconds[k]), 4),
                "seconds_all": [round(s, 4) for s in seconds[k]],
                "tokens_per_s": round(real_tokens / secs, 1),
                "ratio_vs_plain": round(plain_secs / secs, 3),
            }
        )
    return rows


# ---------------------------------------------------------------------------- 3. storage
def bench_storage(
    target: Target, args: argparse.Namespace, prompts_file: Path, layer_sets: list[list[int]], workdir: Path
) -> list[dict]:
    rows = []
    for layers in layer_sets:
        out = workdir / ("store-" + "-".join(map(str, layers)))
        cfg = CollectConfig(
            model=args.model,
            prompts=[str(prompts_file)],
            out=str(out),
            max_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens,
            layers=layers,
            progress=False,
        )
        summary = collect(cfg, target=target)
        shard_bytes = sum(f.stat().st_size for f in out.glob("shard-*.safetensors"))
        tokens = summary["store_tokens"]
        goal = STORE_DTYPE.itemsize * target.hidden_size * len(layers) + 4 + 1
        measured = summary["store_bytes"] / tokens
        rows.append(
            {
                "layers": layers,
                "store_samples": summary["store_samples"],
                "store_tokens": tokens,
                "store_bytes": summary["store_bytes"],
                "shard_bytes": shard_bytes,
                "bytes_per_token": round(measured, 2),
                "shard_bytes_per_token": round(shard_bytes / tokens, 2),
                "summary_bytes_per_token": summary["bytes_per_token"],
                "goal_bytes_per_token": goal,
                "overhead_pct": round(100 * (measured / goal - 1), 3),
                "goal_met": measured <= goal * (1 + args.bytes_tolerance),
                "collect_seconds": summary["run_seconds"],
                "collect_stored_tokens_per_s": summary["run_tokens_per_s"],
                "collect_generated_tokens_per_s": summary["run_generated_tokens_per_s"],
            }
        )
    return rows


# ---------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    if load_start[0] >= 1.0:
        print(f"warning: load average {load_start[0]:.2f} before start; other processes will skew timings")
    target = load_target(args.model)
    target.check_layers(args.multi_layers)
    prompts = pick_prompts(args.prompts, args.num_prompts)
    prompt_ids = [chat.start(target.tokenizer, p).ids for p in prompts]
    print(
        f"model {args.model}: {target.num_layers} layers, hidden {target.hidden_size}; "
        f"{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, rounds {args.rounds}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads\n"
    )

    gen_rows, answers = bench_generation(
        target, prompt_ids, args.batch_sizes, args.max_new_tokens, args.rounds
    )
    best = max(gen_rows, key=lambda r: r["tokens_per_s"])
    print("1. generation (greedy, collect.generate_answers)")
    print(
        table(
            ["batch", "gen tokens", "seconds", "tokens/s", "vs bs1", "same answers"],
            [
                [
                    r["batch_size"],
                    r["generated_tokens"],
                    f"{r['seconds_median']:.2f}",
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['ratio_vs_bs1']:.2f}x",
                    f"{r['answers_equal_to_reference']}/{len(answers)}",
                ]
                for r in gen_rows
            ],
        )
    )
    print(f"best batch size: {best['batch_size']} ({best['ratio_vs_bs1']:.2f}x batch 1)\n")

    sequences = [p + a for p, a in zip(prompt_ids, answers, strict=True)]
    tf_rows = bench_teacher_forced(target, sequences, args.tf_batch_size, args.multi_layers, args.rounds)
    ratio = next(r["ratio_vs_plain"] for r in tf_rows if r["method"] == "tf_final")
    print(
        f"2. teacher-forced forward ({len(sequences)} sequences, batches of {args.tf_batch_size}, "
        f"{tf_rows[0]['tokens']} tokens / {tf_rows[0]['padded_tokens']} padded, bf16 copy to CPU)"
    )
    print(
        table(
            ["method", "seconds", "tokens/s", "vs (b)"],
            [
                [
                    r["label"],
                    f"{r['seconds_median']:.3f}",
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['ratio_vs_plain']:.2f}",
                ]
                for r in tf_rows
            ],
        )
    )
    print(
        f"ratio (a)/(b) = {ratio:.2f}, goal >= {RATIO_GOAL}: {'met' if ratio >= RATIO_GOAL else 'NOT met'}\n"
    )

    with tempfile.TemporaryDirectory(prefix="mtpkit-bench-") as tmp:
        prompts_file = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts, prompts_file)
        store_rows = bench_storage(
            target, args, prompts_file, [[target.num_layers], args.multi_layers], Path(tmp)
        )
    print(f"3. storage (collect into a temp store, {STORE_DTYPE} hidden states)")
    print(
        table(
            ["layers", "tokens", "bytes on disk", "bytes/token", "goal", "overhead", "met", "collect tok/s"],
            [
                [
                    str(r["layers"]),
                    r["store_tokens"],
                    f"{r['store_bytes']:,}",
                    f"{r['bytes_per_token']:.2f}",
                    r["goal_bytes_per_token"],
                    f"{r['overhead_pct']:+.2f}%",
                    "yes" if r["goal_met"] else "NO",
                    f"{r['collect_stored_tokens_per_s']:.0f}",
                ]
                for r in store_rows
            ],
        )
    )
    print(f"(goal = 2 * {target.hidden_size} * n_layers + 4 + 1; met within {args.bytes_tolerance:.0%})")

    load_end = os.getloadavg()
    if load_end[0] > torch.get_num_threads() + 0.5:
        print(
            f"warning: load average {load_end[0]:.2f} at the end exceeds the {torch.get_num_threads()} "
            "threads this run uses; other processes competed for the CPU, so timings are unreliable"
        )
    result = {
        "benchmark": "collect_throughput",
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": load_end},
        "config": {
            "model": args.model,
            "num_layers": target.num_layers,
            "hidden_size": target.hidden_size,
            "model_dtype": str(next(target.model.parameters()).dtype),
            "prompts": [str(p) for p in args.prompts],
            "prompt_sources": [p.source for p in prompts],
            "num_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "batch_sizes": args.batch_sizes,
            "tf_batch_size": args.tf_batch_size,
            "multi_layers": args.multi_layers,
            "rounds": args.rounds,
            "store_dtype": str(STORE_DTYPE),
        },
        "generation": {
            "rows": gen_rows,
            "best_batch_size": best["batch_size"],
            "best_ratio_vs_bs1": best["ratio_vs_bs1"],
        },
        "teacher_forced": {
            "rows": tf_rows,
            "ratio": ratio,
            "goal": RATIO_GOAL,
            "goal_met": ratio >= RATIO_GOAL,
        },
        "storage": {"rows": store_rows, "tolerance": args.bytes_tolerance},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['total_seconds']} s total)")


if __name__ == "__main__":
    main()
