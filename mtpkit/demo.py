"""`mtpkit demo`: collect → train → eval on the embedded SmolLM2-135M-Instruct, end to end.

The target answers mtpkit's own built-in training prompts (explanations, lists, code, math,
rewriting, how-tos, writing), an MTP head is trained on its hidden states, and speculative
decoding with that head is measured on held-out built-in prompts against plain decoding.
Every stage resumes: a second run reuses the store and the trained head and only re-measures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mtpkit.config import Checked, checked, from_dict
from mtpkit.data.collect import CollectConfig, collect, format_summary
from mtpkit.decode.evaluate import EvalConfig, evaluate
from mtpkit.models import EMBEDDED_ALIAS, fast_bfloat16, load_target
from mtpkit.train.config import TrainConfig
from mtpkit.train.trainer import train

log = logging.getLogger(__name__)


@dataclass
class DemoConfig(Checked):
    out: str = "runs/demo"
    model: str = EMBEDDED_ALIAS
    train_prompts: str = "builtin:demo_train"
    eval_prompts: str = "builtin:demo_eval"
    max_new_tokens: int = checked(160, ge=1)  # per collected answer
    steps: int = checked(100, ge=1)
    sample_temperature: float = checked(0.8, ge=0)  # second collection pass
    k: tuple[int, ...] = checked((3,), ge=1)
    eval_max_new_tokens: int = checked(128, ge=1)
    eval_prompts_count: int = checked(12, ge=1)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    start = time.perf_counter()
    target = load_target(cfg.model)

    # Two answers per prompt, greedy and sampled: 96 short answers alone are memorised by a
    # transformer layer within a few epochs; the sampled pass doubles the data at the same cost.
    for temperature in (0.0, cfg.sample_temperature):
        _banner(f"1/3 collect: {cfg.model} answers {cfg.train_prompts} (temperature {temperature})")
        summary = collect(
            CollectConfig(
                model=cfg.model,
                prompts=[cfg.train_prompts],
                out=str(out / "store"),
                max_new_tokens=cfg.max_new_tokens,
                batch_size=32,  # continuous-batching slots: 96 prompts in a few rounds
                max_length=1024,
                temperature=temperature,
                top_p=0.95 if temperature else 1.0,
            ),
            target,
        )
        print(format_summary(summary))

    _banner(f"2/3 train: MTP head, 1 module trained over 3 chained drafts, {cfg.steps} steps")
    run = out / "mtp"
    if (run / "head" / "config.json").is_file():
        print(f"reusing the trained head in {run / 'head'} (delete {run} to retrain)")
    else:
        train_cfg = from_dict(
            TrainConfig,
            {
                "out": str(run),
                "model": cfg.model,
                "precision": "bf16" if fast_bfloat16() else "fp32",  # bf16 is emulated on AVX2 CPUs
                "max_steps": cfg.steps,
                "head": {"num_depths": 1, "train_depths": 3, "init": "random"},
                "data": {
                    "store": str(out / "store"),
                    "token_budget": 1024,
                    "max_seq_len": 1024,
                    "eval_fraction": 0.05,
                },
                "loss": {"depth_decay": 0.8},
                "optim": {"lr": 2e-3, "warmup_steps": 20},
                "eval_every": max(cfg.steps // 3, 1),
                "save_every": max(cfg.steps // 3, 1),
                "log_every": 10,
            },
        )
        result = train(train_cfg, resume=run.exists(), target=target)
        print("held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in result["eval"].items()))

    _banner(f"3/3 eval: speculative decoding on {cfg.eval_prompts} (held out), greedy, K = {list(cfg.k)}")
    report = evaluate(
        EvalConfig(
            head=str(run),
            prompts=[cfg.eval_prompts],
            out=str(out / "report.json"),
            k=list(cfg.k),
            max_prompts=cfg.eval_prompts_count,
            max_new_tokens=cfg.eval_max_new_tokens,
        ),
        target,
    )
    print()
    print(_table(report))
    print(verdict(report))
    print(f"\nreport: {out / 'report.json'} (+ .md, plots)   total {time.perf_counter() - start:.0f} s")
    return report


def _table(report: dict) -> str:
    rows = [("K", "τ", "accept rate", "per-position", "spec tok/s", "plain tok/s", "speedup", "identical")]
    for r in report["sweep"]:
        rows.append(
            (
                str(r["k"]),
                f"{r['tau']:.2f}",
                f"{r['acceptance_rate']:.2f}",
                " ".join(f"{x:.2f}" for x in r["per_position"]),
                f"{r['spec_tokens_per_s']:.1f}",
                f"{report['base_tokens_per_s']:.1f}",
                f"{r['speedup']:.2f}x",
                f"{r['identical']}/{report['num_prompts']}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def verdict(report: dict) -> str:
    """Whether the head pays for itself here, and if not, by how much τ falls short — from this
    run's own measured step costs (the eval cost model: a step pays once τ > its cost in plain tokens)."""
    rows = [r for r in report["sweep"] if r.get("speedup") is not None]
    if not rows:
        return "no timed runs: no speedup measured"
    best = max(rows, key=lambda r: r["speedup"])
    line = f"best measured: K = {best['k']}, τ {best['tau']:.2f}, speedup {best['speedup']:.2f}x"
    if best["speedup"] >= 1.1:
        return f"{line}: the head pays for itself on this machine."
    need = best.get("break_even_tau")
    why = f" (a step here costs {need:.2f} plain tokens, so τ must exceed {need:.2f})" if need else ""
    return (
        f"{line}: it does not pay for itself{why}. A {report.get('num_prompts')}-prompt, few-minute head "
        "is far from that; benchmarks/reference_recipe.py trains the full recipe (docs/recipe.md)."
    )
