from __future__ import annotations

import math

import pytest
import torch
from helpers import PERIOD, periodic_store, train_cfg, train_losses

from mtpkit.heads import HeadError, build_head, load_head, save_head
from mtpkit.heads.eagle3 import default_layers, ttt_allowed
from mtpkit.models import load_target
from mtpkit.train.data import DataError
from mtpkit.train.trainer import train


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0) + (p.dim() == 1))


def test_ttt_mask_hand_worked():
    # Step 2, T = 4: row i is draft 2 of the chain anchored at a = i − 1; it sees step-1 keys
    # 0..a and its own step-2 key (row i); step 3 adds the step-2 key of row a + 1.
    assert ttt_allowed(4, 2).int().tolist() == [
        [0, 0, 0, 0, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 1],
    ]
    m3 = ttt_allowed(5, 3)
    assert m3[4].int().tolist() == [1, 1, 1, 0, 0] + [0, 0, 0, 1, 0] + [0, 0, 0, 0, 1]
    assert torch.equal(ttt_allowed(3, 1), torch.ones(3, 3).tril().bool())
    assert default_layers(30) == [2, 15, 27] and default_layers(2) == [0, 1, 2]


def _reference_forward(head, target, ids, feats, steps):
    """EAGLE-3 written out by hand for one sequence: RMSNorm, RoPE, GQA attention with an
    explicit softmax over [step-1 keys ; own earlier steps], SiLU MLP, re-indexed by anchor."""
    cfg, m = target.config, head.midlayer
    eps, nh, nkv = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.head_dim

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    T = len(ids)
    inv = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).double() / d)
    ang = torch.arange(T).double()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()

    def rope(x):  # [T, heads, d]
        half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos[:, None] + half * sin[:, None]

    a = m.self_attn
    nxt = torch.tensor(ids[1:] + [0])
    emb = rms(target.embed_tokens(nxt), m.input_layernorm.weight)
    hidden = feats.flatten(-2) @ head.fc.weight.T
    keys, values, outs = [], [], []
    for j in range(1, steps + 1):
        x = torch.cat([emb, rms(hidden, m.hidden_norm.weight)], -1)
        q = rope((x @ a.q_proj.weight.T).view(T, nh, d))
        keys.append(rope((x @ a.k_proj.weight.T).view(T, nkv, d)))
        values.append((x @ a.v_proj.weight.T).view(T, nkv, d))
        out = torch.zeros(T, hidden.shape[-1])
        for i in range(T):
            anchor = i - j + 1
            ks = [keys[0][: max(anchor + 1, 0)]] + [keys[m - 1][i - j + m][None] for m in range(2, j + 1)]
            vs = [values[0][: max(anchor + 1, 0)]] + [values[m - 1][i - j + m][None] for m in range(2, j + 1)]
            K = torch.cat(ks).repeat_interleave(nh // nkv, dim=1)  # [n, nh, d]
            V = torch.cat(vs).repeat_interleave(nh // nkv, dim=1)
            w = torch.softmax(torch.einsum("hd,nhd->hn", q[i], K) / math.sqrt(d), -1)
            attn = torch.einsum("hn,nhd->hd", w, V).reshape(-1) @ a.o_proj.weight.T
            h = hidden[i] + attn
            z = rms(h, m.post_attention_layernorm.weight)
            mlp = m.mlp
            out[i] = h + (
                torch.nn.functional.silu(z @ mlp.gate_proj.weight.T) * (z @ mlp.up_proj.weight.T)
            ) @ (mlp.down_proj.weight.T)
        normed = rms(out, head.norm.weight)
        by_anchor = torch.zeros_like(normed)
        by_anchor[: T - j + 1] = normed[j - 1 :]
        outs.append(by_anchor)
        hidden = torch.cat([torch.zeros(1, out.shape[-1]), out[:-1]])
    return outs


def test_forward_matches_hand_written_reference(tiny_llama):
    head = build_head(tiny_llama, "eagle3", {"draft_vocab_size": 64, "ttt_steps": 3})
    _randomise(head)
    ids = [5, 60, 7, 99, 23, 11, 42, 8, 3]
    with torch.no_grad():
        feats = tiny_llama.hidden_states(torch.tensor([ids]), None, head.feature_layers)
        got = head.forward_train(torch.tensor([ids]), feats, 3)
        ref = _reference_forward(head, tiny_llama, ids, feats[0], 3)
    for j, (g, r) in enumerate(zip(got, ref, strict=True), start=1):
        torch.testing.assert_close(g[0], r, atol=2e-5, rtol=1e-4, msg=f"step {j}")
    # Rows of different chains never see each other: changing a later token leaves earlier anchors.
    ids2 = ids[:6] + [77, 78, 79]
    with torch.no_grad():
        got2 = head.forward_train(torch.tensor([ids2]), feats, 3)
    # Anchor a at depth j reads tokens t_{a+1}..t_{a+j}: unaffected while a + j <= 5.
    for j in (1, 2, 3):
        torch.testing.assert_close(got2[j - 1][0, : 6 - j], got[j - 1][0, : 6 - j])


def test_norm_before_residual_changes_only_the_residual(tiny_llama):
    a = build_head(tiny_llama, "eagle3", {"draft_vocab_size": 32})
    b = build_head(tiny_llama, "eagle3", {"draft_vocab_size": 32, "norm_before_residual": True})
    _randomise(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64)
    e = torch.randn(1, 3, 64)
    pos = torch.arange(3)[None]
    mask = a.causal_mask(3, 0, torch.float32)
    with torch.no_grad():
        out_b = b.step(e, x, pos, mask)
        assert not torch.allclose(out_b, a.step(e, x, pos, mask))
        # True = the False form fed hidden_norm(x), with no second norm: the residual starts normed.
        normed = b.midlayer.hidden_norm(x)
        a.midlayer.hidden_norm = torch.nn.Identity()
        torch.testing.assert_close(out_b, a.step(e, normed, pos, mask))


def test_vocab_mapping_invariants(tiny_llama):
    head = build_head(tiny_llama, "eagle3", {"draft_vocab_size": 6})
    counts = torch.zeros(tiny_llama.vocab_size, dtype=torch.long)
    counts[[300, 7, 42, 9, 100, 250, 3]] = torch.tensor([50, 40, 40, 30, 30, 30, 1])
    head.init_vocab(counts)
    # The 6 most frequent (ties → lower id: 100 and 250 tie with 9 at 30; 3 falls out), sorted by id.
    ids = head.draft_to_target()
    assert ids.tolist() == [7, 9, 42, 100, 250, 300]
    assert head.d2t.tolist() == [7 - 0, 9 - 1, 42 - 2, 100 - 3, 250 - 4, 300 - 5]
    assert head.t2d.sum() == 6 and head.t2d[ids].all() and head.t2d.dtype == torch.bool
    assert head.d2t.dtype == torch.long
    labels = torch.tensor([[300, 3, 9, 7]])
    draft, inside = head.draft_labels(labels)
    assert inside.tolist() == [[True, False, True, True]]
    assert ids[draft[inside]].tolist() == [300, 9, 7]  # round trip target → draft → target
    # The LM head starts as the target's rows of those tokens.
    assert torch.equal(head.lm_head.weight, tiny_llama.lm_head.weight[ids])
    student, teacher = head.output_layers(1)
    assert student is head.lm_head and torch.equal(teacher.weight, tiny_llama.lm_head.weight[ids])
    # Larger than the vocabulary: clamped (tiny models).
    assert build_head(tiny_llama, "eagle3", {}).lm_head.weight.shape[0] == tiny_llama.vocab_size


def test_save_load_round_trip_and_checkpoint_names(tmp_path, tiny_llama):
    head = build_head(tiny_llama, "eagle3", {"draft_vocab_size": 16, "ttt_steps": 2})
    _randomise(head, seed=3)
    counts = torch.arange(tiny_llama.vocab_size) % 17
    head.init_vocab(counts)
    save_head(head, tmp_path / "h", tiny_llama)
    loaded = load_head(tmp_path / "h", tiny_llama)
    assert loaded.cfg == head.cfg
    sd, ld = head.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
    # vLLM llama_eagle3 checkpoint keys (midlayer.* → layers.0.*), nothing of the target's.
    assert {k.split(".")[0] for k in sd} == {"fc", "midlayer", "norm", "lm_head", "d2t", "t2d"}
    assert sd["fc.weight"].shape == (64, 3 * 64)
    assert sd["midlayer.self_attn.q_proj.weight"].shape[1] == 128  # attention input is 2H
    assert "midlayer.hidden_norm.weight" in sd


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_learns_a_periodic_sequence(tmp_path, tiny_llama, kind):
    store = periodic_store(tmp_path / "store", tiny_llama, layers=[0, 1, 2])
    cfg = train_cfg(
        tmp_path,
        store,
        head_type="eagle3",
        head={"draft_vocab_size": 5, "ttt_steps": 3},  # PERIOD has 7 tokens: 2 never drafted
        max_steps=60,
        eval_every=60,
        loss__kind=kind,
        optim__lr=1e-2,
        optim__warmup_steps=5,
    )
    result = train(cfg, target=tiny_llama)
    head = load_head(result["head"], tiny_llama)
    vocab = set(head.draft_to_target().tolist())
    assert len(vocab) == 5 and vocab <= set(PERIOD)  # the data's most frequent tokens
    ev = result["eval"]
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    if kind == "ce":
        # 2 of 7 tokens lie outside the draft vocabulary: they are misses, never trained on.
        for k in (1, 2, 3):
            assert ev[f"acc_d{k}"] == pytest.approx(5 / 7, abs=0.06), ev
        assert ev["loss_d3"] < 0.05, ev  # in-vocabulary positions are learned exactly
    else:  # the synthetic labels are not the tiny target's: the head learns the target's distribution
        assert losses[-1] < 0.2 * losses[0], losses


def test_bad_inputs(tmp_path, tiny_llama):
    final_only = periodic_store(tmp_path / "store", tiny_llama, n=4)
    with pytest.raises(DataError, match=r"reads layers \[0, 1, 2\].*--layers 0 1 2"):
        train(train_cfg(tmp_path, final_only, head_type="eagle3", head={}), target=tiny_llama)
    with pytest.raises(HeadError, match="Llama-style attention"):
        build_head(load_target("tiny-deepseek_v3"), "eagle3", {})
    with pytest.raises(HeadError, match="ttt_steps must be >= 1"):
        build_head(tiny_llama, "eagle3", {"ttt_steps": 0})
    with pytest.raises(HeadError, match="out of range"):
        build_head(tiny_llama, "eagle3", {"layers": [1, 9]})
    head = build_head(tiny_llama, "eagle3", {"draft_vocab_size": 8})
    with pytest.raises(ValueError, match="token counts have shape"):
        head.init_vocab(torch.ones(5))
