"""`mtpkit eval`: acceptance and wall-clock speedup of a trained head on real prompts.

For every prompt (first turn, the target's chat template) and in the same run, interleaved
per prompt so that machine noise hits all of them alike:
  plain — the same engine with K = 0 (KV-cache decoding, one token per target forward);
  HF    — `model.generate()` greedy, the usual baseline;
  spec  — speculative decoding at each requested K.
Greedy runs check that the speculative output is token-for-token the plain output.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtpkit.config import check_fields, checked
from mtpkit.data import chat
from mtpkit.data.prompts import load_prompts
from mtpkit.decode.engine import DecodeError, SpeculativeDecoder
from mtpkit.decode.metrics import AcceptanceStats
from mtpkit.errors import MtpkitError
from mtpkit.heads import FAMILIES, DraftHead, head_dir, load_head, read_head_config
from mtpkit.models import DTYPES, Target, load_target

log = logging.getLogger(__name__)
EVAL_DTYPES = ("float32", "bfloat16")  # of mtpkit.models.DTYPES


@dataclass
class EvalConfig:
    head: str  # a head directory, or a training run directory (its head/ is used)
    prompts: list[str]
    out: str = "report.json"
    model: str | None = None  # default: the target recorded in the head
    k: list[int] = field(default_factory=lambda: [3])
    max_prompts: int | None = checked(None, ge=1)  # None: all
    max_new_tokens: int = 256
    temperature: float = checked(0.0, ge=0, meaning="0 = greedy")
    top_p: float = checked(1.0, gt=0, le=1)
    seed: int = 0
    system_prompt: str | None = None
    hf_baseline: bool = True
    progress: bool = True
    draft_dtype: str = "bfloat16"  # drafting only; verification runs in the target's dtype
    dtype: str = "float32"  # the target's dtype when evaluate() loads it (verification and plain decoding)
    denoising_steps: int | None = checked(None, ge=1)  # diffusion heads: S passes per draft (default: head's)

    def __post_init__(self):
        if isinstance(self.k, int):
            self.k = [self.k]
        if not self.k or any(k < 1 for k in self.k):
            raise DecodeError(f"-k must be >= 1 draft tokens per step, got {self.k}")
        if self.max_new_tokens < 1:
            raise DecodeError("max_new_tokens must be >= 1")
        for name in ("draft_dtype", "dtype"):
            if getattr(self, name) not in EVAL_DTYPES:
                raise DecodeError(f"{name} must be one of {sorted(EVAL_DTYPES)}, got {getattr(self, name)!r}")
        check_fields(self)


def configure_inference(head: DraftHead, **options) -> None:
    """Apply inference-time head options, refusing those the head's family does not take."""
    for name in options:
        if name not in head.inference_options:
            takers = [f.name for f in FAMILIES.values() if name in f.model.inference_options]
            raise DecodeError(f"{name} applies to {'/'.join(takers)} heads, not {head.head_type!r}")
    try:
        head.configure_inference(**options)
    except ValueError as exc:
        raise DecodeError(str(exc)) from exc


def _hf_generate(target: Target, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=target.eos_token_ids,
        pad_token_id=target.tokenizer.pad_token_id,
    )
    start = time.perf_counter()
    with torch.no_grad():
        out = target.model.generate(torch.tensor([prompt_ids]), generation_config=gen)
    return out[0, len(prompt_ids) :].tolist(), time.perf_counter() - start


