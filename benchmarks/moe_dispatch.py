"""Tokens/s and peak memory of one DeepSeek MoE layer on CPU: transformers' eager experts loop vs
mtpkit's dropless (grouped GEMM / for-loop grouped GEMM) and capacity dispatch.

Run from the repository root (hold the machine-wide lock, it takes a minute or two):

    flock /tmp/mtpkit-heavy.lock .venv/bin/python benchmarks/moe_dispatch.py

Shape: DeepSeek-V2-Lite's routing (64 routed experts, top-6, 2 shared experts, softmax `greedy`)
with hidden 2048 -> 512 and expert width 1408 -> 352 (1/4), fp32, `--tokens` tokens per step.
Each method and mode (forward-only, forward+backward) runs in its own process, so the peak RSS is
its own; tokens/s is the median of `--steps` steps after a warm-up step; peak memory is the rise
of the process's max RSS over the steps (activations, temporaries and, with backward, gradients;
not the weights). Outputs are checked against transformers' after the timing. Prints a table and
writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

from mtpkit.models.moe import MoE, MoEConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "moe_dispatch.json"
SHAPE = dict(
    hidden_size=512,
    moe_intermediate_size=352,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=2,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
)
METHODS = {
    "transformers eager (loop)": None,
    "dropless, torch._grouped_mm": dict(dispatch="dropless"),
    "dropless, for-loop grouped GEMM": dict(dispatch="dropless", native=False),
    "capacity 1.25": dict(dispatch="capacity", capacity_factor=1.25),
    "capacity 2.0": dict(dispatch="capacity", capacity_factor=2.0),
}


def build(method: str):
    config = AutoConfig.for_model("deepseek_v2", num_attention_heads=8, **SHAPE)
    config._experts_implementation = "eager"  # the one-hot / nonzero / loop reference
    torch.manual_seed(0)
    reference = DeepseekV2Moe(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(std=SHAPE["hidden_size"] ** -0.5)
    options = METHODS[method]
    if options is None:
        return reference, reference
    options = dict(options)
    native = options.pop("native", True)
    ours = MoE(MoEConfig.from_hf(config, **options))
    ours.load_state_dict(reference.state_dict())
    ours.experts.native_grouped_mm = native
    return ours, reference


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method: str, mode: str, tokens: int, steps: int, queue) -> None:
    torch.set_num_threads(1)
    layer, reference = build(method)
    x = torch.randn(1, tokens, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(1))
    base = max_rss_mib()
    times = []
    for step in range(steps + 1):
        layer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if mode == "forward":
            with torch.no_grad():
                layer(x)
        else:
            layer(x).square().mean().backward()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    result = {f"{mode} tokens/s": tokens / statistics.median(times), f"{mode} peak MiB": max_rss_mib() - base}
    if mode == "forward":  # after the timing, so the check's memory is not counted
        with torch.no_grad():
            result["max_abs_err_vs_transformers"] = (layer(x) - reference(x)).abs().max().item()
            result["dropped_rows"] = int(layer.dropped) if getattr(layer, "dropped", None) is not None else 0
    queue.put(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()

    ctx = mp.get_context("spawn")
    rows = []
    for method in METHODS:
        row = dict(method=method)
        for mode in ("forward", "forward+backward"):  # one process each: max RSS is per process
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(method, mode, args.tokens, args.steps, queue))
            proc.start()
            row.update(queue.get())
            proc.join()
        rows.append(row)

    header = f"{'method':34} {'fwd tok/s':>10} {'fwd MiB':>8} {'fwd+bwd tok/s':>14} {'f+b MiB':>8} {'dropped':>8} {'err':>8}"
    print(f"MoE layer, V2-Lite routing scaled: {SHAPE}, {args.tokens} tokens, fp32, 1 thread")
    print(header)
    for r in rows:
        print(
            f"{r['method']:34} {r['forward tokens/s']:10.0f} {r['forward peak MiB']:8.1f}"
            f" {r['forward+backward tokens/s']:14.0f} {r['forward+backward peak MiB']:8.1f}"
            f" {r['dropped_rows']:8d} {r['max_abs_err_vs_transformers']:8.1e}"
        )
    report = dict(
        shape=SHAPE,
        tokens=args.tokens,
        steps=args.steps,
        dtype="float32",
        threads=1,
        torch=torch.__version__,
        transformers=transformers.__version__,
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        results=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
