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
from mtpkit.decode.metrics import AcceptanceStats, bootstrap_ci, merged
from mtpkit.decode.replay import SEMANTICS, check_semantics, replay
from mtpkit.heads import FAMILIES, DraftHead, head_dir, load_head, read_head_config
from mtpkit.models import DTYPES, Target, fast_bfloat16, load_target

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
    # Drafting only (verification runs in the target's dtype). auto: bfloat16 where its matrix
    # products are native (`fast_bfloat16`) or the target is bf16, else float32.
    draft_dtype: str = "auto"
    dtype: str = "float32"  # the target's dtype when evaluate() loads it (verification and plain decoding)
    denoising_steps: int | None = checked(None, ge=1)  # diffusion heads: S passes per draft (default: head's)
    replay: bool = True  # greedy τ by replay over every prompt (False: the engine on every prompt)
    timing_prompts: int | None = checked(8, ge=0)  # greedy with replay: prompts the engine also runs
    batch_size: int = checked(16, ge=1)  # replay's batched plain generation
    semantics: str = checked("mtpkit", choices=("mtpkit", "vllm", "sglang"))  # whose drafting replay predicts
    sequences: str | None = None  # replay: a greedy-sequence file, read for prompts it holds and updated
    k_auto: bool = False  # `-k auto`: the sweep is every K up to the head's limit; the report names the best

    def __post_init__(self):
        if isinstance(self.k, int):
            self.k = [self.k]
        if not self.k or any(k < 1 for k in self.k):
            raise DecodeError(f"-k must be >= 1 draft tokens per step, got {self.k}")
        if self.max_new_tokens < 1:
            raise DecodeError("max_new_tokens must be >= 1")
        if (self.timing_prompts is not None and self.timing_prompts < 0) or self.batch_size < 1:
            raise DecodeError(
                f"need timing_prompts >= 0 and batch_size >= 1, got {self.timing_prompts}, {self.batch_size}"
            )
        if self.semantics not in SEMANTICS:
            raise DecodeError(f"semantics must be one of {list(SEMANTICS)}, got {self.semantics!r}")
        if self.semantics != "mtpkit" and not (self.temperature == 0 and self.replay):
            raise DecodeError(f"semantics {self.semantics!r} is a replay option: greedy (temperature 0) only")
        if self.draft_dtype == "auto":  # a bf16 target hands the drafter bf16 features: draft in bf16
            self.draft_dtype = "bfloat16" if fast_bfloat16() or self.dtype == "bfloat16" else "float32"
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


def _prompt_ids(cfg: EvalConfig, target: Target, files: list[str]):
    """Prompts of `files` (first turn, chat template) after the input checks every run makes
    before it starts: no prompts in a file, a prompt too long for the context."""
    for f in files:
        if not load_prompts([f]):
            raise DecodeError(f"{f}: no prompts in the file")
    prompts = load_prompts(files)
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    prompt_ids = [chat.start(target.tokenizer, p, cfg.system_prompt).ids for p in prompts]
    limit = getattr(target.config, "max_position_embeddings", None)
    for p, ids in zip(prompts, prompt_ids, strict=True):
        if limit and len(ids) + cfg.max_new_tokens + max(cfg.k) + 1 > limit:
            raise DecodeError(
                f"{p.source}: prompt of {len(ids)} tokens + max_new_tokens {cfg.max_new_tokens} + K "
                f"exceeds the context ({limit})"
            )
    return prompts, prompt_ids


def _check_k(head: DraftHead, ks: list[int]) -> None:
    try:
        head.check_draft_tokens(max(ks))
    except ValueError as exc:
        raise DecodeError(f"-k {max(ks)}: {exc}") from exc


def prompt_categories(prompts) -> list[str | None]:
    """Each prompt's record `category` (MT-bench style) where its file is JSONL, else None."""
    lines: dict[str, list[str]] = {}
    out: list[str | None] = []
    for p in prompts:
        path, _, line = p.source.rpartition(":")
        category = None
        if path.endswith(".jsonl") and line.isdigit():
            if path not in lines:
                lines[path] = Path(path).read_text(encoding="utf-8").splitlines()
            record = json.loads(lines[path][int(line) - 1])
            value = record.get("category") if isinstance(record, dict) else None
            category = value if isinstance(value, str) and value else None
        out.append(category)
    return out


def _with_ci(per_prompt: list[AcceptanceStats], k: int, seed: int) -> dict:
    return {**merged(per_prompt, k).as_dict(), **bootstrap_ci(per_prompt, seed=seed)}