def evaluate(cfg: EvalConfig, target: Target | None = None) -> dict:
    hdir = head_dir(cfg.head)
    meta = read_head_config(hdir)
    model = cfg.model or meta.get("target", {}).get("model_id")
    if target is None and not model:
        raise DecodeError(f"{hdir}: the head records no target model; pass --model")
    target = target or load_target(model, dtype=cfg.dtype)
    head = load_head(hdir, target)
    if cfg.denoising_steps is not None:
        configure_inference(head, denoising_steps=cfg.denoising_steps)
    prompts = load_prompts(cfg.prompts)
    if not prompts:
        raise MtpkitError(f"no prompts in {', '.join(map(str, cfg.prompts))}")
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    prompt_ids = [chat.start(target.tokenizer, p, cfg.system_prompt).ids for p in prompts]
    limit = getattr(target.config, "max_position_embeddings", None)
    for p, ids in zip(prompts, prompt_ids, strict=True):
        if limit and len(ids) + cfg.max_new_tokens + max(cfg.k) + 1 > limit:
            raise DecodeError(
                f"{p.source}: prompt of {len(ids)} tokens + max_new_tokens exceeds the context ({limit})"
            )

    greedy = cfg.temperature == 0
    plain = SpeculativeDecoder(target, None, 0, cfg.temperature, cfg.top_p, cfg.seed)
    specs = {
        k: SpeculativeDecoder(target, head, k, cfg.temperature, cfg.top_p, cfg.seed, DTYPES[cfg.draft_dtype])
        for k in cfg.k
    }
    # Warm-up: first calls pay one-off allocation and kernel selection costs.
    plain.generate(prompt_ids[0], 4)
    for dec in specs.values():
        dec.generate(prompt_ids[0], 4)

    stats = {k: AcceptanceStats(k) for k in cfg.k}
    totals = {"plain": [0, 0.0], "hf": [0, 0.0], **{k: [0, 0.0, 0.0, 0.0] for k in cfg.k}}
    prefill = dict.fromkeys(["plain", *cfg.k], 0.0)  # seconds; the decode phase is what remains
    identical = dict.fromkeys(cfg.k, 0)
    records = []
    for prompt, ids in tqdm(
        list(zip(prompts, prompt_ids, strict=True)),
        unit="prompt",
        disable=not cfg.progress or None,
        dynamic_ncols=True,
    ):
        base = plain.generate(ids, cfg.max_new_tokens)
        totals["plain"][0] += len(base.tokens)
        totals["plain"][1] += base.seconds
        prefill["plain"] += base.prefill_seconds
        record = {
            "source": prompt.source,
            "prompt_tokens": len(ids),
            "plain_tokens": len(base.tokens),
            "plain_seconds": round(base.seconds, 4),
        }
        if cfg.hf_baseline:
            hf_tokens, hf_s = _hf_generate(target, ids, cfg.max_new_tokens)
            totals["hf"][0] += len(hf_tokens)
            totals["hf"][1] += hf_s
            record["hf_seconds"] = round(hf_s, 4)
        for k, dec in specs.items():
            res = dec.generate(ids, cfg.max_new_tokens)
            per = AcceptanceStats(k)
            for step in res.steps:
                per.add(step.drafted, step.accepted)
            stats[k].merge(per)
            t = totals[k]
            t[0] += len(res.tokens)
            t[1] += res.seconds
            t[2] += res.draft_seconds
            t[3] += res.verify_seconds
            prefill[k] += res.prefill_seconds
            same = res.tokens == base.tokens
            identical[k] += same
            record[f"k{k}"] = {
                "tokens": len(res.tokens),
                "seconds": round(res.seconds, 4),
                "tau": per.tau,
                "steps": per.steps,
                **({"identical": same} if greedy else {}),
            }
        records.append(record)

    base_tps = totals["plain"][0] / totals["plain"][1]

    def decode_tps(run) -> float | None:
        """Tokens/s after the prefill, which made each prompt's first token; None without a decode phase."""
        tokens, seconds = totals[run][0] - len(prompts), totals[run][1] - prefill[run]
        return tokens / seconds if tokens > 0 and seconds > 0 else None

    base_decode_tps = decode_tps("plain")
    hf_tps = totals["hf"][0] / totals["hf"][1] if cfg.hf_baseline and totals["hf"][1] else None
    sweep = []
    for k in cfg.k:
        n_tok, secs, draft_s, verify_s = totals[k]
        spec_tps, spec_decode_tps = n_tok / secs, decode_tps(k)
        steps = max(stats[k].steps, 1)
        sweep.append(
            {
                "k": k,
                **stats[k].as_dict(),
                "spec_tokens_per_s": spec_tps,
                "speedup": spec_tps / base_tps,
                # Same ratio without the (identical) prefill, which dilutes it for short generations.
                "decode_speedup": (
                    spec_decode_tps / base_decode_tps if base_decode_tps and spec_decode_tps else None
                ),
                "speedup_vs_hf_generate": spec_tps / hf_tps if hf_tps else None,
                "identical": identical[k] if greedy else None,
                "draft_ms_per_step": 1000 * draft_s / steps,
                "verify_ms_per_step": 1000 * verify_s / steps,
            }
        )
    report = {
        **{
            key: sweep[0][key]
            for key in ("tau", "acceptance_rate", "per_position", "spec_tokens_per_s", "speedup", "identical")
        },
        "k": cfg.k[0],
        "base_tokens_per_s": base_tps,
        "hf_generate_tokens_per_s": hf_tps,
        "plain_ms_per_token": 1000 / base_tps,
        "plain_decode_ms_per_token": 1000 / base_decode_tps if base_decode_tps else None,
        "num_prompts": len(prompts),
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "denoising_steps": head.cfg.denoising_steps if "denoising_steps" in head.inference_options else None,
        "target_dtype": str(target.lm_head.weight.dtype).removeprefix("torch."),
        "model": target.name,
        "head": str(hdir),
        "prompts": [str(p) for p in cfg.prompts],
        "sweep": sweep,
        "records": records,
    }
    write_report(report, Path(cfg.out))
    return report


