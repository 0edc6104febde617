"""Joint training on the embedded SmolLM2-135M-Instruct: RL with and without speculative rollouts,
and the head's acceptance before and after SFT with the MTP loss.

Run from the repository root (heavy: take the machine-wide lock):

    flock /tmp/mtpkit-heavy.lock .venv/bin/python benchmarks/rl_mtp.py --init-head HEAD_DIR

(a) GRPO/DAPO on GSM8K training questions, the same seed and budget twice: plain sampling, then
    `enable_rollout` (the current MTP head drafts, the policy verifies). Per step: reward, fraction
    of zero-std groups, rollout τ, rollout tokens/s and whole-step seconds.
(b) LoRA SFT with the MTP loss on GSM8K training answers, starting from a head trained on the
    base model (`--init-head`, e.g. from benchmarks/train_mtp.py). Greedy τ on ../shared/data/eval
    for: base model + that head; the fine-tuned model + the same, now stale head; the fine-tuned
    model + the head trained alongside. (With the MTP loss detached the fine-tuned model is the
    same with or without the MTP loss, so one SFT run gives both.)

Prints tables and writes JSON to benchmarks/results/rl_mtp.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from mtpkit.data import chat
from mtpkit.data.prompts import load_prompts
from mtpkit.heads import load_head
from mtpkit.joint.policy import PolicyConfig
from mtpkit.joint.rl import RLConfig, RolloutConfig, generate_rollouts, rl
from mtpkit.joint.sft import SFTConfig, SFTDataConfig, sft
from mtpkit.models import EMBEDDED_ALIAS, load_target

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "rl_mtp.json"
STEP_KEYS = (
    "reward_mean",
    "frac_zero_std_groups",
    "groups_sampled",
    "response_length",
    "truncated_frac",
    "rollout_tau",
    "rollout_accept_pos1",
    "rollout_accept_pos2",
    "rollout_accept_pos3",
    "rollout_tokens_per_s",
    "rollout_seconds",
    "step_seconds",
    "mtp_acc_d1",
    "entropy",
    "clip_ratio_high",
)


def run_rl(args, enable: bool) -> dict:
    out = args.runs / f"rl-{'spec' if enable else 'plain'}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = RLConfig(
        model=args.model,
        out=str(out),
        prompts=[str(SHARED / "prompts" / "gsm8k_train.jsonl")],
        max_prompts=args.rl_prompts,
        policy=PolicyConfig(mode="lora"),
        init_head=str(args.init_head) if args.init_head else None,
        head={} if args.init_head else {"num_depths": 1},
        max_steps=args.rl_steps,
        save_every=args.rl_steps,
        progress=False,
    )
    cfg.rollout = RolloutConfig(
        enable_rollout=enable, k=args.k, temperature=1.0, max_new_tokens=args.max_new_tokens
    )
    cfg.algo.group_size, cfg.algo.prompts_per_step = args.group_size, args.prompts_per_step
    cfg.algo.max_sample_rounds, cfg.algo.overlong_buffer = 2, args.max_new_tokens // 4
    cfg.algo.micro_batch_size = 4
    cfg.optim.lr, cfg.optim.head_lr = 1e-4, 1e-4
    start = time.perf_counter()
    result = rl(cfg, target=load_target(args.model))
    steps = [{k: h.get(k) for k in STEP_KEYS if k in h} for h in result["history"]]
    return {"enable_rollout": enable, "seconds": time.perf_counter() - start, "steps": steps}


def tau_on(target, head, files: list[Path], n: int, k: int, max_new: int) -> dict:
    prompts = load_prompts(files)[:n]
    ids = [chat.start(target.tokenizer, p).ids for p in prompts]
    comps, acc, secs = generate_rollouts(
        target, head, ids, RolloutConfig(temperature=0.0, k=k, max_new_tokens=max_new), 0
    )
    tokens = sum(len(c.ids) for c in comps)
    return {"tau": acc.tau, "per_position": acc.per_position, "tokens": tokens, "tokens_per_s": tokens / secs}


def run_sft(args) -> dict:
    out = args.runs / "sft"
    shutil.rmtree(out, ignore_errors=True)
    cfg = SFTConfig(
        model=args.model,
        out=str(out),
        policy=PolicyConfig(mode="lora"),
        init_head=str(args.init_head),
        data=SFTDataConfig(
            paths=[str(SHARED / "prompts" / "gsm8k_train.jsonl")],
            max_examples=args.sft_examples,
            eval_examples=16,
            batch_size=4,
            max_seq_len=384,
        ),
        max_steps=args.sft_steps,
        eval_every=args.sft_steps,
        save_every=args.sft_steps,
        log_every=10,
        progress=False,
    )
    cfg.optim.lr, cfg.optim.head_lr, cfg.optim.warmup_steps = 3e-4, 3e-4, 10
    start = time.perf_counter()
    result = sft(cfg, target=load_target(args.model))
    sft_seconds = time.perf_counter() - start
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "eval"]
    base = load_target(args.model)
    tuned = load_target(result["model"])
    cases = {
        "base model + base head": (base, load_head(args.init_head, base)),
        "SFT model + stale base head": (tuned, load_head(args.init_head, tuned)),
        "SFT model + head trained alongside": (tuned, load_head(result["head"], tuned)),
    }
    rows = []
    for name, (target, head) in cases.items():
        for eval_set in args.eval_sets:
            r = tau_on(target, head, [SHARED / "eval" / f"{eval_set}.jsonl"], args.eval_prompts, args.k, 128)
            rows.append({"case": name, "eval_set": eval_set, **r})
            print(f"  {name:<36} {eval_set:<7} τ={r['tau']:.3f}", flush=True)
    return {"sft_seconds": sft_seconds, "steps": args.sft_steps, "held_out": evals, "tau": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["rl", "sft", "all"], default="all")
    p.add_argument("--init-head", type=Path, help="a head trained on the base model (needed for --part sft)")
    p.add_argument("--model", default=EMBEDDED_ALIAS)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-joint")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--rl-steps", type=int, default=5)
    p.add_argument("--rl-prompts", type=int, default=256)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--sft-examples", type=int, default=1000)
    p.add_argument("--eval-sets", nargs="+", default=["gsm8k", "alpaca"])
    p.add_argument("--eval-prompts", type=int, default=10)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = json.loads(args.results.read_text()) if args.results.is_file() else {}
    report.update(
        {
            "benchmark": "rl_mtp",
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
        }
    )
    if args.part in ("rl", "all"):
        report["rl"] = {
            "budget": f"{args.rl_steps} steps, G={args.group_size}, B={args.prompts_per_step}, "
            f"max_new_tokens={args.max_new_tokens}, T=1.0, k={args.k}, LoRA r=16",
            "init_head": str(args.init_head),
            "runs": [run_rl(args, enable) for enable in (False, True)],
        }
        for run in report["rl"]["runs"]:
            print(f"\nenable_rollout={run['enable_rollout']}  ({run['seconds']:.0f} s)")
            print("step  reward  zero-std  τ      rollout tok/s  step s")
            for i, s in enumerate(run["steps"], 1):
                tau = s.get("rollout_tau")
                print(
                    f"{i:>4}  {s['reward_mean']:+.3f}  {s['frac_zero_std_groups']:.2f}      "
                    f"{'-' if tau is None else f'{tau:.3f}':<6} {s['rollout_tokens_per_s']:>12.1f}  {s['step_seconds']:.1f}"
                )
    if args.part in ("sft", "all"):
        if not args.init_head:
            p.error("--part sft needs --init-head (a head trained on the base model)")
        report["sft"] = run_sft(args)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