def load_eval_head(cfg: EvalConfig, target: Target | None = None):
    hdir = head_dir(cfg.head)
    meta = read_head_config(hdir)
    model = cfg.model or meta.get("target", {}).get("model_id")
    if target is None and not model:
        raise DecodeError(f"{hdir}: the head records no target model; pass --model")
    target = target or load_target(model, dtype=cfg.dtype)
    head = load_head(hdir, target)
    if cfg.denoising_steps is not None:
        configure_inference(head, denoising_steps=cfg.denoising_steps)
    if cfg.k_auto and head.max_draft_tokens is not None:
        cfg.k = [k for k in cfg.k if k <= head.max_draft_tokens]
    _check_k(head, cfg.k)
    check_semantics(head, cfg.semantics)
    return hdir, target, head


def evaluate(cfg: EvalConfig, target: Target | None = None, loaded=None) -> dict:
    hdir, target, head = loaded or load_eval_head(cfg, target)
    prompts, prompt_ids = _prompt_ids(cfg, target, cfg.prompts)
    report = run_eval(cfg, target, head, prompts, prompt_ids)
    report["head"] = str(hdir)
    write_report(report, Path(cfg.out))
    return report


def run_eval(cfg: EvalConfig, target: Target, head, prompts, prompt_ids) -> dict:
    """Greedy: τ by replay over every prompt, the engine on the first `timing_prompts` for
    speed, the lossless check and replay-vs-engine agreement. Sampling: the engine on all."""
    greedy = cfg.temperature == 0
    use_replay = greedy and cfg.replay
    n_timed = len(prompts) if not use_replay or cfg.timing_prompts is None else cfg.timing_prompts
    n_timed = min(n_timed, len(prompts))
    replayed = None
    replay_seconds = None
    if use_replay:
        t0 = time.perf_counter()
        replayed = replay(
            target,
            head,
            prompt_ids,
            cfg.k,
            cfg.max_new_tokens,
            DTYPES[cfg.draft_dtype],
            cfg.batch_size,
            semantics=cfg.semantics,
            sequence_file=cfg.sequences,
        )
        replay_seconds = time.perf_counter() - t0
    # The engine drafts as mtpkit does; only MTP heads draft differently in vLLM / SGLang.
    comparable = replayed is not None and (cfg.semantics == "mtpkit" or head.head_type != "mtp")
    plain = SpeculativeDecoder(target, None, 0, cfg.temperature, cfg.top_p, cfg.seed)
    specs = {
        k: SpeculativeDecoder(target, head, k, cfg.temperature, cfg.top_p, cfg.seed, DTYPES[cfg.draft_dtype])
        for k in cfg.k
    }
    if n_timed:  # Warm-up: first calls pay one-off allocation and kernel selection costs.
        plain.generate(prompt_ids[0], 4)
        for dec in specs.values():
            dec.generate(prompt_ids[0], 4)

    engine_stats: dict[int, list[AcceptanceStats]] = {k: [] for k in cfg.k}
    totals = {"plain": [0, 0.0], "hf": [0, 0.0], **{k: [0, 0.0, 0.0, 0.0] for k in cfg.k}}
    prefill = dict.fromkeys(["plain", *cfg.k], 0.0)  # seconds; the decode phase is what remains
    identical = dict.fromkeys(cfg.k, 0)
    agree = {k: {"prompts": 0, "steps": 0, "steps_equal": 0} for k in cfg.k}
    records = []
    for i, (prompt, ids) in enumerate(
        tqdm(
            list(zip(prompts, prompt_ids, strict=True)),
            unit="prompt",
            disable=not cfg.progress or None,
            dynamic_ncols=True,
        )
    ):
        record = {"source": prompt.source, "prompt_tokens": len(ids)}
        if replayed is not None:
            record["plain_tokens"] = len(replayed.sequences[i].tokens)
            if replayed.sequences[i].batch1:
                record["batch1_rerun"] = True
            for k in cfg.k:
                st = replayed.prompt_stats_at(k, i)
                record[f"k{k}"] = {"tau": st.tau, "steps": st.steps}
        if i >= n_timed:
            records.append(record)
            continue
        base = plain.generate(ids, cfg.max_new_tokens)
        totals["plain"][0] += len(base.tokens)
        totals["plain"][1] += base.seconds
        prefill["plain"] += base.prefill_seconds
        record.update(plain_tokens=len(base.tokens), plain_seconds=round(base.seconds, 4))
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
            engine_stats[k].append(per)
            t = totals[k]
            t[0] += len(res.tokens)
            t[1] += res.seconds
            t[2] += res.draft_seconds
            t[3] += res.verify_seconds
            prefill[k] += res.prefill_seconds
            same = res.tokens == base.tokens
            identical[k] += same
            entry = {
                "tokens": len(res.tokens),
                "seconds": round(res.seconds, 4),
                "tau": per.tau,
                "steps": per.steps,
                **({"identical": same} if greedy else {}),
            }
            if comparable:
                mine, theirs = replayed.steps[k][i], [s.accepted for s in res.steps]
                a = agree[k]
                a["prompts"] += mine == theirs
                a["steps"] += max(len(mine), len(theirs))
                a["steps_equal"] += sum(x == y for x, y in zip(mine, theirs, strict=False))
                entry["replay_agrees"] = mine == theirs
                entry["replay_tau"], entry["tau"] = record[f"k{k}"]["tau"], per.tau
            record[f"k{k}"] = entry
        records.append(record)

    base_tps = totals["plain"][0] / totals["plain"][1] if totals["plain"][1] else None

    def decode_tps(run) -> float | None:
        """Tokens/s after the prefill, which made each prompt's first token; None without a decode phase."""
        tokens, seconds = totals[run][0] - n_timed, totals[run][1] - prefill[run]
        return tokens / seconds if tokens > 0 and seconds > 0 else None

    base_decode_tps = decode_tps("plain")
    hf_tps = totals["hf"][0] / totals["hf"][1] if cfg.hf_baseline and totals["hf"][1] else None
    categories = prompt_categories(prompts)
    sweep = []
    for k in cfg.k:
        n_tok, secs, draft_s, verify_s = totals[k]
        per_prompt = replayed.prompt_stats(k) if replayed is not None else engine_stats[k]
        spec_tps, spec_decode_tps = (n_tok / secs if secs else None), decode_tps(k)
        steps = max(sum(s.steps for s in engine_stats[k]), 1)
        row = {
            "k": k,
            **_with_ci(per_prompt, k, cfg.seed),
            "spec_tokens_per_s": spec_tps,
            "speedup": spec_tps / base_tps if spec_tps and base_tps else None,
            # Same ratio without the (identical) prefill, which dilutes it for short generations.
            "decode_speedup": (
                spec_decode_tps / base_decode_tps if base_decode_tps and spec_decode_tps else None
            ),
            "speedup_vs_hf_generate": spec_tps / hf_tps if hf_tps and spec_tps else None,
            "identical": identical[k] if greedy else None,
            "draft_ms_per_step": 1000 * draft_s / steps,
            "verify_ms_per_step": 1000 * verify_s / steps,
        }
        row.update(cost_model(row, base_decode_tps))
        if replayed is not None:
            row["engine_tau"] = merged(engine_stats[k], k).tau if engine_stats[k] else None
        if comparable:
            row["replay_agreement"] = {
                **agree[k],
                "timing_prompts": n_timed,
                "step_fraction": agree[k]["steps_equal"] / agree[k]["steps"] if agree[k]["steps"] else None,
            }
        named = sorted({c for c in categories if c})
        if named:
            row["categories"] = {
                c: {
                    "num_prompts": sum(x == c for x in categories),
                    **_with_ci(
                        [s for s, x in zip(per_prompt, categories, strict=True) if x == c], k, cfg.seed
                    ),
                }
                for c in named
            }
        sweep.append(row)
    best = best_k(sweep)
    return {
        "best_k": best,
        **{
            key: sweep[0][key]
            for key in (
                "tau",
                "tau_ci",
                "acceptance_rate",
                "per_position",
                "spec_tokens_per_s",
                "speedup",
                "identical",
            )
        },
        "k": cfg.k[0],
        "base_tokens_per_s": base_tps,
        "hf_generate_tokens_per_s": hf_tps,
        "plain_ms_per_token": 1000 / base_tps if base_tps else None,
        "plain_decode_ms_per_token": 1000 / base_decode_tps if base_decode_tps else None,
        "num_prompts": len(prompts),
        "timing_prompts": n_timed,
        "tau_method": "replay" if replayed is not None else "engine",
        "semantics": cfg.semantics,
        "replay": None
        if replayed is None
        else {
            "seconds": replay_seconds,
            "batch_size": cfg.batch_size,
            "batch1_reruns": replayed.batch1_reruns,
            "batch1_changed": replayed.batch1_changed,
        },
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "draft_dtype": cfg.draft_dtype,
        "denoising_steps": head.cfg.denoising_steps if "denoising_steps" in head.inference_options else None,
        "target_dtype": str(target.lm_head.weight.dtype).removeprefix("torch."),
        "model": target.name,
        "prompts": [str(p) for p in cfg.prompts],
        "sweep": sweep,
        "records": records,
    }


