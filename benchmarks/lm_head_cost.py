"""Draft LM-head cost: full vocabulary vs EAGLE-3's reduced vocabulary, on the real dims.

    .venv/bin/python benchmarks/lm_head_cost.py            # H = 576, V = 49152 vs 8192 / 16384

One draft token = one row [1, H] through the head [V, H] (a memory-bound matrix-vector
product), plus the argmax. No model is loaded: the weights are random at SmolLM2-135M's shape.
Prints a table and writes benchmarks/results/lm_head_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def per_call_ms(weight: torch.Tensor, x: torch.Tensor, repeats: int) -> float:
    for _ in range(5):  # warm-up
        F.linear(x, weight).argmax(-1)
    best = float("inf")
    for _ in range(3):  # best of 3 batches: the least disturbed by other processes
        start = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, weight).argmax(-1)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 1000 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 16384, 8192])
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lm_head_cost.json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for V in args.vocab:
            w = torch.randn(V, args.hidden, dtype=dtype)
            x = torch.randn(1, args.hidden, dtype=dtype)
            rows.append(
                {
                    "dtype": str(dtype).split(".")[-1],
                    "vocab": V,
                    "ms": round(per_call_ms(w, x, args.repeats), 4),
                }
            )
    full = {r["dtype"]: r["ms"] for r in rows if r["vocab"] == args.vocab[0]}
    print(f"{'dtype':>9} | {'vocab':>6} | {'ms/draft':>8} | vs full")
    for r in rows:
        r["vs_full"] = round(full[r["dtype"]] / r["ms"], 2)
        print(f"{r['dtype']:>9} | {r['vocab']:>6} | {r['ms']:>8.3f} | {r['vs_full']:.2f}x faster")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(
        json.dumps(
            {"benchmark": "lm_head_cost", "hidden": args.hidden, "machine": meta, "rows": rows}, indent=2
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
