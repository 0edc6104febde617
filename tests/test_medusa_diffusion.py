from __future__ import annotations

import math

import pytest
import torch
from helpers import periodic_store, train_cfg

from mtpkit.decode.engine import DecodeError, SpeculativeDecoder
from mtpkit.heads import HeadError, build_head, load_head, save_head
from mtpkit.heads.diffusion import DiffusionConfig, alpha, loss_weight, sample_masks, unmask_counts
from mtpkit.train.trainer import train


def _round_trip(tmp_path, target, head):
    save_head(head, tmp_path / "h", target)
    loaded = load_head(tmp_path / "h", target)
    assert loaded.cfg == head.cfg
    sd, ld = head.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
    return sd


# ---------------------------------------------------------------------------- Medusa
def test_medusa_starts_as_the_target_and_names_match_vllm(tmp_path, tiny_llama):
    head = build_head(tiny_llama, "medusa", {"num_heads": 3, "num_layers": 2})
    h = torch.randn(2, 5, tiny_llama.hidden_size)
    outs = head.forward_train(torch.zeros(2, 5, dtype=torch.long), h, 5)
    assert len(outs) == 3  # no more depths than heads
    for k, out in enumerate(outs, start=1):  # identity blocks, LM heads copied: the target's logits
        student, teacher = head.output_layers(k)
        torch.testing.assert_close(student(out), tiny_llama.lm_head(h))
        assert teacher is tiny_llama.lm_head and student is not tiny_llama.lm_head
    with torch.no_grad():
        for p in head.blocks.parameters():
            p.normal_()
    sd = _round_trip(tmp_path, tiny_llama, head)
    assert sorted(sd) == sorted(
        [f"blocks.{h}.layers.{j}.{w}" for h in range(3) for j in range(2) for w in ("weight", "bias")]
        + [f"lm_heads.{h}.weight" for h in range(3)]
    )
    shared = build_head(tiny_llama, "medusa", {"num_heads": 2, "own_lm_head": False})
    assert not any(k.startswith("lm_heads") for k in shared.state_dict())
    assert shared.output_layers(2)[0] is tiny_llama.lm_head


def test_medusa_learns_a_periodic_sequence(tmp_path, tiny_llama):
    store = periodic_store(tmp_path / "store", tiny_llama)
    cfg = train_cfg(
        tmp_path,
        store,
        head_type="medusa",
        head={"num_heads": 3},
        max_steps=60,
        eval_every=60,
        optim__lr=1e-2,
        optim__warmup_steps=5,
    )
    ev = train(cfg, target=tiny_llama)["eval"]
    for k in (1, 2, 3):  # head k, row i → t_{i+k+1}: a function of t_i, which h_i encodes
        assert ev[f"acc_d{k}"] > 0.95, ev
    assert ev["sim_tau_k3"] > 3.8


def test_medusa_bad_inputs(tiny_llama):
    head = build_head(tiny_llama, "medusa", {"num_heads": 2})
    with pytest.raises(DecodeError, match="drafts at most that many tokens, not 3"):
        SpeculativeDecoder(tiny_llama, head, k=3)
    with pytest.raises(HeadError, match="num_heads >= 1"):
        build_head(tiny_llama, "medusa", {"num_heads": 0})


# ---------------------------------------------------------------------------- diffusion
def test_schedules_and_weights():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for sched in ("linear", "cosine", "kappa"):
        cfg = DiffusionConfig(scheduler_type=sched, kappa=3.0)
        a = alpha(t, cfg)
        assert float(alpha(torch.tensor(0.0), cfg)) == pytest.approx(1) and float(
            alpha(torch.tensor(1.0), cfg)
        ) == pytest.approx(0, abs=1e-6)
        eps = 1e-6  # −α′/(1 − α) against a numerical derivative
        da = (alpha(t + eps, cfg) - alpha(t - eps, cfg)) / (2 * eps)
        torch.testing.assert_close(loss_weight(t, cfg), -da / (1 - a), rtol=1e-5, atol=1e-6)
    assert DiffusionConfig(scheduler_type="kappa", kappa=1.0) and torch.allclose(
        alpha(t, DiffusionConfig(scheduler_type="kappa", kappa=1.0)), alpha(t, DiffusionConfig())
    )
    assert torch.equal(
        loss_weight(t, DiffusionConfig(loss_weight_type="ones")), torch.ones(3, dtype=torch.float64)
    )
    assert unmask_counts(4, 1) == [4] and unmask_counts(4, 2) == [2, 2] and unmask_counts(5, 2) == [2, 3]
    assert unmask_counts(8, 8) == [1] * 8


@pytest.mark.parametrize("sched", ["linear", "cosine", "kappa"])
def test_masking_rates_match_alpha(sched):
    torch.manual_seed(0)
    cfg = DiffusionConfig(block_length=8, scheduler_type=sched, time_epsilon=0.05)
    t, masked = sample_masks(40000, 8, cfg)
    assert t.min() >= 0.05 and t.max() < 1
    rate = masked.float().mean(1)
    for lo in torch.arange(0.05, 1.0, 0.1):
        sel = (t >= lo) & (t < lo + 0.1)
        n = int(sel.sum()) * 8
        expected = float((1 - alpha(t[sel], cfg)).mean())
        # Binomial standard error; 5 sigma.
        assert abs(float(rate[sel].mean()) - expected) < 5 * math.sqrt(expected * (1 - expected) / n) + 1e-3


