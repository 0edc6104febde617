"""The reference recipe v2: collect -> train -> evaluate an EAGLE-3 head for the embedded
SmolLM2-135M-Instruct, within a CPU budget (docs/recipe.md).

    .venv/bin/python benchmarks/reference_recipe.py                          # all phases
    .venv/bin/python benchmarks/reference_recipe.py --collect-minutes 10     # a smaller budget
    .venv/bin/python benchmarks/reference_recipe.py --phases report --protocol benchmarks/results/eval_protocol.json

Collection answers only ../shared/data/prompts (configs/recipe/collect_all.yaml) for
--collect-minutes; training runs configs/recipe/train_eagle3.yaml; evaluation is the full
protocol (benchmarks/eval_protocol.py: every prompt of ../shared/data/eval, K = 1..4, greedy, 256
new tokens, τ by replay with 95% CIs, the engine on a timing subset for speedup). `report` writes
benchmarks/results/reference_recipe.json from a finished protocol run plus the store's and the
training run's own records (collect and train CPU-seconds), without rerunning anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "reference_recipe.json"
PROTOCOL = REPO / "benchmarks" / "results" / "eval_protocol.json"
COLLECT = REPO / "configs" / "recipe" / "collect_all.yaml"
TRAIN = REPO / "configs" / "recipe" / "train_eagle3.yaml"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_collect(store: str, minutes: float) -> dict:
    from mtpkit.config import load_config
    from mtpkit.data.collect import CollectConfig, collect

    cfg = load_config(CollectConfig, COLLECT, [f"out={store}", f"max_minutes={minutes}"])
    wall, cpu = time.perf_counter(), _cpu_seconds()
    summary = collect(cfg)
    keys = ("run_samples", "run_tokens", "run_generated_tokens", "store_tokens", "store_loss_tokens")
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": _cpu_seconds() - cpu,
        **{k: summary[k] for k in keys},
    }


def run_train(store: str, out: str, steps: int | None) -> dict:
    from mtpkit.config import load_config
    from mtpkit.train.config import TrainConfig
    from mtpkit.train.trainer import train

    overrides = [f"data.store={store}", f"out={out}"] + ([f"max_steps={steps}"] if steps else [])
    cfg = load_config(TrainConfig, TRAIN, overrides)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    train(cfg, resume=True)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": _cpu_seconds() - cpu, "steps": cfg.max_steps}


def report(protocol: dict, store: Path, run: Path, costs: dict) -> dict:
    """reference_recipe.json: per set and K τ, CI, per-position and speedup from the protocol run,
    the mean over sets, and what the data and the head cost."""
    manifest = json.loads((store / "manifest.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m.get("split") == "eval"]
    ks = protocol["k"]
    sets = {
        name: {
            k: {
                "tau": s["k"][k]["tau"],
                "tau_ci": s["k"][k]["tau_ci"],
                "per_position": s["k"][k]["per_position"],
                "speedup_timing_subset": s["k"][k]["speedup_timing_subset"],
            }
            for k in map(str, ks)
        }
        for name, s in protocol["sets"].items()
    }
    mean = {str(k): sum(s[str(k)]["tau"] for s in sets.values()) / len(sets) for k in ks}
    depth1 = sum(s["1"]["per_position"][0] for s in sets.values()) / len(sets)
    return {
        "head": protocol["head"],
        "store": {
            "samples": manifest["num_samples"],
            "tokens": manifest["num_tokens"],
            "loss_tokens": manifest["num_loss_tokens"],
            "jobs": {
                k: {f: v[f] for f in ("samples", "tokens", "generated_tokens")}
                for k, v in manifest["jobs"].items()
            },
        },
        "train": {"steps": evals[-1]["step"] if evals else None, "final_eval": evals[-1] if evals else None},
        "costs": costs,
        "eval_protocol": str(PROTOCOL.relative_to(REPO)),
        "sets": sets,
        "mean_tau_over_sets": mean,
        "mean_depth1_acceptance": depth1,
        "targets": {"tau_k3": 2.0, "depth1_acceptance": 0.55},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="collect,train,eval,report")
    ap.add_argument("--store", default="runs/recipe2-store")
    ap.add_argument("--run", default="runs/recipe2-eagle3")
    ap.add_argument("--collect-minutes", type=float, default=28.0)
    ap.add_argument("--steps", type=int, help="training steps (default: the config's)")
    ap.add_argument("--protocol", default=str(PROTOCOL), help="the eval protocol's JSON (eval writes it)")
    ap.add_argument(
        "--costs", help="JSON of measured collect / train costs of a run made outside this script"
    )
    args = ap.parse_args()
    os.chdir(REPO)  # the configs name ../shared and runs/ relative to the repository
    phases = args.phases.split(",")
    costs = json.loads(Path(args.costs).read_text()) if args.costs else {}
    if "collect" in phases:
        costs["collect"] = run_collect(args.store, args.collect_minutes)
        print("collect", json.dumps(costs["collect"]), flush=True)
    if "train" in phases:
        costs["train"] = run_train(args.store, args.run, args.steps)
        print("train", json.dumps(costs["train"]), flush=True)
    if "eval" in phases:
        cmd = [sys.executable, "benchmarks/eval_protocol.py", "--head", args.run, "--out", args.protocol]
        subprocess.run(cmd, check=True)
    if "report" in phases:
        result = report(json.loads(Path(args.protocol).read_text()), Path(args.store), Path(args.run), costs)
        result["machine"] = {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print("| K | " + " | ".join(result["sets"]) + " | mean |")
        print("|---|" + "---|" * (len(result["sets"]) + 1))
        for k, m in result["mean_tau_over_sets"].items():
            cells = [f"{s[k]['tau']:.2f}" for s in result["sets"].values()]
            print(f"| {k} | " + " | ".join(cells) + f" | {m:.2f} |")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
