"""`mtpkit <command>`: argument parsing only; the work lives in the package modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mtpkit.config import config_from_args, field_help
from mtpkit.convert.command import add_convert_parser
from mtpkit.errors import MtpkitError

# Errors that carry a message meant for the user: printed without a traceback (-v shows it).
_USER_ERRORS: tuple[type[Exception], ...] = (MtpkitError, ValueError, OSError)


def _config_args(p: argparse.ArgumentParser, help_text: str, metavar: str = "section.field=value") -> None:
    """--config and dotted overrides, the same for every command (defaults < YAML < overrides < flags)."""
    p.add_argument("--config", help=help_text)
    p.add_argument(
        "overrides", nargs="*", default=[], metavar=metavar, help="config overrides, applied after --config"
    )


def _collect_parser(sub) -> None:
    p = sub.add_parser(
        "collect",
        help="regenerate answers with the target and store its hidden states",
        description="Build draft-head training data: the target answers the prompts (generation mode) "
        "or raw text is windowed (corpus mode); token ids, loss masks and the target's hidden states "
        "are appended to a resumable store. Flags override --config.",
        argument_default=argparse.SUPPRESS,
    )
    _config_args(p, "YAML file with any of the fields below (flags override it)", "field=value")
    p.add_argument(
        "--model", help="local HF dir, .gguf file, 'smollm2-135m-instruct' or tiny-{llama,qwen2,deepseek_v3}"
    )
    p.add_argument("--prompts", nargs="+", help="JSONL/Parquet/JSON/CSV/text files, or 'builtin'")
    p.add_argument("--out", help="store directory (created, or appended to / resumed)")
    p.add_argument(
        "--mode", choices=["generate", "corpus"], help="generate answers (default) or window raw text"
    )
    p.add_argument(
        "--format",
        help="force a record format: sharegpt, messages, turns, self_instruct, alpaca, question, prompt, text",
    )
    p.add_argument("--text-field", dest="text_field", help="read the prompt/text from this field")
    p.add_argument(
        "--all-turns",
        dest="all_turns",
        action="store_true",
        help="answer every user turn of multi-turn records",
    )
    p.add_argument("--system-prompt", dest="system_prompt", help="system message for records without one")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy (default)")
    p.add_argument("--top-p", dest="top_p", type=float)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="generation slots (continuous batching)")
    p.add_argument(
        "--round-prompts",
        dest="round_prompts",
        type=int,
        help="items per round, the unit of work and commit (default 4 x --batch-size)",
    )
    p.add_argument(
        "--layers",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated hidden-state ids (0 = embeddings, i = after layer i, L = final post-norm; default L)",
    )
    p.add_argument("--dtype", choices=["bfloat16", "float16"], help="storage dtype of hidden states")
    p.add_argument(
        "--store-kind",
        dest="store_kind",
        choices=["hidden", "tokens"],
        help="hidden (default): store hidden states; tokens: ids + loss masks only (5 B/token), "
        "hidden states recomputed by the target while training",
    )
    p.add_argument("--model-dtype", dest="model_dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--max-prompts", dest="max_prompts", type=int, help="use the first N stream items (>= 1; default all)"
    )
    p.add_argument(
        "--max-samples",
        dest="max_samples",
        type=int,
        help="stop at N samples in the store (>= 1; default no limit)",
    )
    p.add_argument(
        "--max-minutes",
        dest="max_minutes",
        type=float,
        help="time budget of this run: no new round starts after M minutes; what is done is committed "
        "and rerunning continues the job",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--sample-size", dest="sample_size", type=int, help="corpus mode: tokens per window")
    p.add_argument("--stride", type=int, help="corpus mode: tokens between window starts")
    p.add_argument(
        "--max-length",
        dest="max_length",
        type=int,
        help="skip prompts whose sequence would exceed this (>= 2; generate mode: > --max-new-tokens; "
        "default 4096)",
    )
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true", help="log and skip malformed records")
    p.add_argument("--shard-mb", dest="shard_mb", type=float)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--progress-every",
        dest="progress_every_s",
        type=float,
        help="seconds between progress lines when stderr is not a terminal (default 30)",
    )
    p.add_argument("--report", help="also write the summary as JSON to this file")
    p.set_defaults(func=_run_collect)


def _run_collect(args: argparse.Namespace) -> int:
    from mtpkit.data.collect import CollectConfig, collect, format_summary

    cfg = config_from_args(CollectConfig, args, exclude=("report",))
    summary = collect(cfg)
    print(format_summary(summary))
    if getattr(args, "report", None):
        Path(args.report).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a draft head on a frozen target",
        description="Train a draft head from a `collect` store (data.store) or online (data.online). "
        "Settings come from --config and dotted overrides such as optim.lr=3e-4 head.num_depths=3.",
    )
    _config_args(p, "YAML config (see configs/)")
    p.add_argument("--out", help="run directory (same as out=...)")
    p.add_argument(
        "--head", help="head family from the registry (same as head_type=...): mtp, eagle3, medusa, diffusion"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.add_argument(
        "--init-from", dest="init_from", help="start from this head or run directory (init_from=...)"
    )
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from mtpkit.train.config import TrainConfig
    from mtpkit.train.trainer import train

    cfg = config_from_args(TrainConfig, args, exclude=("resume",), rename={"head": "head_type"})
    result = train(cfg, resume=args.resume)
    print(f"head: {result['head']}  (step {result['step']}, {result['tokens_seen']} tokens)")
    for key, value in result["eval"].items():
        print(f"  {key:<12} {value:.4f}")
    return 0


AUTO_K_MAX = 5  # `-k auto` sweeps K = 1..5


def _k_value(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _eval_parser(sub) -> None:
    from mtpkit.decode.evaluate import EvalConfig

    p = sub.add_parser(
        "eval",
        help="measure acceptance and speedup of a trained head",
        description="Speculative decoding with a trained head on real prompts: τ, acceptance rate, "
        "per-position acceptance and wall-clock speedup over plain decoding, measured in one run. "
        "Flags override --config and dotted overrides (field=value).",
        argument_default=argparse.SUPPRESS,
    )
    _config_args(p, "YAML file with any of the fields below (flags override it)", "field=value")
    p.add_argument("--head", help="head directory, or a training run directory (required)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prompts", nargs="+", help="prompt files in any format collect reads (required unless --sets)"
    )
    src.add_argument(
        "--sets",
        nargs="+",
        help="the standard protocol: each prompt file (a directory: its *.jsonl) is a set, run at every "
        "K (default 1 2 3 4) into one combined report",
    )
    p.add_argument("--model", help="target spec (default: the one the head was trained for)")
    p.add_argument(
        "-k",
        type=_k_value,
        nargs="+",
        help="draft tokens per step (>= 1); several values = a sweep (default 3; --sets: 1 2 3 4); "
        "auto: every K up to 5 (or the head's limit), reporting the K with the best τ(K) / cost(K)",
    )
    p.add_argument(
        "--max-prompts",
        type=int,
        help=field_help(EvalConfig, "max_prompts", "first N prompts (default: all)"),
    )
    p.add_argument("--max-new-tokens", type=int, help=field_help(EvalConfig, "max_new_tokens"))
    p.add_argument("--temperature", type=float, help=field_help(EvalConfig, "temperature"))
    p.add_argument("--top-p", type=float, help=field_help(EvalConfig, "top_p"))
    p.add_argument("--seed", type=int)
    p.add_argument("--system-prompt")
    p.add_argument(
        "--no-hf-baseline", dest="hf_baseline", action="store_false", help="skip HF generate() timing"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--draft-dtype",
        choices=["auto", "bfloat16", "float32"],
        help="dtype of drafting (default auto: bfloat16 where its matrix products are native — CUDA, "
        "AVX-512-BF16/AMX CPUs — else float32; verification always runs in the target's dtype, so "
        "output is unchanged)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="the target's dtype (default float32): verification and the plain-decoding baseline both run in it",
    )
    p.add_argument(
        "--denoising-steps",
        type=int,
        help="diffusion heads: denoising passes per draft (default: the head's)",
    )
    p.add_argument(
        "--timing-prompts",
        type=int,
        help=field_help(
            EvalConfig,
            "timing_prompts",
            "greedy: τ comes from replay over every prompt; the real engine runs on the first N "
            "(wall-clock speedup, the lossless check, replay-vs-engine agreement)",
        ),
    )
    p.add_argument(
        "--no-replay",
        dest="replay",
        action="store_false",
        help="greedy τ from the real engine on every prompt instead of replay",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=field_help(EvalConfig, "batch_size", "replay: prompts generated at once"),
    )
    p.add_argument(
        "--sequences",
        help="replay: a greedy-sequence file (JSON); prompts it holds are not generated again, and "
        "every prompt's greedy output is written to it — evaluating another head on the same prompts "
        "then costs one teacher-forced forward per prompt",
    )
    p.add_argument(
        "--semantics",
        help="replay: whose drafting to predict τ for — mtpkit (default), vllm or sglang (docs/speculative-decoding.md)",
    )
    p.add_argument(
        "--out", help="report JSON (default report.json; a .md summary and PNG plots go beside it)"
    )
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from mtpkit.decode.evaluate import EvalConfig, evaluate, evaluate_sets, sets_markdown, summary_markdown

    if "auto" in (getattr(args, "k", None) or []):  # trimmed to the head's limit once it is loaded
        args.k, args.k_auto = list(range(1, AUTO_K_MAX + 1)), True
    sets = getattr(args, "sets", None)
    if sets:  # the sets are the prompts; K = 1..4 unless given
        args.prompts = []
        args.k = getattr(args, "k", None) or [1, 2, 3, 4]
    cfg = config_from_args(EvalConfig, args, exclude=("sets",))
    if sets:
        print(sets_markdown(evaluate_sets(cfg, sets)))
        print(f"wrote {cfg.out}")
        return 0
    report = evaluate(cfg)
    print(summary_markdown(report))
    print(f"wrote {cfg.out}")
    return 0


def _joint_parser(sub, name: str, help_text: str, description: str) -> None:
    p = sub.add_parser(name, help=help_text, description=description)
    _config_args(p, "YAML config (see configs/joint/)")
    p.add_argument("--out", help="run directory (same as out=...)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.set_defaults(func=_run_joint)


def _run_joint(args: argparse.Namespace) -> int:
    if args.command == "sft":
        from mtpkit.joint.sft import SFTConfig as cfg_cls
        from mtpkit.joint.sft import sft as run
    else:
        from mtpkit.joint.rl import RLConfig as cfg_cls
        from mtpkit.joint.rl import rl as run
    result = run(config_from_args(cfg_cls, args, exclude=("resume",)), resume=args.resume)
    print(f"model: {result['model']}\nhead:  {result['head']}  (step {result['step']})")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="collect → train → eval on the embedded model, end to end",
        description="On SmolLM2-135M-Instruct: the model answers built-in prompts, an MTP head is trained on "
        "its hidden states, and speculative decoding is measured on held-out built-in prompts. Reruns reuse "
        "the store and the trained head.",
        argument_default=argparse.SUPPRESS,
    )
    _config_args(p, "YAML file with demo settings (flags override it)", "field=value")
    p.add_argument("--out", help="default runs/demo")
    p.add_argument("--steps", type=int, help="training steps (>= 1; default 100)")
    p.add_argument("-k", type=int, nargs="+", help="draft tokens per step (>= 1; several = sweep; default 3)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from mtpkit.demo import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0


def _export_parser(sub) -> None:
    from mtpkit.export import FORMATS

    p = sub.add_parser(
        "export",
        help="write a trained head in a format vLLM / SGLang / transformers load",
        description="Export a head (or a run directory's head) to a serving format, with SERVE.md giving the "
        "exact engine command lines. Head/format pairs a format cannot represent exactly are refused. Formats: "
        + "; ".join(f"{name} ({f.engines})" for name, f in FORMATS.items()),
        argument_default=argparse.SUPPRESS,
    )
    _config_args(p, "YAML file with any of the fields below (flags override it)", "field=value")
    p.add_argument("--head", help="head directory, or a training run directory (required)")
    p.add_argument("--format", choices=list(FORMATS), help="(required)")
    p.add_argument("--out", help="output directory (required; must not exist or be empty)")
    p.add_argument("--model", help="target spec (default: the one the head was trained for)")
    p.add_argument(
        "-k", type=int, help="draft tokens per step in SERVE.md (>= 1; default: the trained depths)"
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from mtpkit.export import ExportConfig, export_head

    cfg = config_from_args(ExportConfig, args)
    out = export_head(cfg.head, cfg.format, cfg.out, model=cfg.model, k=cfg.k)
    print(f"wrote {out} ({cfg.format}); serve it with the commands in {out / 'SERVE.md'}")
    return 0


def _import_parser(sub) -> None:
    p = sub.add_parser(
        "import-mtp",
        help="extract the MTP layers of a DeepSeek-V3-style checkpoint into an mtpkit head",
        description="Stream the MTP layers (indices >= num_hidden_layers) out of a sharded safetensors "
        "checkpoint (FP8 block-quantised weights are dequantised to bf16) into a native head directory that "
        "`mtpkit train --init-from` fine-tunes and `mtpkit eval` measures.",
        argument_default=argparse.SUPPRESS,
    )
    _config_args(p, "YAML file with any of the fields below (flags override it)", "field=value")
    p.add_argument("--model", help="checkpoint directory (config.json + safetensors; required)")
    p.add_argument("--out", help="head directory to write (required)")
    p.add_argument(
        "--target",
        help="target spec the head runs on (default: the checkpoint, or the one an export records)",
    )
    p.add_argument(
        "--extract-only",
        dest="extract_only",
        action="store_true",
        help="only copy the MTP layers with the checkpoint's key names (config.json + model.safetensors)",
    )
    p.set_defaults(func=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    from mtpkit.export.import_mtp import ImportConfig, import_mtp

    cfg = config_from_args(ImportConfig, args)
    summary = import_mtp(cfg.model, cfg.out, target=cfg.target, extract_only=cfg.extract_only)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtpkit", description="Multi-token-prediction draft heads for frozen LLMs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _collect_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _joint_parser(
        sub,
        "sft",
        "fine-tune the model (full / LoRA / QLoRA) and train its MTP head with it",
        "SFT on chat data (loss on assistant tokens) + α · MTP loss from the same forward pass. "
        "Writes out/model and out/head, ready for `mtpkit eval`. See docs/joint-training.md.",
    )
    _joint_parser(
        sub,
        "rl",
        "GRPO / DAPO on verifiable rewards, training the MTP head online on the rollouts",
        "GRPO with the DAPO refinements; rollout.enable_rollout=true generates the rollouts by speculative "
        "decoding with the current MTP head and logs their acceptance. See docs/joint-training.md.",
    )
    _demo_parser(sub)
    _export_parser(sub)
    _import_parser(sub)
    add_convert_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Dotted overrides (train) may sit anywhere among the flags; argparse alone cannot interleave them.
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:  # transformers' per-load progress bars drown our own
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except _USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"mtpkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
