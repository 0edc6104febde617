"""The full evaluation protocol on the embedded model: every prompt of ../shared/data/eval × K = 1..4,
greedy, 256 new tokens — τ by replay with 95% CIs, the real engine on a timing subset.

    flock /tmp/mtpkit-heavy.lock .venv/bin/python benchmarks/eval_protocol.py --head RUN_OR_HEAD_DIR

Writes benchmarks/results/eval_protocol.json (+ .md and .png: τ per set and K with CIs) with
wall and CPU seconds, prompts per set, τ per set and K, replay-vs-engine agreement on the timing
subset, how often batching changed a greedy output, and batched plain-generation tokens/s at
batch 1 / 8 / 32. The per-set reports (every prompt's record) go to --work.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EVAL_DIR = REPO.parent / "shared" / "data" / "eval"
RESULTS = REPO / "benchmarks" / "results" / "eval_protocol.json"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def generation_throughput(target, prompt_ids: list[list[int]], batch_sizes, max_new_tokens: int) -> dict:
    """Plain greedy tokens/s of replay's batched generation (no batch-1 reruns) per batch size,
    each on `batch size` prompts (at least 4 at batch 1, so one prompt's length does not decide)."""
    from mtpkit.decode.replay import greedy_generate

    out = {}
    for bs in batch_sizes:
        ids = prompt_ids[: max(bs, 4)]
        start = time.perf_counter()
        seqs = list(greedy_generate(target, ids, max_new_tokens, batch_size=bs, tie_margin=0))
        seconds = time.perf_counter() - start
        tokens = sum(len(s.tokens) for _, s in seqs)
        out[str(bs)] = {
            "prompts": len(ids),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
        }
        print(
            f"batch {bs}: {tokens / seconds:.1f} tokens/s ({len(ids)} prompts, {tokens} tokens)", flush=True
        )
    return out


def batching_check(target, prompt_ids: list[list[int]], n: int, batch_size: int, max_new_tokens: int) -> dict:
    """How often a batched greedy output differs from the batch-1 one without replay's rerun:
    n prompts spread over the sets, generated inside one batch of `batch_size` and alone; with
    the smallest top-2 logit margin of the prompts that differ and of those that do not."""
    from mtpkit.decode.replay import greedy_generate

    chosen = list(range(0, len(prompt_ids), max(1, len(prompt_ids) // n)))[:n]
    fill = [i for i in range(len(prompt_ids)) if i not in chosen][: batch_size - len(chosen)]
    batch = [prompt_ids[i] for i in chosen + fill]
    got = dict(greedy_generate(target, batch, max_new_tokens, batch_size=batch_size, tie_margin=0))
    batched = {j: got[j] for j in range(len(chosen))}
    alone = dict(greedy_generate(target, batch[: len(chosen)], max_new_tokens, batch_size=1))
    differ = [i for i in batched if batched[i].tokens != alone[i].tokens]
    same = [i for i in batched if i not in differ]
    return {
        "prompts": len(chosen),
        "batch_size": batch_size,
        "differ": len(differ),
        "min_margin_differing": [batched[i].min_margin for i in differ],
        "min_margin_identical_smallest": sorted(batched[i].min_margin for i in same)[:5],
    }


def engine_semantics(target, head, files, args, draft_dtype: str, combined: dict) -> dict:
    """τ per K as vLLM (and SGLang) draft with the head, by replay on one set, beside mtpkit's."""
    from mtpkit.data import chat
    from mtpkit.data.prompts import load_prompts
    from mtpkit.decode.replay import replay

    if head.head_type != "mtp":  # replay.check_semantics: only MTP heads draft differently there
        return {"same_as_mtpkit": True, "why": f"vLLM and SGLang draft {head.head_type} heads as mtpkit does"}
    chosen = next((f for f in files if f.stem == args.semantics_set), files[0])
    ids = [chat.start(target.tokenizer, p).ids for p in load_prompts([str(chosen)])]
    dtype = getattr(torch, draft_dtype)
    mtpkit = {str(r["k"]): r["tau"] for r in combined["sets"][chosen.stem]["sweep"]}
    start = time.perf_counter()
    # SGLang's NEXTN chain is vLLM's (docs/speculative-decoding.md): one replay predicts both.
    got = replay(
        target,
        head,
        ids,
        args.k,
        args.max_new_tokens,
        dtype,
        args.batch_size,
        semantics="vllm",
        sequence_file=args.sequences,
    )
    vllm = {str(k): got.stats[k].tau for k in args.k}
    print("served τ on", chosen.stem, "mtpkit", mtpkit, "vllm/sglang", vllm, flush=True)
    return {
        "set": chosen.stem,
        "prompts": len(ids),
        "mtpkit": mtpkit,
        "vllm_sglang": vllm,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head", required=True, help="a trained head (or run) for --model")
    ap.add_argument(
        "--model", default="smollm2-135m-instruct", help="the target (a tiny one for a smoke run)"
    )
    ap.add_argument("--sets", nargs="+", default=[str(EVAL_DIR)])
    ap.add_argument("-k", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--timing-prompts", type=int, default=1, help="per set: the real engine's subset")
    ap.add_argument(
        "--sequences",
        help="greedy-sequence file (read if it exists, then written): a second head over the same "
        "prompts skips generation; without it every run generates (the cold cost)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--draft-dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="auto: bfloat16 where its GEMMs are native (CUDA, AVX-512-BF16/AMX CPUs), else float32",
    )
    ap.add_argument(
        "--batching-check", type=int, default=8, help="prompts regenerated at batch 1 to count changes"
    )
    ap.add_argument("--semantics-set", default="gsm8k", help="the set τ per engine semantics is replayed on")
    ap.add_argument("--work", default="/tmp/mtpkit-eval-protocol", help="per-set reports")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    from mtpkit.data import chat
    from mtpkit.data.prompts import load_prompts
    from mtpkit.decode.evaluate import EvalConfig, evaluate_sets, load_eval_head, set_files
    from mtpkit.models import load_target

    sequences_cached = bool(args.sequences) and Path(args.sequences).exists()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    target = load_target(args.model)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cfg = EvalConfig(
        head=args.head,
        prompts=[],
        out=str(work / "protocol.json"),
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        timing_prompts=args.timing_prompts,
        batch_size=args.batch_size,
        draft_dtype=args.draft_dtype,
        hf_baseline=False,
        progress=False,
        sequences=args.sequences,
    )
    combined = evaluate_sets(cfg, args.sets, target)
    protocol_wall, protocol_cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    print(f"protocol: {protocol_wall:.0f} s wall, {protocol_cpu:.0f} s CPU", flush=True)

    _, target, head = load_eval_head(cfg, target)
    files = set_files(args.sets)
    prompt_ids = [chat.start(target.tokenizer, p).ids for p in load_prompts([str(f) for f in files])]
    extra_wall = time.perf_counter()
    check = batching_check(target, prompt_ids, args.batching_check, args.batch_size, args.max_new_tokens)
    throughput = generation_throughput(target, prompt_ids, (1, 8, 32), 64)
    semantics = engine_semantics(target, head, files, args, cfg.draft_dtype, combined)
    sets = {}
    for name, s in combined["sets"].items():
        sets[name] = {
            "prompts": s["num_prompts"],
            "timing_prompts": s["timing_prompts"],
            "replay_seconds": s["replay"]["seconds"],
            "batch1_reruns": s["replay"]["batch1_reruns"],
            "batch1_changed": s["replay"]["batch1_changed"],
            "k": {
                str(r["k"]): {
                    "tau": r["tau"],
                    "tau_ci": r["tau_ci"],
                    "per_position": r["per_position"],
                    "per_position_ci": r["per_position_ci"],
                    "steps": r["steps"],
                    "engine_tau_timing_subset": r.get("engine_tau"),
                    "speedup_timing_subset": r["speedup"],
                    "identical": r["identical"],
                    "replay_agreement": r["replay_agreement"],
                }
                for r in s["sweep"]
            },
        }
    agree = [r["replay_agreement"] for s in combined["sets"].values() for r in s["sweep"]]
    result = {
        "command": "flock /tmp/mtpkit-heavy.lock .venv/bin/python " + " ".join(sys.argv),
        "model": args.model,
        "head": combined["head"],
        "head_config": head.describe(),
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "greedy": True,
        "draft_dtype": cfg.draft_dtype,
        "replay_batch_size": args.batch_size,
        "sequence_file": args.sequences,
        "sequences_cached_before_run": sequences_cached,
        "protocol_wall_seconds": protocol_wall,
        "protocol_cpu_seconds": protocol_cpu,
        "total_prompts": sum(s["prompts"] for s in sets.values()),
        "replay_vs_engine": {
            "steps": sum(a["steps"] for a in agree),
            "steps_equal": sum(a["steps_equal"] for a in agree),
            "prompt_runs": sum(a["timing_prompts"] for a in agree),
            "prompt_runs_equal": sum(a["prompts"] for a in agree),
        },
        "batching_check": check,
        "served_tau": semantics,
        "plain_generation_tokens_per_s": throughput,
        "diagnostics_wall_seconds": time.perf_counter() - extra_wall,
        "sets": sets,
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.copy(work / "protocol.md", out.with_suffix(".md"))
    shutil.copy(work / "protocol.png", out.with_suffix(".png"))
    print((work / "protocol.md").read_text())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
