"""MTP head training on the embedded SmolLM2-135M-Instruct: throughput and held-out accuracy.

Run from the repository root:

    .venv/bin/python benchmarks/train_mtp.py

1. Collects (or resumes collecting) a store from the training prompts in ../shared/data/prompts
   (never ../shared/data/eval): `--prompts-count` prompts, shuffled, greedy, `--max-new-tokens`.
2. Trains one head per variant for the same fixed budget (`--steps` x `--token-budget`) on the
   same data, seed and held-out split: D = 1 (repeated-layer mode over 3 steps) and D = 3, each
   from random and from last-layer initialisation.
3. Reports training tokens/s (loss-masked tokens per wall second), held-out per-depth top-1
   accuracy and the teacher-forced chain-acceptance estimate τ at K = 1..4.

Prints a table and writes JSON to benchmarks/results/train_mtp.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from mtpkit.config import from_dict
from mtpkit.data.collect import CollectConfig, collect
from mtpkit.models import EMBEDDED_ALIAS, load_target
from mtpkit.train.config import TrainConfig
from mtpkit.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO.parent / "shared" / "data" / "prompts"
TRAIN_FILES = [
    "gsm8k_train.jsonl",
    "vicuna_bench.jsonl",
    "self_instruct_user_oriented.jsonl",
    "arena_hard_v2.jsonl",
]
VARIANTS = {
    "D=1 random": {"num_depths": 1, "train_depths": 3, "init": "random"},
    "D=1 last-layer": {"num_depths": 1, "train_depths": 3, "init": "last_layer"},
    "D=3 random": {"num_depths": 3, "train_depths": 3, "init": "random"},
    "D=3 last-layer": {"num_depths": 3, "train_depths": 3, "init": "last_layer"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=REPO / "runs" / "bench-store")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-train")
    p.add_argument("--prompts-count", type=int, default=240)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--token-budget", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_mtp.json")
    args = p.parse_args()

    target = load_target(EMBEDDED_ALIAS)
    t0 = time.perf_counter()
    summary = collect(
        CollectConfig(
            model=EMBEDDED_ALIAS,
            prompts=[str(PROMPTS / f) for f in TRAIN_FILES],
            out=str(args.store),
            max_prompts=args.prompts_count,
            max_new_tokens=args.max_new_tokens,
            batch_size=8,
            shuffle=True,
            seed=0,
            max_length=1024,
        ),
        target,
    )
    collect_s = time.perf_counter() - t0
    print(
        f"store: {summary['store_samples']} samples, {summary['store_loss_tokens']} answer tokens "
        f"({collect_s:.0f} s this run)"
    )

    rows = []
    for name in args.variants.split(","):
        run = args.runs / name.replace(" ", "_").replace("=", "")
        shutil.rmtree(run, ignore_errors=True)
        cfg = from_dict(
            TrainConfig,
            {
                "out": str(run),
                "head": VARIANTS[name],
                "precision": args.precision,
                "max_steps": args.steps,
                "eval_every": args.steps,
                "save_every": args.steps,
                "log_every": 10,
                "seed": 0,
                "data": {
                    "store": str(args.store),
                    "token_budget": args.token_budget,
                    "eval_fraction": 0.08,
                    "eval_max_samples": 32,
                    "max_seq_len": 1024,
                },
                "optim": {"lr": args.lr, "warmup_steps": 10},
            },
        )
        torch.manual_seed(0)
        start = time.perf_counter()
        result = train(cfg, target=target)
        seconds = time.perf_counter() - start
        ev = result["eval"]
        rows.append(
            {
                "variant": name,
                **VARIANTS[name],
                "steps": result["step"],
                "train_tokens": result["tokens_seen"],
                "seconds": round(seconds, 1),
                "train_tokens_per_s": round(result["tokens_seen"] / seconds, 1),
                **{k: round(v, 4) for k, v in ev.items()},
            }
        )
        print(
            f"{name}: {rows[-1]['train_tokens_per_s']} tok/s, acc {[rows[-1].get(f'acc_d{k}') for k in (1, 2, 3)]}"
        )

    header = ["variant", "tok/s", "acc d1", "acc d2", "acc d3", "τ K=1", "τ K=2", "τ K=3", "τ K=4"]
    keys = [
        "train_tokens_per_s",
        "acc_d1",
        "acc_d2",
        "acc_d3",
        "sim_tau_k1",
        "sim_tau_k2",
        "sim_tau_k3",
        "sim_tau_k4",
    ]
    print()
    print(" | ".join(f"{h:>14}" if i == 0 else f"{h:>8}" for i, h in enumerate(header)))
    for r in rows:
        print(" | ".join([f"{r['variant']:>14}"] + [f"{r.get(k, float('nan')):>8.3f}" for k in keys]))
    budget = f"{args.steps} steps x {args.token_budget}-token batches, lr {args.lr}, {args.precision}"
    print(f"\nbudget: {budget}; held-out: {rows[0] and 'eval split of the store'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "train_mtp",
                "machine": {
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                },
                "store": {k: summary[k] for k in ("store_samples", "store_tokens", "store_loss_tokens")},
                "collect_seconds_this_run": round(collect_s, 1),
                "budget": budget,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
