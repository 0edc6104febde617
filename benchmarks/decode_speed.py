"""Decode-loop costs on the embedded model: plain tokens/s per cache kind and dtype beside HF
`generate()`, verification of 1..5 rows, one draft step per head family, the break-even τ, and
tokens/s of batched plain and speculative decoding at batch 1, 4, 16 (`--batches`).

    .venv/bin/python benchmarks/decode_speed.py                 # ~5 min on 2 cores
    .venv/bin/python benchmarks/decode_speed.py --tokens 32     # quicker

Everything is measured side by side in one run, interleaved (each repeat runs every variant
once), and reported as the median over repeats: absolute times on a shared 2-core machine are
noisy, ratios within one run are what count. Heads are randomly initialised — the cost of a
draft does not depend on what it learned. Writes benchmarks/results/decode_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mtpkit.data import chat
from mtpkit.data.prompts import Prompt, load_prompts
from mtpkit.decode.batched import BatchedSpeculativeDecoder
from mtpkit.decode.engine import SpeculativeDecoder
from mtpkit.heads import build_head, load_head
from mtpkit.models import DTYPES, EMBEDDED_ALIAS, fast_bfloat16, load_target

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Explain in a few sentences why the sky is blue."
HEADS = {"mtp": {"num_depths": 1}, "eagle3": {}, "medusa": {}, "diffusion": {"block_length": 4}}


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def plain_rates(target, ids: list[int], tokens: int, repeats: int) -> dict[str, float]:
    """Plain greedy tokens/s (decode only, prefill excluded): engine static / dynamic, HF generate."""
    from transformers import GenerationConfig

    times: dict[str, list[float]] = {"engine_static": [], "engine_dynamic": [], "hf_generate": []}
    gen = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    x = torch.tensor([ids])
    for _ in range(repeats):
        for cache in ("static", "dynamic"):
            r = SpeculativeDecoder(target, None, cache=cache).generate(ids, tokens, eos_ids=[])
            times[f"engine_{cache}"].append((r.seconds - r.prefill_seconds) / (len(r.tokens) - 1))
        with torch.no_grad():
            start = time.perf_counter()
            target.model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen)
            times["hf_generate"].append((time.perf_counter() - start) / tokens)  # includes its prefill
    return {name: 1 / statistics.median(t) for name, t in times.items()}


def verify_ms(target, ids: list[int], rows: list[int], repeats: int) -> dict[int, float]:
    """One verification forward of n rows on top of a prompt-long static cache, rolled back each time."""
    dec = SpeculativeDecoder(target, None)
    cache = dec._new_cache(len(ids) + max(rows) + 1)
    with torch.no_grad():
        dec._target_forward(ids, 0, cache, last_only=True)
        times: dict[int, list[float]] = {n: [] for n in rows}
        for _ in range(repeats):
            for n in rows:
                start = time.perf_counter()
                dec._target_forward(ids[-n:], len(ids), cache)
                times[n].append(time.perf_counter() - start)
                cache.crop(-n)
    return {n: _median_ms(t) for n, t in times.items()}


def draft_ms(
    target, ids: list[int], k: int, tokens: int, repeats: int, dtype: torch.dtype
) -> dict[str, float]:
    """Median draft time per step of K tokens (drafting in `dtype`) in a real decode."""
    out = {}
    for name, fields in HEADS.items():
        head = build_head(target, name, fields)
        dec = SpeculativeDecoder(target, head, k=k, draft_dtype=dtype)
        per_step = []
        for _ in range(repeats):
            r = dec.generate(ids, tokens, eos_ids=[])
            per_step.append(r.draft_seconds / len(r.steps))
        out[name] = _median_ms(per_step)
    return out


def batched_rates(
    target, head, k: int, tokens: int, batches: list[int], repeats: int, dtype: torch.dtype
) -> dict:
    """Generated tokens/s (prefill included) of `generate_batch` over B builtin prompts, plain
    (K = 0) and speculative with `head` (drafting in `dtype`), with the speculative rows' τ."""
    prompts = [chat.start(target.tokenizer, p).ids for p in load_prompts(["builtin"])]
    out: dict = {"plain": {}, "speculative": {}, "tau": {}}
    plain = BatchedSpeculativeDecoder(target, None, k=0)
    spec = BatchedSpeculativeDecoder(target, head, k=k, draft_dtype=dtype)
    for b in batches:
        rows = [prompts[i % len(prompts)] for i in range(b)]
        times: dict[str, list[float]] = {"plain": [], "speculative": []}
        for _ in range(repeats):
            for name, dec in (("plain", plain), ("speculative", spec)):
                start = time.perf_counter()
                results = dec.generate_batch(rows, tokens, eos_ids=[])
                times[name].append((time.perf_counter() - start) / sum(len(r.tokens) for r in results))
        steps = [s for r in results for s in r.steps]
        out["tau"][b] = 1 + sum(s.accepted for s in steps) / max(len(steps), 1)
        for name, t in times.items():
            out[name][b] = 1 / statistics.median(t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per plain decode")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--k", type=int, default=3, help="draft tokens per step for the draft costs")
    p.add_argument(
        "--batches", type=int, nargs="*", default=[1, 4, 16], help="batch sizes of batched decoding"
    )
    p.add_argument(
        "--head", type=Path, help="a trained head for batched speculative decoding (default: random MTP)"
    )
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="target dtypes to measure")
    p.add_argument(
        "--draft-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 where its GEMMs are native (or the target is bf16), else float32",
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode_speed.json")
    args = p.parse_args()
    torch.manual_seed(0)
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "k": args.k,
        "dtypes": {},
    }
    for dtype in args.dtypes:
        fast = fast_bfloat16() or dtype == "bfloat16"
        draft = (
            DTYPES["bfloat16" if fast else "float32"]
            if args.draft_dtype == "auto"
            else DTYPES[args.draft_dtype]
        )
        target = load_target(EMBEDDED_ALIAS, dtype=dtype)
        ids = chat.start(target.tokenizer, Prompt((PROMPT,), None, "bench")).ids
        rates = plain_rates(target, ids, args.tokens, args.repeats)
        verify = verify_ms(target, ids, [1, 2, 3, 4, 5], args.repeats * 4)
        drafts = draft_ms(target, ids, args.k, args.tokens // 2, args.repeats, draft)
        head = load_head(args.head, target) if args.head else build_head(target, "mtp", HEADS["mtp"])
        batched = batched_rates(target, head, args.k, args.tokens // 2, args.batches, args.repeats, draft)
        plain_ms = 1000 / rates["engine_static"]
        step = {name: drafts[name] + verify[args.k + 1] for name in drafts}
        results["dtypes"][dtype] = {
            "prompt_tokens": len(ids),
            "plain_tokens_per_s": rates,
            "static_vs_dynamic": rates["engine_static"] / rates["engine_dynamic"],
            "static_vs_hf_generate": rates["engine_static"] / rates["hf_generate"],
            "verify_ms": verify,
            "verify_ratio_4_vs_1": verify[4] / verify[1],
            "draft_ms_k": drafts,
            "step_ms_k": step,
            "step_vs_plain": {name: ms / plain_ms for name, ms in step.items()},
            # A step yields τ tokens; it pays off once τ > step cost / plain-token cost.
            "break_even_tau": {name: ms / plain_ms for name, ms in step.items()},
            "batched_tokens_per_s": batched,
            "draft_dtype": str(draft).removeprefix("torch."),
        }
        del target
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for dtype, r in results["dtypes"].items():
        rates = r["plain_tokens_per_s"]
        print(
            f"\n## {dtype} target ({r['prompt_tokens']}-token prompt, {args.tokens} new tokens, median of {args.repeats})"
        )
        print("| plain decoding | tokens/s |\n| --- | --- |")
        for name, v in rates.items():
            print(f"| {name} | {v:.1f} |")
        print(
            f"static / dynamic cache: {r['static_vs_dynamic']:.2f}×; static / HF generate: {r['static_vs_hf_generate']:.2f}×"
        )
        print("| verify rows | ms |\n| --- | --- |")
        for n, v in r["verify_ms"].items():
            print(f"| {n} | {v:.1f} |")
        print(f"verify 4 rows / 1 row: {r['verify_ratio_4_vs_1']:.2f}×")
        print(
            f"| head (K = {args.k}, bf16 drafts) | draft ms | step ms | step / plain token = break-even τ |"
        )
        print("| --- | --- | --- | --- |")
        for name in r["draft_ms_k"]:
            print(
                f"| {name} | {r['draft_ms_k'][name]:.1f} | {r['step_ms_k'][name]:.1f} | {r['break_even_tau'][name]:.2f} |"
            )
        b = r["batched_tokens_per_s"]
        print(
            f"| batch | plain tokens/s | speculative tokens/s (K = {args.k}) | τ |\n| --- | --- | --- | --- |"
        )
        for n in b["plain"]:
            print(f"| {n} | {b['plain'][n]:.1f} | {b['speculative'][n]:.1f} | {b['tau'][n]:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