def cost_model(row: dict, plain_decode_tps: float | None) -> dict:
    """Speed at K from the measured costs on this machine: a step costs draft + verify ms and
    yields τ tokens on average, a plain token costs 1 / plain_decode_tps. `break_even_tau` is the
    τ at which the step pays for itself; `predicted_speedup` uses the τ over all prompts."""
    step_ms = row["draft_ms_per_step"] + row["verify_ms_per_step"]
    if not plain_decode_tps or step_ms <= 0:
        return {"step_ms": step_ms or None, "break_even_tau": None, "predicted_speedup": None}
    plain_ms = 1000 / plain_decode_tps
    return {
        "step_ms": step_ms,
        "break_even_tau": step_ms / plain_ms,
        "predicted_speedup": row["tau"] * plain_ms / step_ms,
    }


def best_k(sweep: list[dict]) -> int | None:
    """The K whose τ(K) / cost(K) is highest (`-k auto` sweeps every K the head can draft)."""
    scored = [r for r in sweep if r.get("predicted_speedup")]
    return max(scored, key=lambda r: r["predicted_speedup"])["k"] if scored else None


def _pm(value: float, ci: list[float] | None) -> str:
    """`1.53 ± 0.06`: the value and the half-width of its 95% CI."""
    return f"{value:.2f} ± {(ci[1] - ci[0]) / 2:.2f}" if ci else f"{value:.2f}"


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if x else "–"