def test_diffusion_alignment_and_round_trip(tmp_path, tiny_llama):
    head = build_head(tiny_llama, "diffusion", {"block_length": 3, "num_hidden_layers": 2})
    torch.manual_seed(0)
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    hidden = torch.randn(1, 7, tiny_llama.hidden_size)
    outs, weights = head.forward_train(ids, hidden)
    assert len(outs) == len(weights) == 3
    # Rows 0..4 have a t_{l+2}; 5 and 6 are no anchors. Weights are 0 exactly where unmasked.
    assert all(float(w[0, 5:].abs().sum()) == 0 for w in weights)
    # The denoiser sees position p's label only when unmasked: changing unmasked tokens changes
    # outputs, while each anchor's block is independent of every other anchor.
    head.eval()
    with torch.no_grad():
        a, _ = head.forward_train(ids, hidden)
        b, _ = head.forward_train(ids, torch.cat([hidden[:, :3], torch.randn(1, 4, hidden.shape[-1])], 1))
    for p in range(3):  # anchors 0..2 read only h_l and t_{l+1}: unchanged
        torch.testing.assert_close(a[p][0, :3], b[p][0, :3])
    sd = _round_trip(tmp_path, tiny_llama, head)
    assert "mask_embedding" in sd and not any("embed_tokens" in k or "lm_head" in k for k in sd)


def test_diffusion_learns_a_periodic_sequence(tmp_path, tiny_llama):
    store = periodic_store(tmp_path / "store", tiny_llama)
    cfg = train_cfg(
        tmp_path,
        store,
        head_type="diffusion",
        head={"block_length": 3, "denoising_steps": 1, "loss_weight_type": "ones"},
        max_steps=80,
        eval_every=80,
        optim__lr=1e-2,
        optim__warmup_steps=5,
    )
    ev = train(cfg, target=tiny_llama)["eval"]
    for k in (1, 2, 3):  # the whole block in one pass
        assert ev[f"acc_d{k}"] > 0.9, ev


def test_diffusion_bad_inputs(tiny_llama):
    with pytest.raises(HeadError, match="denoising_steps must be in 1..block_length"):
        build_head(tiny_llama, "diffusion", {"block_length": 2, "denoising_steps": 3})
    with pytest.raises(HeadError, match="scheduler_type must be one of"):
        build_head(tiny_llama, "diffusion", {"scheduler_type": "sqrt"})
    with pytest.raises(HeadError, match="time_epsilon"):
        build_head(tiny_llama, "diffusion", {"time_epsilon": 0})
    head = build_head(tiny_llama, "diffusion", {"block_length": 2})
    with pytest.raises(DecodeError, match="block_length 2 drafts at most that many, not 3"):
        SpeculativeDecoder(tiny_llama, head, k=3)


def test_eval_overrides_denoising_steps_and_target_dtype(tmp_path, tiny_llama):
    """S is an inference option: `mtpkit eval --denoising-steps` sweeps it on one trained head,
    and `--dtype` loads the target (verification and the plain baseline) in that dtype."""
    from mtpkit.decode.evaluate import EvalConfig, evaluate

    head = build_head(tiny_llama, "diffusion", {"block_length": 3, "denoising_steps": 1})
    save_head(head, tmp_path / "h", tiny_llama)
    common = {"head": str(tmp_path / "h"), "prompts": ["builtin"], "max_prompts": 2, "max_new_tokens": 8}
    common |= {"hf_baseline": False, "progress": False, "k": [3]}
    report = evaluate(EvalConfig(out=str(tmp_path / "s2.json"), denoising_steps=2, **common), tiny_llama)
    assert report["denoising_steps"] == 2 and report["identical"] == 2
    assert report["target_dtype"] == "float32"
    report = evaluate(EvalConfig(out=str(tmp_path / "bf16.json"), dtype="bfloat16", **common))
    assert report["target_dtype"] == "bfloat16" and report["denoising_steps"] == 1
    with pytest.raises(DecodeError, match=r"denoising_steps must be in 1..3"):
        evaluate(EvalConfig(out=str(tmp_path / "x.json"), denoising_steps=4, **common), tiny_llama)
    save_head(build_head(tiny_llama, "medusa", {}), tmp_path / "m", tiny_llama)
    with pytest.raises(DecodeError, match="applies to diffusion heads, not 'medusa'"):
        evaluate(
            EvalConfig(
                out=str(tmp_path / "x.json"), denoising_steps=2, **common | {"head": str(tmp_path / "m")}
            )
        )
    with pytest.raises(DecodeError, match="dtype must be one of"):
        EvalConfig(dtype="float16", **common)
    assert not (tmp_path / "x.json").exists()  # bad options fail before anything is written