def summary_markdown(report: dict) -> str:
    lines = [
        f"# Speculative decoding: {report['model']} + {report['head']}",
        "",
        f"{report['num_prompts']} prompts from {', '.join(report['prompts'])}; max {report['max_new_tokens']} new "
        f"tokens; temperature {report['temperature']}, top-p {report['top_p']}.",
        f"Plain decoding (same engine, K = 0): {report['base_tokens_per_s']:.1f} tokens/s"
        + (
            f"; HF generate() greedy: {report['hf_generate_tokens_per_s']:.1f} tokens/s."
            if report["hf_generate_tokens_per_s"]
            else "."
        ),
        "",
        "| K | τ | acceptance rate | per-position | tokens/s | speedup | decode-only speedup | vs HF generate | draft ms/step | verify ms/step | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["sweep"]:
        per = " ".join(f"{x:.2f}" for x in r["per_position"])
        vs_hf = f"{r['speedup_vs_hf_generate']:.2f}x" if r["speedup_vs_hf_generate"] else "–"
        decode = f"{r['decode_speedup']:.2f}x" if r["decode_speedup"] else "–"  # none when 1 token each
        same = f"{r['identical']}/{report['num_prompts']}" if r["identical"] is not None else "–"
        lines.append(
            f"| {r['k']} | {r['tau']:.2f} | {r['acceptance_rate']:.3f} | {per} | {r['spec_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {decode} | {vs_hf} | {r['draft_ms_per_step']:.1f} | {r['verify_ms_per_step']:.1f} | {same} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """report.json, report.md and report_per_position.png (+ report_k_sweep.png for several K)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(summary_markdown(report))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["sweep"]:
        ax.plot(range(1, r["k"] + 1), r["per_position"], marker="o", label=f"K={r['k']} (τ={r['tau']:.2f})")
    positions = range(1, max(r["k"] for r in report["sweep"]) + 1)
    ax.set(
        xlabel="draft position",
        ylabel="acceptance rate (per step)",
        ylim=(0, 1),
        xticks=list(positions),
        title="Per-position acceptance",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_per_position.png"), dpi=120)
    plt.close(fig)
    if len(report["sweep"]) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ks = [r["k"] for r in report["sweep"]]
        ax.plot(ks, [r["tau"] for r in report["sweep"]], marker="o", label="τ (mean acceptance length)")
        ax.plot(ks, [r["speedup"] for r in report["sweep"]], marker="s", label="speedup vs plain")
        ax.set(xlabel="K (draft tokens per step)", title="K sweep", xticks=ks)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "_k_sweep.png"), dpi=120)
        plt.close(fig)
