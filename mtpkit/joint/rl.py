"""`mtpkit rl`: GRPO with the DAPO refinements, training the MTP head online on the rollouts.

One step:
  1. rollouts — G completions for each of B prompts, from mtpkit's own batched engine
     (`BatchedSpeculativeDecoder`, `rollout.batch_size` sequences at once, each accepting its
     own number of drafts): with `rollout.enable_rollout` the current MTP head drafts and the
     policy verifies (lossless rejection sampling at the rollout temperature; τ and per-position
     acceptance are logged, so the head's drift from the policy is visible), otherwise plain
     batched sampling on the same path;
  2. rewards — the verifiers plus DAPO's soft overlong punishment (eq. 13);
  3. dynamic sampling — groups whose rewards are all equal carry no advantage; they are dropped
     and new prompts are sampled until B groups remain (at most `max_sample_rounds` rounds);
  4. update — group-normalised advantages, clip-higher (ε_low, ε_high), token-level loss
     normalisation, truncated completions masked out of the policy loss, optional k3 KL to the
     initial model (β), plus α · MTP loss on the rollout tokens from the same forward pass;
     model and head gradients are clipped separately.

Why not TRL's GRPOTrainer (read at trl 1.16): its loss path (`_compute_loss` →
`_get_per_token_logps_and_entropies`) keeps only logits, so an MTP loss on the same forward
means overriding that private method; dynamic sampling needs refills inside
`_generate_and_score_completions` and its repeat sampler (TRL issue #3708 is open, a PR was
declined); a separate head clip needs the inner training loop of `transformers.Trainer`. The
loss types `dapo`, `epsilon_high` and `mask_truncated_completions` are there, but three private
overrides that break with TRL's releases weigh more than this loop, which is small enough to read.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mtpkit.config import Checked, check_fields, checked, to_dict
from mtpkit.data import chat
from mtpkit.decode.batched import BatchedSpeculativeDecoder
from mtpkit.decode.metrics import AcceptanceStats
from mtpkit.errors import MtpkitError
from mtpkit.joint.data import RLPrompt, load_rl_prompts
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
from mtpkit.joint.rewards import Reward, get_reward, overlong_penalty
from mtpkit.models import Target, load_target
from mtpkit.train.config import check_head
from mtpkit.train.frame import Cadence, Run, lr_lambda, seed_everything
from mtpkit.train.losses import shifted_labels
from mtpkit.train.metrics import add_depth_stats, depth_metrics

log = logging.getLogger(__name__)


class RLError(MtpkitError, RuntimeError):
    pass


@dataclass
class RolloutConfig(Checked):
    enable_rollout: bool = False  # speculative rollouts with the current MTP head (veRL's name)
    k: int = checked(3, ge=1)  # draft tokens per step
    temperature: float = checked(1.0, ge=0)
    top_p: float = checked(1.0, gt=0, le=1)
    max_new_tokens: int = checked(256, ge=1)  # L_max
    batch_size: int = checked(16, ge=1)  # sequences decoded together (plain and speculative alike)


@dataclass
class DAPOConfig(Checked):
    group_size: int = checked(8, ge=2)  # G completions per prompt (advantages are normalised in a group)
    prompts_per_step: int = checked(4, ge=1)  # B groups per update
    eps_low: float = checked(0.2, ge=0)
    eps_high: float = checked(0.28, ge=0)  # clip-higher
    beta: float = checked(0.0, ge=0, meaning="0 = no KL (DAPO)")  # k3 KL to the initial model
    mask_truncated: bool = True  # completions cut at L_max get no policy loss
    overlong_buffer: int = checked(64, ge=0, meaning="0 = off")  # L_cache of the soft overlong punishment
    dynamic_sampling: bool = True
    max_sample_rounds: int = checked(3, ge=1)  # generation rounds per step when refilling dropped groups
    minibatches: int = checked(1, ge=1)  # optimizer steps per rollout batch (> 1: later ones are off-policy)
    micro_batch_size: int = checked(4, ge=1)  # sequences per forward/backward (gradient accumulation)
    adv_eps: float = checked(1e-6, gt=0)


@dataclass
class RLConfig:
    model: str = "smollm2-135m-instruct"
    out: str = "runs/rl"
    prompts: list[str] = field(default_factory=list)  # e.g. ../shared/data/prompts/gsm8k_train.jsonl
    format: str | None = None
    system_prompt: str | None = None
    max_prompts: int | None = checked(None, ge=1)  # None: all
    rewards: list[str] = field(default_factory=lambda: ["gsm8k"])
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    head_type: str = "mtp"
    head: dict = field(default_factory=dict)
    init_head: str | None = None
    mtp: MTPLossConfig = field(default_factory=MTPLossConfig)
    optim: JointOptimConfig = field(default_factory=JointOptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: DAPOConfig = field(default_factory=DAPOConfig)
    max_steps: int = checked(20, ge=1)
    seed: int = 0
    log_every: int = checked(1, ge=1)
    save_every: int = checked(10, ge=1)
    save_merged: bool = True
    progress: bool = True

    def __post_init__(self):
        check_fields(self)
        check_joint_head(self.head_type)
        if not self.init_head:
            check_head(self.head_type, self.head)


# ---------------------------------------------------------------------------- DAPO pieces
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r − mean_group) / (std_group + eps), std unbiased as in TRL and veRL; rewards [N·G]."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """Dynamic-sampling filter: True for groups whose rewards are not all equal."""
    r = rewards.view(-1, group_size)
    return (r.max(1).values - r.min(1).values) > tol


def clipped_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) and where the low / high clip was active."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, low, high


def token_level_loss(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """DAPO's token-level normalisation: Σ over all tokens of the batch / the batch's token count
    (long answers weigh by their length, unlike GRPO's per-sequence mean)."""
    return (per_token * mask).sum() / max(num_tokens, 1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: e^{ref−logp} − (ref − logp) − 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ---------------------------------------------------------------------------- log-probs
def _logp_chunk(hidden, weight, bias, labels, temperature: float):
    logp_all = F.log_softmax(F.linear(hidden, weight, bias).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy.detach()


def token_logps(hidden, lm_head, labels, temperature: float = 1.0, chunk_size: int = 1024):
    """Log-prob of `labels` and entropy per row of hidden [N, H], chunked over the vocabulary-wide
    logits and recomputed in backward (the logits of a 49k vocabulary are never all kept)."""
    t = temperature if temperature > 0 else 1.0
    logps, ents = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        args = (hidden[s : s + chunk_size], lm_head.weight, lm_head.bias, labels[s : s + chunk_size], t)
        if torch.is_grad_enabled() and hidden.requires_grad:
            lp, ent = checkpoint(_logp_chunk, *args, use_reentrant=False)
        else:
            lp, ent = _logp_chunk(*args)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        return hidden.new_zeros(0), hidden.new_zeros(0)
    return torch.cat(logps), torch.cat(ents)


# ---------------------------------------------------------------------------- rollouts
@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]
    truncated: bool  # stopped at max_new_tokens without an end-of-turn token
    text: str = ""
    reward: float = 0.0


@torch.no_grad()
def generate_rollouts(
    target: Target, head, prompt_ids: list[list[int]], cfg: RolloutConfig, seed: int
) -> tuple[list[Completion], AcceptanceStats, float]:
    """Sample one completion per prompt with mtpkit's batched engine, `cfg.batch_size` prompts at
    a time; speculative when `head` is given. Each row samples from a seed of its own drawn from
    `seed`, so a completion does not depend on the batch size.

    Returns the completions, the acceptance of the drafts (empty without a head) and seconds.
    """
    was_training = target.model.training
    target.model.eval()
    decoder = BatchedSpeculativeDecoder(
        target,
        head,
        k=cfg.k if head is not None else 0,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=seed,
    )
    eos = set(target.eos_token_ids)
    acc = AcceptanceStats(k=cfg.k if head is not None else 0)
    out, start = [], time.perf_counter()
    try:
        for b in range(0, len(prompt_ids), cfg.batch_size):
            batch = prompt_ids[b : b + cfg.batch_size]
            for ids, result in zip(batch, decoder.generate_batch(batch, cfg.max_new_tokens), strict=True):
                for s in result.steps:
                    acc.add(s.drafted, s.accepted)
                truncated = not result.tokens or result.tokens[-1] not in eos
                out.append(Completion(list(ids), result.tokens, truncated))
    finally:
        if head is not None:
            head.train()
        target.model.train(was_training)
    return out, acc, time.perf_counter() - start


def score(
    completions: list[Completion], prompts: list[RLPrompt], rewards: list[Reward], tokenizer, cfg: RLConfig
) -> None:
    """Verifier rewards + soft overlong punishment, written into each completion."""
    for c, p in zip(completions, prompts, strict=True):
        c.text = tokenizer.decode(c.ids, skip_special_tokens=True)
        fields = {k: v for k, v in p.fields.items() if k not in ("prompt", "completion")}
        c.reward = sum(f(p.prompt.turns[0], c.text, **fields) for f in rewards)
        if cfg.algo.overlong_buffer > 0:
            c.reward += overlong_penalty(len(c.ids), cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer)


# ---------------------------------------------------------------------------- update
@dataclass
class Sequences:
    ids: torch.Tensor  # [N, T] right-padded prompt + completion
    completion: torch.Tensor  # [N, T] bool: completion tokens (the MTP loss trains on them)
    policy: torch.Tensor  # [N, T] bool: completion tokens that get policy loss
    advantages: torch.Tensor  # [N]


def build_sequences(
    completions: list[Completion], advantages: torch.Tensor, mask_truncated: bool
) -> Sequences:
    T = max(len(c.prompt_ids) + len(c.ids) for c in completions)
    N = len(completions)
    ids = torch.zeros(N, T, dtype=torch.long)
    comp = torch.zeros(N, T, dtype=torch.bool)
    for row, c in enumerate(completions):
        P, C = len(c.prompt_ids), len(c.ids)
        ids[row, : P + C] = torch.tensor(c.prompt_ids + c.ids)
        comp[row, P : P + C] = True
    truncated = torch.tensor([c.truncated for c in completions])
    policy = comp & ~truncated[:, None] if mask_truncated else comp.clone()
    return Sequences(ids, comp, policy, advantages)


def _rows(seqs: Sequences, idx: list[int]):
    """Row-level view of sequences `idx`: labels (next tokens) where they are completion tokens."""
    ids = seqs.ids[idx]
    labels, valid = shifted_labels(ids, seqs.completion[idx], 0)
    _, policy_valid = shifted_labels(ids, seqs.policy[idx], 0)
    adv = seqs.advantages[idx][:, None].expand_as(valid)
    return ids, labels, valid, policy_valid[valid], adv[valid]


@torch.no_grad()
def sequence_logps(policy: Policy, seqs: Sequences, micro: int, temperature: float, reference=None):
    """Completion-token log-probs per sequence (list of 1-D tensors), under the policy or `reference`."""
    out = []
    for s in range(0, len(seqs.ids), micro):
        idx = list(range(s, min(s + micro, len(seqs.ids))))
        ids, labels, valid, _, _ = _rows(seqs, idx)
        if reference is None:
            hidden, lm_head = policy_forward(policy, ids), policy.target.lm_head
        else:
            hidden, lm_head = reference(ids)
        lp, _ = token_logps(hidden[valid], lm_head, labels[valid], temperature)
        counts = valid.sum(1).tolist()
        out += list(lp.split(counts))
    return out


def _reference(policy: Policy, beta: float):
    """A callable ids -> (hidden, lm_head) of the initial model, for the KL term (None if β = 0)."""
    if beta == 0:
        return None
    if policy.peft_model is not None:

        def ref(ids):
            with policy.peft_model.disable_adapter():
                return policy_forward(policy, ids), policy.target.lm_head

        return ref
    frozen = copy.deepcopy(policy.model).eval().requires_grad_(False)

    def ref_full(ids):
        return frozen.get_decoder()(
            input_ids=ids, use_cache=False
        ).last_hidden_state, frozen.get_output_embeddings()

    return ref_full


def update(policy: Policy, head, optimizer, seqs: Sequences, cfg: RLConfig, reference) -> dict:
    """Minibatched policy + head update on one rollout batch; returns the step's metrics."""
    a, o = cfg.algo, cfg.optim
    N = len(seqs.ids)
    order = list(range(N))
    off_policy = a.minibatches > 1
    old = sequence_logps(policy, seqs, a.micro_batch_size, cfg.rollout.temperature) if off_policy else None
    ref = (
        sequence_logps(policy, seqs, a.micro_batch_size, cfg.rollout.temperature, reference)
        if reference is not None
        else None
    )
    sums = dict.fromkeys(("loss", "tokens", "clip_low", "clip_high", "entropy", "kl", "ent_tokens"), 0.0)
    depth_sums: dict[str, float] = {}
    gn_model = gn_head = 0.0
    per_mb = math.ceil(N / a.minibatches)
    for m in range(0, N, per_mb):
        mb = order[m : m + per_mb]
        _, _, valid_all, pol_all, _ = _rows(seqs, mb)
        n_policy = int(pol_all.sum())  # token-level normaliser of this optimizer step
        n_mtp = max(int(valid_all.sum()), 1)
        optimizer.zero_grad(set_to_none=True)
        for s in range(0, len(mb), a.micro_batch_size):
            idx = mb[s : s + a.micro_batch_size]
            ids, labels, valid, pol, adv = _rows(seqs, idx)
            hidden = policy_forward(policy, ids)
            logp, ent = token_logps(
                hidden[valid], policy.target.lm_head, labels[valid], cfg.rollout.temperature
            )
            old_lp = torch.cat([old[i] for i in idx]) if old is not None else logp.detach()
            per_tok, low, high = clipped_token_loss(logp, old_lp, adv, a.eps_low, a.eps_high)
            if ref is not None:
                kl = k3_kl(logp, torch.cat([ref[i] for i in idx]))
                per_tok = per_tok + a.beta * kl
                sums["kl"] += float((kl.detach() * pol).sum())
            loss = token_level_loss(per_tok, pol, n_policy)
            if cfg.mtp.active:
                mtp, stats = mtp_loss_from_config(head, hidden, ids, seqs.completion[idx], cfg.mtp)
                loss = loss + cfg.mtp.scaling_factor * mtp * (int(valid.sum()) / n_mtp)
                add_depth_stats(depth_sums, stats)
            loss.backward()
            sums["loss"] += float((per_tok.detach() * pol).sum())
            sums["tokens"] += float(pol.sum())
            sums["clip_low"] += float((low & pol).sum())
            sums["clip_high"] += float((high & pol).sum())
            sums["entropy"] += float(ent.sum())
            sums["ent_tokens"] += len(ent)
        gn_model, gn_head = clip_separately(optimizer, (o.grad_clip, o.head_grad_clip))
        optimizer.step()
    n = max(sums["tokens"], 1.0)
    metrics = {
        "policy_loss": sums["loss"] / n,
        "clip_ratio_low": sums["clip_low"] / n,
        "clip_ratio_high": sums["clip_high"] / n,
        "entropy": sums["entropy"] / max(sums["ent_tokens"], 1.0),
        "grad_norm_model": gn_model,
        "grad_norm_head": gn_head,
    }
    if ref is not None:
        metrics["kl"] = sums["kl"] / n
    if depth_sums:
        metrics.update({f"mtp_{k}": v for k, v in depth_metrics(depth_sums, head.cfg.train_depths).items()})
    return metrics


# ---------------------------------------------------------------------------- the loop
class PromptStream:
    """Prompts in shuffled epochs; the position is checkpointed."""

    def __init__(self, prompts: list[RLPrompt], seed: int):
        self.prompts, self.seed, self.epoch, self.pos = prompts, seed, 0, 0

    def take(self, n: int) -> list[RLPrompt]:
        out = []
        while len(out) < n:
            order = list(range(len(self.prompts)))
            random.Random(self.seed + self.epoch).shuffle(order)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            out.append(self.prompts[order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def prompt_ids(tokenizer, p: RLPrompt, system_prompt: str | None) -> list[int]:
    return chat.start(tokenizer, p.prompt, system_prompt).ids


def sample_groups(policy: Policy, head, stream: PromptStream, rewards, cfg: RLConfig, step: int) -> dict:
    """Rollouts for B informative groups (dynamic sampling); returns completions and rollout stats."""
    a, r = cfg.algo, cfg.rollout
    tok = policy.target.tokenizer
    kept: list[list[Completion]] = []
    all_rewards, zero_std, groups_seen, truncated, lengths = [], 0, 0, 0, []
    acc = AcceptanceStats(k=r.k if r.enable_rollout else 0)
    seconds, tokens = 0.0, 0
    for rnd in range(a.max_sample_rounds if a.dynamic_sampling else 1):
        need = a.prompts_per_step - len(kept)
        if need <= 0:
            break
        prompts = [p for p in stream.take(need) for _ in range(a.group_size)]
        ids = [prompt_ids(tok, p, cfg.system_prompt) for p in prompts]
        seed = cfg.seed * 1_000_003 + step * 101 + rnd
        comps, stats, secs = generate_rollouts(
            policy.target, head if r.enable_rollout else None, ids, r, seed
        )
        if r.enable_rollout:
            acc.merge(stats)
        seconds += secs
        tokens += sum(len(c.ids) for c in comps)
        score(comps, prompts, rewards, tok, cfg)
        rew = torch.tensor([c.reward for c in comps])
        all_rewards.append(rew)
        truncated += sum(c.truncated for c in comps)
        lengths += [len(c.ids) for c in comps]
        informative = informative_groups(rew, a.group_size)
        zero_std += int((~informative).sum())
        groups_seen += len(informative)
        for g, ok in enumerate(informative.tolist()):
            if ok or not a.dynamic_sampling:
                kept.append(comps[g * a.group_size : (g + 1) * a.group_size])
    rewards_t = torch.cat(all_rewards)
    stats = {
        "reward_mean": float(rewards_t.mean()),
        "reward_std": float(rewards_t.std()) if len(rewards_t) > 1 else 0.0,
        "frac_zero_std_groups": zero_std / max(groups_seen, 1),
        "groups_sampled": groups_seen,
        "groups_kept": min(len(kept), a.prompts_per_step),
        "truncated_frac": truncated / max(len(lengths), 1),
        "response_length": sum(lengths) / max(len(lengths), 1),
        "rollout_seconds": seconds,
        "rollout_tokens_per_s": tokens / max(seconds, 1e-9),
    }
    if r.enable_rollout:
        stats.update(
            {"rollout_tau": acc.tau, "rollout_acceptance_rate": acc.acceptance_rate}
            | {f"rollout_accept_pos{i + 1}": v for i, v in enumerate(acc.per_position)}
        )
    return {"groups": kept[: a.prompts_per_step], "stats": stats}


def rl(cfg: RLConfig, resume: bool = False, target: Target | None = None, reward_fns=None) -> dict:
    """Run GRPO/DAPO for `cfg.max_steps` steps; `reward_fns` overrides `cfg.rewards` with callables."""
    run = Run(cfg.out, resume, RLError)
    joint_head_type(cfg.head_type, cfg.init_head)
    if not cfg.prompts:
        raise RLError("set prompts: prompt files with the fields the rewards need (e.g. GSM8K train)")
    a = cfg.algo
    if a.group_size < 2:
        raise RLError("algo.group_size must be >= 2 (advantages are normalised within a group)")
    seed_everything(cfg.seed)
    rewards = reward_fns or [get_reward(n) for n in cfg.rewards]
    prompts = load_rl_prompts(cfg.prompts, cfg.format)[: cfg.max_prompts]
    target = target or load_target(cfg.model)
    target.identity()
    head = build_joint_head(cfg.head_type, cfg.head, cfg.init_head, target)
    policy = prepare_policy(target, cfg.policy)
    head.train()
    warn_if_undetached(cfg.mtp)
    o = cfg.optim
    optimizer = make_optimizer(policy, head, o.lr, o.head_lr, o.betas, o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(o.warmup_steps, o.schedule, o.min_lr_ratio, cfg.max_steps)
    )
    reference = _reference(policy, a.beta)
    stream = PromptStream(prompts, cfg.seed)

    run.open(to_dict(cfg))
    state = run.restore(lambda ckpt: restore_joint(ckpt, head, target, optimizer, scheduler, policy))
    step = 0
    if state is not None:
        step = state["step"]
        stream.load_state_dict(state["data"])
    history = []

    def train_step(step: int) -> dict:
        t0 = time.perf_counter()
        sampled = sample_groups(policy, head, stream, rewards, cfg, step)
        metrics = dict(sampled["stats"])
        groups = sampled["groups"]
        if groups:
            comps = [c for g in groups for c in g]
            adv = group_advantages(torch.tensor([c.reward for c in comps]), a.group_size, a.adv_eps)
            seqs = build_sequences(comps, adv, a.mask_truncated)
            metrics.update(update(policy, head, optimizer, seqs, cfg, reference))
        else:
            log.warning("step %d: every group had equal rewards; no update", step + 1)
        scheduler.step()
        metrics["step_seconds"] = time.perf_counter() - t0
        history.append(metrics)
        return dict(metrics)

    def save(step: int) -> None:
        save_joint_checkpoint(run.dir, step, head, target, optimizer, scheduler, stream.state_dict(), policy)

    step, _ = run.loop(
        Cadence(cfg.max_steps, cfg.log_every, cfg.save_every),
        step,
        train_step,
        save,
        progress=cfg.progress,
        postfix=lambda m: {"reward": f"{m['reward_mean']:.2f}"},
    )
    model_dir, head_out = finish_joint(policy, head, run.dir, target, cfg.save_merged)
    return {
        "run": str(run.dir),
        "model": str(model_dir),
        "head": str(head_out),
        "step": step,
        "history": history,
    }
