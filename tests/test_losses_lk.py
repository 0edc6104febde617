"""The LK losses (arXiv 2602.23881): values against hand computation, gradients, reduced
vocabularies, and training with them."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PERIOD, periodic_store, train_cfg, train_losses

from mtpkit.config import ConfigError, from_dict
from mtpkit.heads import build_head, load_head
from mtpkit.heads.common import LinearView
from mtpkit.train.config import LossConfig, TrainConfig
from mtpkit.train.losses import depth_losses, lm_loss
from mtpkit.train.trainer import train

P = [0.5, 0.3, 0.2]  # target
Q = [0.2, 0.2, 0.6]  # head
ALPHA = sum(min(a, b) for a, b in zip(P, Q, strict=True))  # 0.2 + 0.2 + 0.2
KL = sum(a * math.log(a / b) for a, b in zip(P, Q, strict=True))


def _identity_head(v: int) -> torch.nn.Linear:
    lm = torch.nn.Linear(v, v, bias=False)
    with torch.no_grad():
        lm.weight.copy_(torch.eye(v))
    return lm


def _rows(p: list[float], n: int = 2) -> torch.Tensor:
    return torch.tensor([p] * n).log()  # identity LM head: these are the logits


def test_lk_values_equal_hand_computation():
    lm = _identity_head(3)
    h, teacher, labels = _rows(Q), _rows(P), torch.zeros(2, dtype=torch.long)
    assert abs(ALPHA - 0.6) < 1e-12
    lk, _ = lm_loss(h, labels, lm, "lk", teacher)
    torch.testing.assert_close(lk, torch.tensor(2 * -math.log(ALPHA)))
    lam = math.exp(-3.0 * ALPHA)
    mixed, _ = lm_loss(h, labels, lm, "lk_lambda", teacher)
    torch.testing.assert_close(mixed, torch.tensor(2 * (lam * KL + (1 - lam) * (1 - ALPHA))))
    # η = 0: λ = 1, plain KL; large η: λ → 0, plain TV.
    kl, _ = lm_loss(h, labels, lm, "kl", teacher)
    torch.testing.assert_close(lm_loss(h, labels, lm, "lk_lambda", teacher, lk_eta=0.0)[0], kl)
    tv, _ = lm_loss(h, labels, lm, "tv", teacher)
    torch.testing.assert_close(lm_loss(h, labels, lm, "lk_lambda", teacher, lk_eta=1e3)[0], tv)
    # Identical distributions: α = 1, no loss.
    torch.testing.assert_close(lm_loss(teacher, labels, lm, "lk", teacher)[0], torch.tensor(0.0))


def test_lk_gradient_is_tv_gradient_over_alpha_and_one_hot_lk_is_ce():
    torch.manual_seed(0)
    lm = _identity_head(8)
    h = torch.randn(5, 8, requires_grad=True)
    teacher = torch.randn(5, 8) * 2
    labels = torch.zeros(5, dtype=torch.long)
    lk, _ = lm_loss(h, labels, lm, "lk", teacher, chunk_size=2)  # checkpointed chunks
    (g_lk,) = torch.autograd.grad(lk, h)
    tv, _ = lm_loss(h, labels, lm, "tv", teacher, chunk_size=2)
    (g_tv,) = torch.autograd.grad(tv, h)
    alpha = torch.minimum(torch.softmax(teacher, -1), torch.softmax(h.detach(), -1)).sum(-1)
    assert torch.isfinite(g_lk).all() and g_lk.abs().sum() > 0
    torch.testing.assert_close(g_lk, g_tv / alpha[:, None])  # d(−log α) = dTV / α
    for kind in ("lk_lambda",):
        loss, _ = lm_loss(h, labels, lm, kind, teacher, chunk_size=2)
        (g,) = torch.autograd.grad(loss, h)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    # Disjoint supports (α = 0) stay finite.
    far = torch.full((1, 8), -1e4)
    far[0, 0] = 1e4
    near = torch.full((1, 8), -1e4)
    near[0, 1] = 1e4
    assert torch.isfinite(lm_loss(near, labels[:1], lm, "lk", far)[0])
    # A one-hot target: α = q[label], LK^α = CE.
    one_hot = torch.nn.functional.one_hot(labels, 8).float() * 1e4
    torch.testing.assert_close(
        lm_loss(h, labels, lm, "lk", one_hot)[0], lm_loss(h, labels, lm, "ce")[0], rtol=1e-5, atol=1e-5
    )


def test_reduced_vocabulary_acceptance_uses_the_full_softmax():
    """A head over target tokens {0, 2} of 4: acceptance counts only the target's own mass on
    them (0.4 + 0.2 at most), KL uses the target renormalised to them, as `kl` does."""
    p_full = [0.4, 0.3, 0.2, 0.1]
    q = [0.7, 0.3]
    ids = torch.tensor([0, 2])
    full = _identity_head(4)
    teacher_head = LinearView(full.weight[ids], None, LinearView(full.weight))
    student = _identity_head(2)
    h, teacher, labels = _rows(q, 1), _rows(p_full, 1), torch.zeros(1, dtype=torch.long)
    alpha = min(0.4, 0.7) + min(0.2, 0.3)
    lk, _ = lm_loss(h, labels, student, "lk", teacher, teacher_head=teacher_head)
    torch.testing.assert_close(lk, torch.tensor(-math.log(alpha)))
    renorm = [0.4 / 0.6, 0.2 / 0.6]
    kl_hand = sum(a * math.log(a / b) for a, b in zip(renorm, q, strict=True))
    kl, _ = lm_loss(h, labels, student, "kl", teacher, teacher_head=teacher_head)
    torch.testing.assert_close(kl, torch.tensor(kl_hand))
    lam = math.exp(-3.0 * alpha)
    mixed, _ = lm_loss(h, labels, student, "lk_lambda", teacher, teacher_head=teacher_head)
    torch.testing.assert_close(mixed, torch.tensor(lam * kl_hand + (1 - lam) * (1 - alpha)))


def test_eagle3_teacher_view_carries_the_whole_lm_head(tiny_llama):
    head = build_head(tiny_llama, "eagle3", {"draft_vocab_size": 6, "layers": [0, 1, 2]})
    _, teacher = head.output_layers(1)
    assert teacher.full is not None and teacher.full.weight is tiny_llama.lm_head.weight
    assert torch.equal(teacher.weight, tiny_llama.lm_head.weight[head.draft_to_target()])


def test_bad_kind_errors_clearly():
    with pytest.raises(ValueError, match=r"kind must be one of \('ce', 'kl', 'tv', 'lk', 'lk_lambda'\)"):
        LossConfig(kind="lk2")
    with pytest.raises(ConfigError, match="lk_eta"):
        from_dict(TrainConfig, {"loss": {"kind": "lk_lambda", "lk_eta": -1}})
    lm = _identity_head(3)
    with pytest.raises(ValueError, match="loss kind must be one of"):
        lm_loss(_rows(Q), torch.zeros(2, dtype=torch.long), lm, "LK", _rows(P))
    with pytest.raises(ValueError, match="'lk' needs the target's hidden states"):
        lm_loss(_rows(Q), torch.zeros(2, dtype=torch.long), lm, "lk")


def _held_out(target, head, kind: str) -> float:
    """Mean depth-1 loss of `kind` on fresh periodic sequences (not the store's)."""
    ids = torch.tensor([[PERIOD[(3 + t) % len(PERIOD)] for t in range(40)]])
    hidden = target.hidden_states(ids, None, None)[0][None, :, 0]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        total, _ = depth_losses(head, ids, hidden, mask, [1.0], kind, depths=1)
    return float(total)


def test_training_with_lk_lowers_it_more_than_ce_does(tmp_path, tiny_llama):
    store = periodic_store(tmp_path / "store", tiny_llama, n=12)
    heads, curves = {}, {}
    for kind in ("ce", "lk"):
        cfg = train_cfg(tmp_path, store, kind, max_steps=30, eval_every=30, save_every=30, loss__kind=kind)
        heads[kind] = load_head(train(cfg, target=tiny_llama)["head"], tiny_llama)
        curves[kind] = [loss for _, loss in train_losses(tmp_path / kind)]
    assert curves["lk"][-1] < 0.7 * curves["lk"][0], curves["lk"]
    # Each head is best at its own objective: the synthetic labels are not the random target's
    # predictions, so the LK head matches the target (higher acceptance), the CE head the labels.
    lk_of = {k: _held_out(tiny_llama, h, "lk") for k, h in heads.items()}
    ce_of = {k: _held_out(tiny_llama, h, "ce") for k, h in heads.items()}
    assert lk_of["lk"] < lk_of["ce"], lk_of
    assert ce_of["ce"] < ce_of["lk"], ce_of


def test_eagle3_lk_floor_is_the_targets_mass_on_the_draft_vocabulary(tiny_llama):
    """Acceptance of a reduced-vocabulary head is at most the target's own mass on that
    vocabulary: with 5 of 320 tokens, a head that gives each of them more than the target does
    sits at −log P(V_d) exactly (a renormalised target would report α ≈ 1 instead)."""
    head = build_head(tiny_llama, "eagle3", {"draft_vocab_size": 5, "layers": [0, 1, 2], "ttt_steps": 1})
    head.init_vocab(torch.bincount(torch.tensor(PERIOD), minlength=tiny_llama.vocab_size))
    ids = torch.tensor([[PERIOD[t % len(PERIOD)] for t in range(20)]])
    features = tiny_llama.hidden_states(ids, None, [0, 1, 2])
    final = features[:, :, -1]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        loss, stats = depth_losses(head, ids, final, mask, [1.0], "lk", depths=1, features=features)
        rows = stats[0]["valid"] & head.draft_labels(torch.roll(ids, -2, 1))[1]
        p = torch.softmax(tiny_llama.lm_head(final[:, 1:]), -1)[:, :, head.draft_to_target()]
        p = p[rows[:, :-1]]
        q = torch.softmax(head.lm_head(head.train_outputs(ids, features, 1).states[0][rows]), -1)
    assert (q.min(-1).values > p.max(-1).values).all()  # the case the docstring describes
    torch.testing.assert_close(loss, -p.sum(-1).log().mean())


def test_eagle3_trains_with_lk(tmp_path, tiny_llama):
    store = periodic_store(tmp_path / "store", tiny_llama, n=12, layers=[0, 1, 2])
    cfg = train_cfg(
        tmp_path,
        store,
        head_type="eagle3",
        head={"draft_vocab_size": 320, "ttt_steps": 2},
        max_steps=30,
        eval_every=30,
        save_every=30,
        loss__kind="lk",
        optim__lr=1e-2,
    )
    train(cfg, target=tiny_llama)
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0], losses
