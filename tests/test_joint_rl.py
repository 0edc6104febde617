"""RL (GRPO / DAPO) pieces against hand-computed values, rewards, rollouts and a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mtpkit.heads import build_head
from mtpkit.joint.data import load_rl_prompts
from mtpkit.joint.policy import PolicyConfig, prepare_policy
from mtpkit.joint.rewards import final_number, gsm8k_reward, overlong_penalty
from mtpkit.joint.rl import (
    Completion,
    PromptStream,
    RLConfig,
    RolloutConfig,
    build_sequences,
    clipped_token_loss,
    generate_rollouts,
    group_advantages,
    informative_groups,
    k3_kl,
    rl,
    sample_groups,
    token_level_loss,
    token_logps,
)
from mtpkit.models import load_target


# ---------------------------------------------------------------------------- DAPO pieces
def test_clip_higher_is_asymmetric():
    ratios = torch.tensor([1.5, 1.25, 0.5, 0.75, 0.85, 1.25])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0])
    loss, low, high = clipped_token_loss(ratios.log(), torch.zeros(6), adv, 0.2, 0.28)
    # +A: capped at 1 + 0.28 (1.25 passes, which a symmetric 0.2 clip would cut); −A: floored at 1 − 0.2.
    assert loss.tolist() == pytest.approx([-1.28, -1.25, 0.8, -0.75, 0.85, 1.25])
    assert high.tolist() == [True, False, False, False, False, False]
    assert low.tolist() == [False, False, True, False, False, False]
    # The gradient vanishes exactly where the clip is active.
    logp = ratios.log().requires_grad_()
    clipped_token_loss(logp, torch.zeros(6), adv, 0.2, 0.28)[0].sum().backward()
    assert (logp.grad == 0).tolist() == [True, False, True, False, False, False]


def test_token_level_normaliser_weighs_tokens_not_sequences():
    per_token = torch.tensor([[1.0, 0, 0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert float(token_level_loss(per_token, mask, int(mask.sum()))) == pytest.approx(7 / 4)
    # GRPO's per-sequence mean would give (1 + 2) / 2.
    assert float(((per_token * mask).sum(1) / mask.sum(1)).mean()) == pytest.approx(1.5)


def test_overlong_penalty_values():
    assert [overlong_penalty(n, 20, 5) for n in (10, 15, 16, 18, 20, 21)] == pytest.approx(
        [0, 0, -0.2, -0.6, -1.0, -1.0]
    )


def test_group_advantages_and_dynamic_sampling_filter():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 2)
    assert adv[:4].tolist() == pytest.approx(
        [1 / math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-5
    )
    assert adv[4:].tolist() == [0.0, 0.0]
    groups = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 0])
    assert informative_groups(groups, 3).tolist() == [False, True, False]


def test_truncated_completions_are_masked_from_the_policy_loss_only():
    comps = [Completion([5, 6], [7, 8, 2], truncated=False), Completion([5], [9, 9, 9, 9], truncated=True)]
    seqs = build_sequences(comps, torch.tensor([1.0, -1.0]), mask_truncated=True)
    assert seqs.ids.tolist() == [[5, 6, 7, 8, 2], [5, 9, 9, 9, 9]]
    assert seqs.completion.tolist() == [[False, False, True, True, True], [False, True, True, True, True]]
    assert seqs.policy.tolist() == [[False, False, True, True, True], [False] * 5]
    assert build_sequences(comps, torch.zeros(2), mask_truncated=False).policy[1].sum() == 4


def test_k3_kl():
    logp, ref = torch.tensor([math.log(0.5), 0.0]), torch.tensor([math.log(0.25), 0.0])
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])


def test_token_logps_match_log_softmax_and_entropy():
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(7, 16, generator=g), torch.nn.Linear(16, 50)
    labels = torch.randint(0, 50, (7,), generator=g)
    lp, ent = token_logps(hidden, head, labels, temperature=0.7, chunk_size=3)
    ref = torch.log_softmax(head(hidden) / 0.7, -1)
    torch.testing.assert_close(lp, ref.gather(-1, labels[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))


# ---------------------------------------------------------------------------- rewards
def test_gsm8k_reward():
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gsm8k_reward("q", "48 + 24 = 72. #### 72", answer=gold) == 1.0
    assert gsm8k_reward("q", "She sold 72 clips.", answer=gold) == 1.0  # last number
    assert gsm8k_reward("q", "She sold 72 clips.", answer=gold, strict=True) == 0.0
    assert gsm8k_reward("q", "#### 71", answer=gold) == 0.0
    assert gsm8k_reward("q", "#### 72\nthen 5", answer=gold) == 1.0  # the marked answer wins
    assert gsm8k_reward("q", "no number", answer=gold) == 0.0
    assert final_number("It costs $1,000.00.") == final_number("#### 1000")
    with pytest.raises(ValueError, match="answer"):
        gsm8k_reward("q", "72")


# ---------------------------------------------------------------------------- rollouts
def test_greedy_speculative_rollout_equals_plain_greedy(tiny_llama):
    head = build_head(tiny_llama, "mtp", {"num_depths": 2})
    prompts = [[1, 40, 41, 42, 43], [1, 60, 61]]
    cfg = RolloutConfig(temperature=0.0, k=3, max_new_tokens=20)
    plain, none, _ = generate_rollouts(tiny_llama, None, prompts, cfg, seed=0)
    spec, acc, _ = generate_rollouts(tiny_llama, head, prompts, cfg, seed=0)
    assert [c.ids for c in spec] == [c.ids for c in plain]
    assert none.steps == 0 and acc.steps > 0 and len(acc.per_position) == 3


def _prompt_file(tmp_path, n=8):
    path = tmp_path / "p.jsonl"
    rows = [{"question": f"q{i}", "const": i % 2 == 0} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reward(prompt, completion, const=False, **_):
    """Constant for half the prompts (their groups carry no signal), varying for the others."""
    return 1.0 if const else float(len(completion) % 3)


def test_dynamic_sampling_drops_equal_reward_groups_and_refills(tmp_path):
    target = load_target("tiny-llama")
    policy = prepare_policy(target, PolicyConfig(mode="full"))
    cfg = RLConfig(model="tiny-llama", prompts=[str(_prompt_file(tmp_path))])
    cfg.rollout = RolloutConfig(max_new_tokens=12)
    cfg.algo.group_size, cfg.algo.prompts_per_step, cfg.algo.max_sample_rounds = 3, 2, 4
    cfg.algo.overlong_buffer = 0
    stream = PromptStream(load_rl_prompts(cfg.prompts), seed=0)
    out = sample_groups(policy, None, stream, [_reward], cfg, step=0)
    groups, stats = out["groups"], out["stats"]
    assert len(groups) == 2
    for g in groups:
        rewards = torch.tensor([c.reward for c in g])
        assert rewards.max() > rewards.min()
    assert stats["groups_sampled"] > 2 and stats["frac_zero_std_groups"] > 0  # refilled
    cfg.algo.dynamic_sampling = False
    out = sample_groups(policy, None, stream, [_reward], cfg, step=1)
    assert out["stats"]["groups_sampled"] == 2 and len(out["groups"]) == 2


@pytest.mark.parametrize("mode", ["full", "lora"])  # the KL reference: a frozen copy / adapters disabled
def test_rl_run_with_speculative_rollouts(tmp_path, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    cfg = RLConfig(
        model="tiny-llama",
        out=str(tmp_path / "run"),
        prompts=[str(_prompt_file(tmp_path))],
        head={"num_depths": 2},
        policy=PolicyConfig(mode=mode),
        max_steps=2,
        progress=False,
    )
    cfg.rollout = RolloutConfig(enable_rollout=True, k=2, max_new_tokens=12)
    cfg.algo.group_size, cfg.algo.prompts_per_step, cfg.algo.minibatches = 3, 2, 2
    cfg.algo.overlong_buffer, cfg.algo.beta = 4, 0.05
    cfg.algo.mask_truncated = False  # a random tiny model rarely ends a completion: train on them all
    cfg.optim.lr = cfg.optim.head_lr = 1e-3
    result = rl(cfg, reward_fns=[_reward])
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in (
            "reward_mean",
            "rollout_tau",
            "rollout_accept_pos1",
            "rollout_accept_pos2",
            "policy_loss",
            "entropy",
            "clip_ratio_high",
            "grad_norm_model",
            "grad_norm_head",
            "mtp_loss_d2",
            "mtp_acc_d1",
        ):
            assert math.isfinite(r[key]), key
        assert 1.0 <= r["rollout_tau"] <= 3.0
        assert r["kl"] >= 0
    kl = [h["kl"] for h in result["history"]]
    assert 0 < kl[0] < kl[1], (
        kl
    )  # the policy starts at the reference and moves away (minibatch 2 of step 1 already has)
    assert (tmp_path / "run" / "tb").is_dir()
    load_target(result["model"])