def summary_markdown(report: dict) -> str:
    timed = report.get("timing_prompts", report["num_prompts"])
    method = report.get("tau_method", "engine")
    lines = [
        f"# Speculative decoding: {report['model']} + {report['head']}",
        "",
        f"{report['num_prompts']} prompts from {', '.join(report['prompts'])}; max {report['max_new_tokens']} new "
        f"tokens; temperature {report['temperature']}, top-p {report['top_p']}.",
        f"τ and acceptance over all prompts ({method}) with 95% bootstrap CIs over prompts; speed and "
        f"the lossless check on {timed} of them.",
        f"Plain decoding (same engine, K = 0): {_fmt(report['base_tokens_per_s'], '.1f')} tokens/s"
        + (
            f"; HF generate() greedy: {report['hf_generate_tokens_per_s']:.1f} tokens/s."
            if report["hf_generate_tokens_per_s"]
            else "."
        ),
        "",
        "| K | τ | acceptance rate | per-position | tokens/s | speedup | decode-only speedup | vs HF generate | draft ms/step | verify ms/step | break-even τ | predicted speedup | identical | replay = engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["sweep"]:
        per = " ".join(f"{x:.2f}" for x in r["per_position"])
        same = f"{r['identical']}/{timed}" if r["identical"] is not None else "–"
        agree = r.get("replay_agreement")
        agreed = f"{agree['steps_equal']}/{agree['steps']} steps" if agree and agree["steps"] else "–"
        lines.append(
            f"| {r['k']} | {_pm(r['tau'], r.get('tau_ci'))} | {r['acceptance_rate']:.3f} | {per} | "
            f"{_fmt(r['spec_tokens_per_s'], '.1f')} | {_fmt(r['speedup'], '.2f', 'x')} | "
            f"{_fmt(r['decode_speedup'], '.2f', 'x')} | {_fmt(r['speedup_vs_hf_generate'], '.2f', 'x')} | "
            f"{r['draft_ms_per_step']:.1f} | {r['verify_ms_per_step']:.1f} | "
            f"{_fmt(r.get('break_even_tau'), '.2f')} | {_fmt(r.get('predicted_speedup'), '.2f', 'x')} | {same} | {agreed} |"
        )
    if report.get("best_k") is not None:
        lines += ["", f"Best K on this machine (τ(K) / measured step cost): **{report['best_k']}**."]
    cats = [(r["k"], c, v) for r in report["sweep"] for c, v in r.get("categories", {}).items()]
    if cats:
        lines += ["", "| K | category | prompts | τ |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {c} | {v['num_prompts']} | {_pm(v['tau'], v.get('tau_ci'))} |" for k, c, v in cats
        ]
    return "\n".join(lines) + "\n"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4))


