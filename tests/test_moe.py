"""DeepSeek MoE layer: router, dispatch and layer parity with transformers, compile, aux losses."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import sharpen_router, tiny_v3
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from mtpkit.models.moe import (
    MoE,
    MoEConfig,
    MoEConfigError,
    balance_loss,
    capacity_moe,
    dropless_moe,
    fuse_expert_weights,
    grouped_mm,
    grouped_mm_loop,
    route,
    split_expert_weights,
    swap_moe,
    update_expert_bias,
)
from mtpkit.models.tiny import TINY_CONFIGS, build_tiny


def tiny_v2(**changes):
    fields = dict(TINY_CONFIGS["deepseek_v3"], q_lora_rank=None, topk_method="group_limited_greedy")
    fields.pop("num_nextn_predict_layers")
    fields.pop("scoring_func", None)  # V3's sigmoid router; V2 scores with softmax (its default)
    fields.update(changes, model_type="deepseek_v2")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    return sharpen_router(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()


def _sorted_choice(weights, indices):
    indices, order = indices.sort(dim=-1)
    return weights.gather(1, order), indices


# --------------------------------------------------------------------------- routers


@pytest.mark.parametrize("norm, scale", [(True, 2.5), (False, 1.0)])
def test_v3_router_matches_transformers(norm, scale):
    model = tiny_v3(norm_topk_prob=norm, routed_scaling_factor=scale)
    hf_gate = model.model.layers[1].mlp.gate
    assert isinstance(hf_gate, DeepseekV3TopkRouter)
    assert (hf_gate.e_score_correction_bias < 0).any()
    x = torch.randn(64, 64)
    _, hf_w, hf_i = hf_gate(x)
    cfg = MoEConfig.from_hf(model.config)
    assert (cfg.scoring, cfg.topk_method, cfg.n_group, cfg.topk_group) == ("sigmoid", "noaux_tc", 4, 2)
    logits = torch.nn.functional.linear(x, hf_gate.weight)
    _, w, i = route(logits, cfg, hf_gate.e_score_correction_bias)
    ref_w, ref_i = _sorted_choice(hf_w, hf_i)
    w, i = _sorted_choice(w, i)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
    if norm:
        torch.testing.assert_close(w.sum(-1), torch.full((64,), scale))


def test_v3_group_mask_is_minus_inf_not_zero():
    """Biased scores below 0 in the kept group must still beat the masked groups."""
    cfg = MoEConfig(hidden_size=4, intermediate_size=4, num_experts=4, top_k=2, n_group=2, topk_group=1)
    logits = torch.tensor([[0.0, 0.0, -4.0, -4.0]])  # scores 0.5, 0.5, 0.018, 0.018
    bias = torch.tensor([-0.6, -0.7, -1.0, -1.0])  # biased: -0.1, -0.2 | -0.98, -0.98 -> group 0 wins
    _, weights, indices = route(logits, cfg, bias)
    assert sorted(indices[0].tolist()) == [0, 1]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5]]))  # unbiased scores, normalised
    # What masking with 0.0 would have chosen: the masked experts (0.0) outrank -0.1 and -0.2.
    zero_masked = (logits.sigmoid() + bias).masked_fill(torch.tensor([[False, False, True, True]]), 0.0)
    assert sorted(zero_masked.topk(2).indices[0].tolist()) == [2, 3]


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_router_matches_transformers(method):
    model = tiny_v2(topk_method=method, routed_scaling_factor=1.5)
    hf_gate = model.model.layers[1].mlp.gate
    assert isinstance(hf_gate, DeepseekV2TopkRouter)
    x = torch.randn(64, 64)
    _, hf_w, hf_i = hf_gate(x)
    cfg = MoEConfig.from_hf(model.config)
    assert (cfg.scoring, cfg.topk_method) == ("softmax", method)
    _, w, i = route(torch.nn.functional.linear(x, hf_gate.weight), cfg)
    (ref_w, ref_i), (w, i) = _sorted_choice(hf_w, hf_i), _sorted_choice(w, i)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)


# --------------------------------------------------------------------------- layer parity


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["v3", "v2"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_swapped_model_matches_transformers(family, dispatch):
    reference = tiny_v3() if family == "v3" else tiny_v2()
    ours = copy.deepcopy(reference)
    assert swap_moe(ours, dispatch=dispatch, capacity_factor=8.0) == 2
    assert isinstance(ours.model.layers[1].mlp, MoE)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 24, 320, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (reference, ours):
        logits = model(ids).logits
        (logits * target).sum().backward()
        outs.append(logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    ref_grads, our_grads = _grads(reference), _grads(ours)
    assert ref_grads.keys() == our_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_loop_grouped_mm_matches_native():
    x = torch.randn(11, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    offs = torch.tensor([4, 4, 11], dtype=torch.int32)  # one empty group
    g = torch.randn(11, 8)
    results = []
    for fn in (lambda: grouped_mm(x, w, offs), lambda: grouped_mm_loop(x, w, offs)):
        x.grad = w.grad = None
        y = fn()
        (y * g).sum().backward()
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(results[0][0][:4], x.detach()[:4] @ w.detach()[0])


def _layer(**changes):
    cfg = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=8, top_k=2, n_group=4, topk_group=2)
    cfg = replace(cfg, **changes)
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
    return moe


def test_capacity_with_room_equals_dropless():
    moe = _layer()
    x = torch.randn(40, 32)
    _, weights, indices = route(moe.gate(x), moe.cfg, moe.gate.e_score_correction_bias)
    dropless = dropless_moe(x, weights, indices, moe.experts, 8)
    # capacity = all T*K rows fits any routing
    out, dropped = capacity_moe(x, weights, indices, moe.experts, 8, capacity=80)
    assert dropped.item() == 0
    torch.testing.assert_close(out, dropless)


def test_capacity_drops_later_rows_of_full_experts():
    moe = _layer(top_k=2)
    x = torch.randn(5, 32)
    # expert 0 is chosen by tokens 0, 1, 2, 4 (k=0) and expert 3 by tokens 0, 3, 4; capacity 2.
    indices = torch.tensor([[0, 3], [0, 5], [0, 6], [1, 3], [0, 3]])
    weights = torch.rand(5, 2)
    out, dropped = capacity_moe(x, weights, indices, moe.experts, 8, capacity=2)
    # Documented rule: an expert keeps its first C rows in (token, k) order.
    kept = torch.ones(5, 2)
    kept[2, 0] = kept[4, 0] = 0  # expert 0: tokens 0, 1 kept; 2, 4 dropped
    kept[4, 1] = 0  # expert 3: tokens 0, 3 kept; 4 dropped
    assert dropped.item() == 3
    torch.testing.assert_close(out, dropless_moe(x, weights * kept, indices, moe.experts, 8))


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_compiles_fullgraph(dispatch):
    torch._dynamo.reset()
    moe = _layer(dispatch=dispatch, capacity_factor=4.0, aux_loss_alpha=0.01).train()  # + aux loss, load
    x = torch.randn(2, 12, 32)
    eager, eager_aux = moe(x), moe.aux_loss
    compiled = torch.compile(moe, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe.aux_loss, eager_aux)
    assert moe.load.sum() == 2 * 24 * 2
    compiled.sum().backward()
    assert moe.experts.gate_up_proj.grad.abs().sum() > 0


def test_dropless_bf16_native_grouped_mm_compiles():
    """bf16 runs torch._grouped_mm (the compiled grouped-GEMM path); fp32 compiles via the loop op."""
    torch._dynamo.reset()
    moe = _layer().to(torch.bfloat16)
    moe.gate.float()
    x = torch.randn(24, 32, dtype=torch.bfloat16)
    eager = moe(x)
    graph = torch._dynamo.explain(moe)(x)
    assert graph.graph_break_count == 0
    ops = {str(node.target) for gm in graph.graphs for node in gm.graph.nodes}
    assert any("_grouped_mm" in op for op in ops), ops
    compiled = torch.compile(moe, fullgraph=True)(x)  # inductor fuses differently: bf16 rounding
    torch.testing.assert_close(compiled, eager, rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- aux losses and bias


def test_balance_loss_hand_computed():
    cfg = MoEConfig(
        hidden_size=4, intermediate_size=4, num_experts=2, top_k=1, scoring="softmax", aux_loss_alpha=0.1
    )
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    indices = torch.tensor([[0], [0], [1], [0]])
    # whole batch: f = 2/4 * [3, 1] = [1.5, 0.5]; P = [0.5875, 0.4125]
    expected = 0.1 * (1.5 * 0.5875 + 0.5 * 0.4125)
    torch.testing.assert_close(
        balance_loss(scores, indices, replace(cfg, seq_aux=False)), torch.tensor(expected)
    )
    # two sequences of 2: seq0 f = [2, 0], P = [0.625, 0.375]; seq1 f = [1, 1], P = [0.55, 0.45]
    expected = 0.1 * ((2 * 0.625) + (0.55 + 0.45)) / 2
    torch.testing.assert_close(balance_loss(scores, indices, cfg, batch_size=2), torch.tensor(expected))
    # sigmoid scores are normalised per token first (DeepSeek-V3 sequence-wise loss)
    sig = replace(cfg, scoring="sigmoid", seq_aux=False)
    torch.testing.assert_close(balance_loss(scores * 2, indices, sig), balance_loss(scores, indices, sig))


def test_aux_loss_free_bias_update_sign_rule():
    moe = _layer(num_experts=4, n_group=1, topk_group=1, top_k=1).train()
    moe.load.copy_(torch.tensor([6, 2, 4, 4]))  # mean 4: overloaded, underloaded, balanced, balanced
    moe.gate.e_score_correction_bias.copy_(torch.tensor([0.1, 0.1, 0.0, -0.2]))
    assert update_expert_bias(moe, gamma=0.01) == 1
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([0.09, 0.11, 0.0, -0.2]))
    assert moe.load.sum() == 0
    moe(torch.randn(3, 5, 32))  # training forward counts the T*K assignments
    assert moe.load.sum() == 15


def test_training_forward_sets_aux_loss():
    moe = _layer(aux_loss_alpha=0.01).train()
    x = torch.randn(2, 6, 32)
    moe(x)
    scores, _, indices = route(moe.gate(x.view(-1, 32)), moe.cfg, moe.gate.e_score_correction_bias)
    torch.testing.assert_close(moe.aux_loss, balance_loss(scores, indices, moe.cfg, batch_size=2))
    moe.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- loading


def test_per_expert_keys_load_into_fused_layout():
    model = build_tiny("deepseek_v3")[0]
    fused = model.state_dict()
    per_expert = split_expert_weights(fused)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in per_expert
    assert "model.layers.1.mlp.experts.gate_up_proj" not in per_expert
    back = fuse_expert_weights(per_expert)
    assert back.keys() == fused.keys()
    assert all(torch.equal(back[k], fused[k]) for k in fused)
    # a single layer loads from either layout
    prefix = "model.layers.2.mlp."
    layer_sd = {k[len(prefix) :]: v for k, v in per_expert.items() if k.startswith(prefix)}
    moe = MoE(MoEConfig.from_hf(model.config))
    moe.load_state_dict(fuse_expert_weights(layer_sd))
    assert torch.equal(moe.experts.down_proj, model.model.layers[2].mlp.experts.down_proj)
    with pytest.raises(MoEConfigError, match="expected gate/up/down"):
        fuse_expert_weights({k: v for k, v in layer_sd.items() if "experts.3.up_proj" not in k})
