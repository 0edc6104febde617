"""Distributed head training on this CPU: throughput of 1 vs 2 processes, memory per rank at tp = 2.

Run from the repository root (it loads the real model, so take the machine-wide lock):

    flock /tmp/mtpkit-heavy.lock .venv/bin/python benchmarks/distributed_scaling.py --store runs/bench-store

1. Throughput: the same workload (an MTP head, D = 1, on SmolLM2-135M-Instruct's hidden states
   from a `collect` store; same global batches, same seed) trained by one process with 1 and 2
   threads, and by two gloo processes with 1 thread each, the head sharded with FSDP2 or
   replicated. Loss-masked tokens per second over the steps after the first `--warmup` steps.
2. Memory: online mode (the target runs in the loop on windows of a text corpus) in one
   process, and in two processes with the target tensor-parallel (tp = 2, each rank loading
   only its shards); peak RSS per rank, RSS at the end, and the target's parameter bytes per rank.

Prints tables and writes JSON to benchmarks/results/distributed_scaling.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, cfg_dict: dict, report: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(threads)
    from mtpkit.config import from_dict
    from mtpkit.train import trainer as trainer_mod
    from mtpkit.train.config import TrainConfig

    target_bytes = {}
    real = trainer_mod.load_parallel_target

    def measured(spec, par):  # the target's parameter bytes this rank holds
        target = real(spec, par)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in target.model.parameters()]
        target_bytes["after"] = sum(t.numel() * t.element_size() for t in local)
        return target

    trainer_mod.load_parallel_target = measured
    start = time.perf_counter()
    trainer_mod.train(from_dict(TrainConfig, cfg_dict))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    status = Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]
    Path(f"{report}.rank{rank}").write_text(
        json.dumps(
            {
                "peak_rss_mib": rss,
                "end_rss_mib": int(status) / 1024,
                "target_mib": target_bytes["after"] / 2**20,
                "wall_s": time.perf_counter() - start,
            }
        )
    )


def launch(world: int, threads: int, cfg: dict) -> list[dict]:
    run = Path(cfg["out"])
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    report = str(run) + ".report"
    mp.spawn(_worker, args=(world, _free_port(), threads, cfg, report), nprocs=world, join=True)
    return [json.loads(Path(f"{report}.rank{r}").read_text()) for r in range(world)]


def steady_tokens_per_s(run: Path, warmup: int) -> float:
    """Tokens / seconds over the logged steps after `warmup` (each record covers one step)."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["split"] == "train"]
    pairs = [(a, b) for a, b in itertools.pairwise(recs) if b["step"] > warmup]
    tokens = sum(b["tokens"] - a["tokens"] for a, b in pairs)
    return tokens / sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--store", type=Path, default=REPO / "runs" / "bench-store", help="a SmolLM2 collect store"
    )
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-dist")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--token-budget", type=int, default=1024)
    p.add_argument("--online-steps", type=int, default=4)
    p.add_argument("--online-only", action="store_true", help="keep --out's throughput rows, redo memory")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "distributed_scaling.json")
    args = p.parse_args()
    if not (args.store / "manifest.json").is_file():
        raise SystemExit(
            f"{args.store}: no store; run benchmarks/train_mtp.py (it collects one) or pass --store"
        )

    base = {
        "model": MODEL,
        "head": {"num_depths": 1},
        "precision": "bf16",
        "max_steps": args.steps,
        "eval_every": 10**6,
        "save_every": 10**6,
        "log_every": 1,
        "progress": False,
        "data": {"store": str(args.store), "token_budget": args.token_budget, "eval_max_samples": 8},
        "optim": {"lr": 2e-3, "warmup_steps": 4},
    }
    rows = json.loads(args.out.read_text())["throughput"] if args.online_only else []
    for name, world, threads, dp in (
        []
        if args.online_only
        else [
            ("1 process x 1 thread", 1, 1, "fsdp"),
            ("1 process x 2 threads", 1, 2, "fsdp"),
            ("2 processes x 1 thread, FSDP2", 2, 1, "fsdp"),
            ("2 processes x 1 thread, replicate", 2, 1, "replicate"),
        ]
    ):
        run = args.runs / name.replace(" ", "_").replace(",", "")
        ranks = launch(world, threads, dict(base, out=str(run), distributed={"data_parallel": dp}))
        tps = steady_tokens_per_s(run, args.warmup)
        rows.append(
            {
                "config": name,
                "world": world,
                "threads": threads,
                "tokens_per_s": round(tps, 1),
                "peak_rss_mib_per_rank": [round(r["peak_rss_mib"]) for r in ranks],
            }
        )
        print(f"{name}: {tps:.0f} tok/s, peak RSS/rank {rows[-1]['peak_rss_mib_per_rank']} MiB", flush=True)

    corpus = args.runs / "corpus.txt"
    corpus.write_text("\n\n".join(f.read_text() for f in sorted((REPO / "docs").glob("*.md"))))
    online = {
        "prompts": [str(corpus)],
        "mode": "corpus",
        "sample_size": 256,
        "batch_size": 4,
        "eval_samples": 4,
    }
    mem = []
    for name, world, tp in [("1 process", 1, 1), ("2 processes, tp=2", 2, 2)]:
        cfg = dict(
            base,
            out=str(args.runs / f"online-{world}"),
            max_steps=args.online_steps,
            data={"online": online},
            distributed={"tp": tp},
        )
        ranks = launch(world, 1, cfg)
        mem.append(
            {
                "config": name,
                "tp": tp,
                "peak_rss_mib_per_rank": [round(r["peak_rss_mib"]) for r in ranks],
                "end_rss_mib_per_rank": [round(r["end_rss_mib"]) for r in ranks],
                "target_param_mib_per_rank": [round(r["target_mib"], 1) for r in ranks],
            }
        )
        print(
            f"online {name}: peak RSS/rank {mem[-1]['peak_rss_mib_per_rank']} MiB, "
            f"target params/rank {mem[-1]['target_param_mib_per_rank']} MiB",
            flush=True,
        )

    print("\n| config | tokens/s | peak RSS per rank (MiB) |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib_per_rank']} |")
    print("\n| online mode | target params per rank (MiB) | peak RSS per rank (MiB) | RSS at the end (MiB) |")
    print("| --- | --- | --- | --- |")
    for r in mem:
        cells = [r["target_param_mib_per_rank"], r["peak_rss_mib_per_rank"], r["end_rss_mib_per_rank"]]
        print(f"| {r['config']} | " + " | ".join(map(str, cells)) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "distributed_scaling",
                "machine": {
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "cpus": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg(),
                },
                "workload": f"{args.steps} steps x {args.token_budget}-token global batches, D=1 MTP head, bf16; "
                f"tokens/s over steps {args.warmup + 1}..{args.steps}",
                "throughput": rows,
                "online_memory": mem,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