def _save(plt, fig, ax, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """report.json, report.md and report_per_position.png (+ report_k_sweep.png for several K)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(summary_markdown(report))
    plt, fig, ax = _figure()
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
    _save(plt, fig, ax, out.with_name(out.stem + "_per_position.png"))
    if len(report["sweep"]) > 1:
        plt, fig, ax = _figure()
        ks = [r["k"] for r in report["sweep"]]
        ax.plot(ks, [r["tau"] for r in report["sweep"]], marker="o", label="τ (mean acceptance length)")
        if all(r["speedup"] for r in report["sweep"]):
            ax.plot(ks, [r["speedup"] for r in report["sweep"]], marker="s", label="speedup vs plain")
        ax.set(xlabel="K (draft tokens per step)", title="K sweep", xticks=ks)
        _save(plt, fig, ax, out.with_name(out.stem + "_k_sweep.png"))


def set_files(paths: list[str]) -> list[Path]:
    """--sets: prompt files, a directory standing for its *.jsonl files (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise DecodeError(f"--sets {path}: a directory without *.jsonl prompt files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DecodeError(f"--sets {path}: no such file or directory")
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        raise DecodeError(f"--sets: two prompt files share a name ({stems}); each set is named by its file")
    return files


def evaluate_sets(cfg: EvalConfig, sets: list[str], target: Target | None = None) -> dict:
    """The standard protocol: every prompt file of `sets` × K, one report per set beside `cfg.out`
    (`<stem>.<set>.json`) and a combined JSON + Markdown table + plot of τ with CIs at `cfg.out`.
    Every input is checked before anything runs, so bad input leaves no report behind."""
    start = time.perf_counter()
    files = set_files(sets)
    loaded = load_eval_head(cfg, target)
    _, target, head = loaded
    inputs = {f.stem: _prompt_ids(cfg, target, [str(f)]) for f in files}
    out = Path(cfg.out)
    combined: dict = {"model": target.name, "head": str(loaded[0]), "k": cfg.k, "sets": {}}
    for f in files:
        sub = EvalConfig(
            **{**cfg.__dict__, "prompts": [str(f)], "out": str(out.with_name(f"{out.stem}.{f.stem}.json"))}
        )
        report = run_eval(sub, target, head, *inputs[f.stem])
        report["head"] = str(loaded[0])
        write_report(report, Path(sub.out))
        combined["sets"][f.stem] = {
            "file": str(f),
            "num_prompts": report["num_prompts"],
            "timing_prompts": report["timing_prompts"],
            "replay": report["replay"],
            "sweep": report["sweep"],
        }
    combined.update(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        draft_dtype=cfg.draft_dtype,
        tau_method="replay" if cfg.temperature == 0 and cfg.replay else "engine",
        wall_seconds=time.perf_counter() - start,
    )
    write_sets_report(combined, out)
    return combined


def sets_markdown(combined: dict) -> str:
    ks = combined["k"]
    lines = [
        f"# τ per prompt set: {combined['model']} + {combined['head']}",
        "",
        f"Greedy τ ({combined['tau_method']}) with 95% bootstrap CIs over prompts; max "
        f"{combined['max_new_tokens']} new tokens; {combined['wall_seconds']:.0f} s wall.",
        "",
        "| set | prompts | " + " | ".join(f"K={k}" for k in ks) + " | replay = engine |",
        "|---|---|" + "---|" * len(ks) + "---|",
    ]
    for name, s in combined["sets"].items():
        taus = [_pm(r["tau"], r.get("tau_ci")) for r in s["sweep"]]
        agree = [r.get("replay_agreement") for r in s["sweep"]]
        eq = sum(a["steps_equal"] for a in agree if a)
        total = sum(a["steps"] for a in agree if a)
        lines.append(
            f"| {name} | {s['num_prompts']} | "
            + " | ".join(taus)
            + f" | {f'{eq}/{total} steps' if total else '–'} |"
        )
    return "\n".join(lines) + "\n"


def write_sets_report(combined: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(combined, indent=2) + "\n")
    out.with_suffix(".md").write_text(sets_markdown(combined))
    plt, fig, ax = _figure()
    for name, s in combined["sets"].items():
        ks = [r["k"] for r in s["sweep"]]
        taus = [r["tau"] for r in s["sweep"]]
        err = [
            [r["tau"] - r["tau_ci"][0] for r in s["sweep"]],
            [r["tau_ci"][1] - r["tau"] for r in s["sweep"]],
        ]
        ax.errorbar(ks, taus, yerr=err, marker="o", capsize=3, label=name)
    ax.set(xlabel="K (draft tokens per step)", ylabel="τ (95% CI over prompts)", xticks=combined["k"])
    ax.set_title("τ per prompt set")
    _save(plt, fig, ax, out.with_suffix(".png"))
