"""`mtpkit sft`: fine-tune the model (full / LoRA / QLoRA) and train its MTP head in the same pass.

Loss = CE on assistant tokens + α · MTP loss, where the MTP head reads the hidden states of the
same forward pass (no second forward). Model and head are clipped separately; by default the
MTP loss is detached from the model, so the fine-tuned model is the one plain SFT would give.
Writes `out/model` (merged HF directory, or a peft adapter with `save_merged: false`) and
`out/head` (a native head directory for `mtpkit eval` / `mtpkit export`); checkpoints resume.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from mtpkit.config import Checked, check_fields, checked, to_dict
from mtpkit.errors import MtpkitError
from mtpkit.joint.data import Batches, collate_examples, load_sft_examples
from mtpkit.joint.mtp_loss import (
    MTPLossConfig,
    build_joint_head,
    check_joint_head,
    joint_head_type,
    mtp_loss_from_config,
    warn_if_undetached,
)
from mtpkit.joint.policy import (
    JointOptimConfig,
    Policy,
    PolicyConfig,
    clip_separately,
    finish_joint,
    make_optimizer,
    policy_forward,
    prepare_policy,
    restore_joint,
    save_joint_checkpoint,
)
from mtpkit.models import Target, load_target
from mtpkit.train.config import check_head
from mtpkit.train.frame import Cadence, Run, lr_lambda, seed_everything
from mtpkit.train.losses import lm_loss, shifted_labels
from mtpkit.train.metrics import add_depth_stats, add_sim_tau, depth_metrics, sim_tau_metrics

log = logging.getLogger(__name__)


class SFTError(MtpkitError, RuntimeError):
    pass


@dataclass
class SFTDataConfig(Checked):
    paths: list[str] = field(default_factory=list)  # SFT records (see mtpkit.joint.data)
    max_seq_len: int = checked(1024, ge=2)
    batch_size: int = checked(4, ge=1)
    system_prompt: str | None = None
    max_examples: int | None = checked(None, ge=1)  # None: all
    eval_examples: int = checked(16, ge=0)  # the first N examples are held out


@dataclass
class SFTConfig:
    model: str = "smollm2-135m-instruct"
    out: str = "runs/sft"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    head_type: str = "mtp"
    head: dict = field(default_factory=dict)  # head family config (e.g. num_depths)
    init_head: str | None = None  # start from a trained head directory
    mtp: MTPLossConfig = field(default_factory=MTPLossConfig)
    optim: JointOptimConfig = field(default_factory=JointOptimConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    max_steps: int = checked(100, ge=1)
    seed: int = 0
    log_every: int = checked(10, ge=1)
    eval_every: int = checked(50, ge=1)
    save_every: int = checked(50, ge=1)
    simulate_k: int = checked(3, ge=0, meaning="0 = no estimate")
    save_merged: bool = True  # false: write the peft adapter only (lora / qlora)
    progress: bool = True

    def __post_init__(self):
        check_fields(self)
        check_joint_head(self.head_type)
        if not self.init_head:
            check_head(self.head_type, self.head)


def joint_loss(policy: Policy, head, ids, mask, mtp_cfg: MTPLossConfig, chunk_size: int = 1024):
    """CE on masked tokens + α · MTP from one forward pass; returns (loss, ce, mtp stats, top-1 hits)."""
    hidden = policy_forward(policy, ids)
    labels, valid = shifted_labels(ids, mask, 0)
    ce_sum, hit = lm_loss(hidden[valid], labels[valid], policy.target.lm_head, "ce", None, chunk_size)
    ce = ce_sum / max(int(valid.sum()), 1)
    loss, stats = ce, []
    if mtp_cfg.active:
        mtp, stats = mtp_loss_from_config(head, hidden, ids, mask, mtp_cfg)
        loss = ce + mtp_cfg.scaling_factor * mtp
    return loss, ce, stats, hit


@torch.no_grad()
def held_out_metrics(policy: Policy, head, examples, cfg: SFTConfig) -> dict:
    sums: dict[str, float] = {"ce_sum": 0.0, "ce_count": 0.0, "hits": 0.0}
    eval_mtp = MTPLossConfig(**{**to_dict(cfg.mtp), "enabled": True, "scaling_factor": 1.0})
    for start in range(0, len(examples), cfg.data.batch_size):
        ids, mask = collate_examples(examples[start : start + cfg.data.batch_size])
        _, ce, stats, hit = joint_loss(policy, head, ids, mask, eval_mtp)
        sums["ce_sum"] += float(ce) * len(hit)
        sums["ce_count"] += len(hit)
        sums["hits"] += float(hit.sum())
        add_depth_stats(sums, stats)
        add_sim_tau(sums, stats, cfg.simulate_k)
    n = max(sums["ce_count"], 1.0)
    return {
        "ce": sums["ce_sum"] / n,
        "acc": sums["hits"] / n,
        **depth_metrics(sums, head.cfg.train_depths),
        **sim_tau_metrics(sums, cfg.simulate_k),
    }


def sft(cfg: SFTConfig, resume: bool = False, target: Target | None = None) -> dict:
    run = Run(cfg.out, resume, SFTError)
    joint_head_type(cfg.head_type, cfg.init_head)
    if not cfg.data.paths:
        raise SFTError("set data.paths: SFT record files (JSONL with answers, e.g. GSM8K train)")
    seed_everything(cfg.seed)
    target = target or load_target(cfg.model)
    target.identity()  # of the base model, before it changes
    tok = target.tokenizer
    eos = target.eos_token_ids[0]
    examples = load_sft_examples(
        cfg.data.paths, tok, eos, cfg.data.max_seq_len, cfg.data.system_prompt, cfg.data.max_examples
    )
    held, train_examples = examples[: cfg.data.eval_examples], examples[cfg.data.eval_examples :]
    if len(train_examples) < cfg.data.batch_size:
        raise SFTError(f"{cfg.data.paths}: {len(train_examples)} training examples, fewer than one batch")
    head = build_joint_head(cfg.head_type, cfg.head, cfg.init_head, target)  # before quantization
    policy = prepare_policy(target, cfg.policy)
    head.train()
    warn_if_undetached(cfg.mtp)
    o = cfg.optim
    optimizer = make_optimizer(policy, head, o.lr, o.head_lr, o.betas, o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(o.warmup_steps, o.schedule, o.min_lr_ratio, cfg.max_steps)
    )
    batches = Batches(train_examples, cfg.data.batch_size, cfg.seed)

    run.open(to_dict(cfg))
    state = run.restore(lambda ckpt: restore_joint(ckpt, head, target, optimizer, scheduler, policy))
    step = 0
    if state is not None:
        step = state["step"]
        batches.load_state_dict(state["data"])

    def train_step(step: int) -> dict:
        ids, mask = collate_examples(batches.next())
        optimizer.zero_grad(set_to_none=True)
        loss, ce, stats, hit = joint_loss(policy, head, ids, mask, cfg.mtp)
        if not math.isfinite(loss.item()):
            raise SFTError(f"step {step + 1}: loss is {loss.item()}; lower optim.lr")
        loss.backward()
        gn_model, gn_head = clip_separately(optimizer, (o.grad_clip, o.head_grad_clip))
        optimizer.step()
        scheduler.step()
        sums: dict[str, float] = {}
        add_depth_stats(sums, stats)
        return {
            "loss": loss.item(),
            "ce": ce.item(),
            "acc": float(hit.float().mean()),
            "grad_norm_model": gn_model,
            "grad_norm_head": gn_head,
            **depth_metrics(sums, len(stats)),
        }

    def evaluate_held_out() -> dict:
        head.eval()
        metrics = held_out_metrics(policy, head, held, cfg)
        head.train()
        return metrics

    def save(step: int) -> None:
        save_joint_checkpoint(run.dir, step, head, target, optimizer, scheduler, batches.state_dict(), policy)

    step, last_eval = run.loop(
        Cadence(cfg.max_steps, cfg.log_every, cfg.save_every, cfg.eval_every),
        step,
        train_step,
        save,
        evaluate_held_out if held else None,
        progress=cfg.progress,
        postfix=lambda m: {"ce": f"{m['ce']:.3f}"},
        eval_at_start=True,  # the starting point: the base model and the untrained head
    )
    model_dir, head_out = finish_joint(policy, head, run.dir, target, cfg.save_merged)
    return {
        "run": str(run.dir),
        "model": str(model_dir),
        "head": str(head_out),
        "step": step,
        "eval": last_eval,
    }
