"""The reference recipe: collect -> train -> eval an MTP head for the embedded SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/reference_recipe.py                      # all phases (~2 h on 2 cores)
    .venv/bin/python benchmarks/reference_recipe.py --phases eval --eval-prompts 3

Collection uses only ../shared/data/prompts (configs/recipe/collect_*.yaml); training
configs/recipe/train_mtp.yaml. Evaluation runs every set in ../shared/data/eval at K = 1..4, greedy
and T = 0.7, 256 new tokens, on the first --eval-prompts prompts of each set (the full 4 x 80 prompts
are ~10 CPU-hours here). Prints a markdown table and writes benchmarks/results/reference_recipe.json.
Each phase resumes: collection appends to its store, training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
EVAL_SETS = ("alpaca", "gsm8k", "qa", "sum")
TEMPERATURES = (0.0, 0.7)
RESULTS = REPO / "benchmarks" / "results" / "reference_recipe.json"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_collect(results: dict) -> None:
    from mtpkit.config import load_config
    from mtpkit.data.collect import CollectConfig, collect

    for name in ("collect_math", "collect_chat"):
        cfg = load_config(CollectConfig, REPO / "configs" / "recipe" / f"{name}.yaml", [])
        wall, cpu = time.perf_counter(), _cpu_seconds()
        summary = collect(cfg)
        results[name] = {
            "wall_s": time.perf_counter() - wall,
            "cpu_s": _cpu_seconds() - cpu,
            **{
                k: summary[k]
                for k in ("run_samples", "run_tokens", "run_generated_tokens", "store_loss_tokens")
            },
        }
        print(name, json.dumps(results[name]))


def run_train(results: dict) -> None:
    from mtpkit.config import load_config
    from mtpkit.train.config import TrainConfig
    from mtpkit.train.trainer import train

    cfg = load_config(TrainConfig, REPO / "configs" / "recipe" / "train_mtp.yaml", [])
    wall, cpu = time.perf_counter(), _cpu_seconds()
    train(cfg, resume=True)
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("split") == "eval"]
    results["train"] = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": _cpu_seconds() - cpu,
        "steps": cfg.max_steps,
        "final_eval": evals[-1] if evals else None,
    }
    print("train", json.dumps(results["train"]))


def run_eval(results: dict, n_prompts: int, head: str) -> None:
    from mtpkit.decode.evaluate import EvalConfig, evaluate
    from mtpkit.heads import head_dir, read_head_config
    from mtpkit.models import load_target

    target = load_target(read_head_config(head_dir(head))["target"]["model_id"])
    rows = []
    for temperature in TEMPERATURES:
        for name in EVAL_SETS:
            cfg = EvalConfig(
                head=head,
                prompts=[str(SHARED / "eval" / f"{name}.jsonl")],
                out=str(REPO / "runs" / "recipe-eval" / f"{name}-t{temperature}" / "report.json"),
                k=[1, 2, 3, 4],
                max_prompts=n_prompts,
                max_new_tokens=256,
                temperature=temperature,
                hf_baseline=temperature == 0,  # HF generate() runs greedy; one baseline per set is enough
            )
            report = evaluate(cfg, target)
            for r in report["sweep"]:
                rows.append(
                    {
                        "set": name,
                        "temperature": temperature,
                        "num_prompts": report["num_prompts"],
                        "base_tokens_per_s": report["base_tokens_per_s"],
                        "hf_generate_tokens_per_s": report["hf_generate_tokens_per_s"],
                        **{k: r[k] for k in r if k not in ("per_position_counts",)},
                    }
                )
            print(
                f"{name} T={temperature}: " + " ".join(f"K{r['k']} τ={r['tau']:.2f}" for r in report["sweep"])
            )
    results["eval"] = rows


def table(rows: list[dict]) -> str:
    lines = [
        "| set | T | K | τ | acc. rate | per-position | spec tok/s | plain tok/s | speedup | draft ms | verify ms | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = " ".join(f"{x:.2f}" for x in r["per_position"])
        same = f"{r['identical']}/{r['num_prompts']}" if r["identical"] is not None else "–"
        lines.append(
            f"| {r['set']} | {r['temperature']} | {r['k']} | {r['tau']:.2f} | {r['acceptance_rate']:.3f} | {per} | "
            f"{r['spec_tokens_per_s']:.1f} | {r['base_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['draft_ms_per_step']:.1f} | {r['verify_ms_per_step']:.1f} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="collect,train,eval")
    ap.add_argument("--eval-prompts", type=int, default=8, help="prompts per eval set (80 = the full sets)")
    ap.add_argument("--head", default="runs/recipe-mtp")
    args = ap.parse_args()
    os.chdir(REPO)  # the configs name ../shared and runs/ relative to the repository
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["machine"] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg(),
    }
    phases = args.phases.split(",")
    if "collect" in phases:
        run_collect(results)
    if "train" in phases:
        run_train(results)
    if "eval" in phases:
        run_eval(results, args.eval_prompts, args.head)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if results.get("eval"):
        print(table(results["eval"]))


if __name__ == "__main__":
    main()
