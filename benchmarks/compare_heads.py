"""All draft-head families on one target, one store, one training budget, one eval harness.

    .venv/bin/python benchmarks/compare_heads.py --store runs/recipe-store --steps 300 \
        --k 1 2 4 --max-prompts 3 --max-new-tokens 64 --target-dtype bfloat16

1. Collects (or reuses) a store from the training prompts with the layers every family reads:
   EAGLE-3's low / middle / high layers plus the final state.
2. `--phases train`: trains each variant with the same steps x token budget, seed, data order
   and held-out split (`--steps`, `--token-budget`), timed in CPU seconds of this process.
   Variants that differ only in an inference option (diffusion S) share one training run.
3. `--phases eval`: runs `mtpkit eval` (greedy, plain decoding as the baseline, interleaved per
   prompt) on every eval set (`--eval`), and reports per variant: trainable parameters, τ,
   per-position acceptance, draft and verify ms per step, speedup, and whether the output was
   identical. Either phase alone reuses what the other left in `--runs`.

Prints a table and writes benchmarks/results/compare_heads.{json,md,png} (`--out`).
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
from mtpkit.decode.evaluate import EvalConfig, evaluate
from mtpkit.heads import load_head
from mtpkit.heads.eagle3 import default_layers
from mtpkit.models import EMBEDDED_ALIAS, load_target
from mtpkit.train.config import TrainConfig
from mtpkit.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
TRAIN_FILES = [
    "gsm8k_train.jsonl",
    "vicuna_bench.jsonl",
    "self_instruct_user_oriented.jsonl",
    "arena_hard_v2.jsonl",
]
# Training runs: name -> (head type, head config).
RUNS = {
    "mtp_D1": ("mtp", {"num_depths": 1, "train_depths": 4}),
    "mtp_D2": ("mtp", {"num_depths": 2, "train_depths": 4}),
    "mtp_D3": ("mtp", {"num_depths": 3, "train_depths": 4}),
    "eagle3": ("eagle3", {"ttt_steps": 4}),
    "medusa": ("medusa", {"num_heads": 4}),
    "diffusion_L4": ("diffusion", {"block_length": 4}),
    "diffusion_L8": ("diffusion", {"block_length": 8}),
}
# Variants: name -> (training run, most draft tokens it can make or None, eval-time options).
VARIANTS = {
    "mtp D=1": ("mtp_D1", None, {}),
    "mtp D=2": ("mtp_D2", None, {}),
    "mtp D=3": ("mtp_D3", None, {}),
    "eagle3": ("eagle3", None, {}),
    "medusa": ("medusa", 4, {}),
    "diffusion L=4 S=1": ("diffusion_L4", 4, {"denoising_steps": 1}),
    "diffusion L=4 S=2": ("diffusion_L4", 4, {"denoising_steps": 2}),
    "diffusion L=8 S=1": ("diffusion_L8", 8, {"denoising_steps": 1}),
    "diffusion L=8 S=2": ("diffusion_L8", 8, {"denoising_steps": 2}),
}


def ensure_store(args, target) -> list[int]:
    layers = sorted({*default_layers(target.num_layers), target.num_layers})
    if not (args.store / "manifest.json").exists():
        collect(
            CollectConfig(
                model=args.model,
                prompts=[str(p) for p in args.train_prompts],
                out=str(args.store),
                layers=layers,
                max_prompts=args.prompts_count,
                max_new_tokens=args.collect_new_tokens,
                shuffle=True,
                max_length=1024,
                progress=args.progress,
            ),
            target,
        )
    return layers


def train_run(args, target, run: str) -> dict:
    """Train one run into args.runs/run and record what the comparison reports about it."""
    head_type, head_cfg = RUNS[run]
    out = args.runs / run
    shutil.rmtree(out, ignore_errors=True)
    cfg = from_dict(
        TrainConfig,
        {
            "out": str(out),
            "head_type": head_type,
            "head": head_cfg,
            "precision": args.precision,
            "max_steps": args.steps,
            "eval_every": args.steps,
            "save_every": args.steps,
            "seed": 0,
            "progress": args.progress,
            "data": {"store": str(args.store), "token_budget": args.token_budget, "max_seq_len": 1024},
            "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 10)},
        },
    )
    torch.manual_seed(0)
    cpu0 = time.process_time()
    result = train(cfg, target=target)
    train_cpu_s = time.process_time() - cpu0
    head = load_head(result["head"], target)
    summary = {
        "head_type": head_type,
        "head": head_cfg,
        "head_dir": result["head"],
        "params": sum(p.numel() for p in head.parameters()),
        "budget": budget_text(args),
        "train_cpu_s": round(train_cpu_s, 1),
        "train_tokens": result["tokens_seen"],
        "sim_tau": {k: v for k, v in result["eval"].items() if k.startswith("sim_tau")},
    }
    (out / "compare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{run}: {summary['params'] / 1e6:.2f}M params, trained in {train_cpu_s:.0f} CPU-s", flush=True)
    return summary


def eval_variant(args, target, name: str, summary: dict) -> dict:
    run, max_k, options = VARIANTS[name]
    ks = sorted({min(k, max_k or k) for k in args.k})
    per_set = {}
    for prompts in args.eval:
        report = evaluate(
            EvalConfig(
                head=summary["head_dir"],
                prompts=[str(prompts)],
                out=str(args.runs / run / f"eval_{slug(name)}_{args.target_dtype}_{Path(prompts).stem}.json"),
                k=ks,
                max_prompts=args.max_prompts,
                max_new_tokens=args.max_new_tokens,
                hf_baseline=False,
                progress=False,
                **options,
            ),
            target,
        )
        per_set[Path(prompts).stem] = {
            r["k"]: {
                key: r[key]
                for key in (
                    "tau",
                    "per_position",
                    "speedup",
                    "decode_speedup",
                    "draft_ms_per_step",
                    "verify_ms_per_step",
                    "identical",
                )
            }
            | {key: report[key] for key in ("num_prompts", "plain_ms_per_token", "plain_decode_ms_per_token")}
            for r in report["sweep"]
        }
    row = {"variant": name, **{k: v for k, v in summary.items() if k != "head_dir"}, "eval": per_set}
    print(f"{name}: evaluated on {len(per_set)} sets", flush=True)
    return row


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("=", "")


def budget_text(args) -> str:
    return f"{args.steps} steps x {args.token_budget}-token batches, lr {args.lr}, {args.precision}"


def mean_over_sets(row: dict, k: int, key: str) -> float | None:
    vals = [s[k][key] for s in row["eval"].values() if k in s and s[k][key] is not None]
    return sum(vals) / len(vals) if vals else None


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | params | train CPU-min | K | τ | per-position | draft ms/step | verify ms/step | speedup | decode-only speedup | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for k in sorted({k for s in r["eval"].values() for k in s}):
            sets = [s[k] for s in r["eval"].values() if k in s]
            per = [sum(x) / len(sets) for x in zip(*(s["per_position"] for s in sets), strict=True)]
            same = sum(s["identical"] for s in sets)
            total = sum(s["num_prompts"] for s in sets)
            decode = mean_over_sets(r, k, "decode_speedup")
            decode = "–" if decode is None else f"{decode:.2f}x"  # none with 1 new token per prompt
            lines.append(
                f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['train_cpu_s'] / 60:.1f} | {k} | "
                f"{mean_over_sets(r, k, 'tau'):.2f} | {' '.join(f'{x:.2f}' for x in per)} | "
                f"{mean_over_sets(r, k, 'draft_ms_per_step'):.1f} | {mean_over_sets(r, k, 'verify_ms_per_step'):.1f} | "
                f"{mean_over_sets(r, k, 'speedup'):.2f}x | {decode} | "
                f"{same}/{total} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """τ against draft cost per step, one line per variant over K: acceptance bought per ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ks = sorted({k for s in r["eval"].values() for k in s})
        xs = [mean_over_sets(r, k, "draft_ms_per_step") for k in ks]
        ys = [mean_over_sets(r, k, "tau") for k in ks]
        ax.plot(xs, ys, marker="o", label=r["variant"])
        for k, x, y in zip(ks, xs, ys, strict=True):
            ax.annotate(f"K={k}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set(xlabel="draft ms per step", ylabel="τ (mean over eval sets)", title="Acceptance vs draft cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_ALIAS)
    p.add_argument("--store", type=Path, default=REPO / "runs" / "heads-store")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "compare-heads")
    p.add_argument(
        "--train-prompts", type=Path, nargs="+", default=[SHARED / "prompts" / f for f in TRAIN_FILES]
    )
    p.add_argument("--eval", type=Path, nargs="+", default=sorted((SHARED / "eval").glob("*.jsonl")))
    p.add_argument("--prompts-count", type=int, default=240)
    p.add_argument("--collect-new-tokens", type=int, default=128)
    p.add_argument("--phases", nargs="+", choices=["train", "eval"], default=["train", "eval"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--token-budget", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--max-prompts", type=int, default=4, help="per eval set")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--target-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype the target verifies (and plain-decodes) in during eval; training always loads float32",
    )
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compare_heads.json")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    runs = list(dict.fromkeys(VARIANTS[v][0] for v in variants))

    target = load_target(args.model)
    layers = ensure_store(args, target)
    if "train" in args.phases:
        for run in runs:
            train_run(args, target, run)
    if "eval" not in args.phases:
        return {"layers": layers, "runs": runs}
    summaries = {}
    for run in runs:
        path = args.runs / run / "compare_summary.json"
        if not path.is_file():
            p.error(f"{path} is missing: run --phases train for {run} first")
        summaries[run] = json.loads(path.read_text())
    if args.target_dtype != "float32":
        target = load_target(args.model, dtype=args.target_dtype)
    rows = [eval_variant(args, target, v, summaries[VARIANTS[v][0]]) for v in variants]
    budgets = sorted({s["budget"] for s in summaries.values()})
    md = table(rows)
    print(
        f"\n{args.model}; budget: {'; '.join(budgets)}; target {args.target_dtype}; eval: {len(args.eval)} sets x "
        f"{args.max_prompts} prompts, {args.max_new_tokens} new tokens, greedy\n\n{md}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    doc = {
        "benchmark": "compare_heads",
        "model": args.model,
        "budget": "; ".join(budgets),
        "target_dtype": args.target_dtype,
        "eval": {"sets": [Path(e).stem for e in args.eval], "max_prompts": args.max_prompts,
                 "max_new_tokens": args.max_new_tokens, "k": args.k},
        "machine": meta,
        "layers": layers,
        "rows": rows,
    }  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
