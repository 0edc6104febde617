"""Joint training of a model and its MTP head: the MTP loss's isolation from the model, label
alignment, SFT data, SFT resume, LoRA / QLoRA merging and engine weight names (tiny models)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtpkit.heads import build_head, load_head
from mtpkit.joint.data import build_example, record_dialogue
from mtpkit.joint.mtp_loss import MTPLossConfig, mtp_loss
from mtpkit.joint.policy import (
    PolicyConfig,
    clip_separately,
    make_optimizer,
    policy_forward,
    prepare_policy,
    save_policy,
)
from mtpkit.joint.sft import SFTConfig, SFTDataConfig, joint_loss, sft
from mtpkit.joint.weights import checkpoint_names, engine_state_dict, merged_state_dict, write_engine_weights
from mtpkit.models import load_target
from mtpkit.train.losses import shifted_labels

REPO = Path(__file__).resolve().parents[1]


def _setup(mode: str = "full", depths: int = 2, family: str = "llama"):
    if mode != "full":
        pytest.importorskip("peft")
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    target = load_target(f"tiny-{family}")
    head = build_head(target, "mtp", {"num_depths": depths})
    policy = prepare_policy(target, PolicyConfig(mode=mode))
    return target, head, policy


def _batch(lengths=(12, 7), vocab=300, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, prompt:n] = True
    return ids, mask


def _grads(module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- gradient isolation
@pytest.mark.parametrize("target_kind", ["ce", "soft_ce", "tv", "lk"])
def test_detached_mtp_loss_gives_exactly_zero_model_gradient(target_kind):
    target, head, policy = _setup("full")
    ids, mask = _batch()
    hidden = policy_forward(policy, ids)
    loss, _ = mtp_loss(head, hidden, ids, mask, target=target_kind)
    loss.backward()
    model_grads = _grads(target.model)
    assert "model.embed_tokens.weight" in model_grads and "lm_head.weight" in model_grads
    for name, g in model_grads.items():
        assert g is None or torch.count_nonzero(g) == 0, name
    for name, g in _grads(head).items():
        assert g is not None and torch.count_nonzero(g) > 0, name


TRUNK = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    ("detach", "reached", "untouched"),
    [
        (
            ["embed", "lm_head"],
            TRUNK,
            ["lm_head.weight"],
        ),  # through the hidden states (and on to the input embedding)
        (["hidden", "lm_head"], "model.embed_tokens.weight", [TRUNK, "lm_head.weight"]),
        (["hidden", "embed"], "lm_head.weight", [TRUNK, "model.embed_tokens.weight"]),
    ],
)
def test_each_undetached_path_reaches_the_model(detach, reached, untouched):
    target, head, policy = _setup("full")
    ids, mask = _batch()
    loss, _ = mtp_loss(head, policy_forward(policy, ids), ids, mask, detach=detach)
    loss.backward()
    grads = _grads(target.model)
    assert grads[reached] is not None and torch.count_nonzero(grads[reached]) > 0
    for name in untouched:
        assert grads[name] is None or torch.count_nonzero(grads[name]) == 0, name


def _one_step(mtp: MTPLossConfig, clip=(0.05, 0.05)):
    """One joint SFT step from identical starting weights; returns model and head state."""
    torch.manual_seed(0)
    target, head, policy = _setup("full")
    ids, mask = _batch()
    opt = make_optimizer(policy, head, 1e-2, 1e-2, (0.9, 0.95), 0.0)
    loss, *_ = joint_loss(policy, head, ids, mask, mtp)
    loss.backward()
    clip_separately(opt, clip)  # tight clips: the model's update is rescaled, by its own norm only
    opt.step()
    return target.model.state_dict(), head.state_dict()


def test_policy_update_is_bitwise_identical_with_detached_mtp_loss():
    without, head_before = _one_step(MTPLossConfig(enabled=False))
    with_mtp, head_after = _one_step(MTPLossConfig(scaling_factor=0.5))
    for name in without:
        assert torch.equal(without[name], with_mtp[name]), name
    assert any(not torch.equal(head_before[k], head_after[k]) for k in head_before)  # the head learned


def test_undetached_mtp_loss_changes_the_policy():
    without, _ = _one_step(MTPLossConfig(enabled=False))
    undetached, _ = _one_step(MTPLossConfig(scaling_factor=0.5, detach=[]))
    assert any(not torch.equal(without[k], undetached[k]) for k in without)


def test_alpha_zero_equals_mtp_off():
    off_model, off_head = _one_step(MTPLossConfig(enabled=False))
    zero_model, zero_head = _one_step(MTPLossConfig(scaling_factor=0.0, detach=[]))
    for name in off_model:
        assert torch.equal(off_model[name], zero_model[name]), name
    for name in off_head:
        assert torch.equal(off_head[name], zero_head[name]), name


# ---------------------------------------------------------------------------- labels
def test_labels_per_depth_skip_padding_prompt_and_sequence_end():
    ids, mask = _batch(lengths=(12, 7), prompt=3)
    for k in (1, 2, 3):
        labels, valid = shifted_labels(ids, mask, k)
        for b, n in enumerate((12, 7)):
            for i in range(ids.shape[1]):
                j = i + k + 1  # the token row i predicts at depth k
                expect = j < n and j >= 3
                assert bool(valid[b, i]) == expect, (k, b, i)
                if expect:
                    assert labels[b, i] == ids[b, j]


def test_padded_batch_loss_equals_per_sequence_losses():
    """Right padding cannot leak into valid rows (causal) and its rows carry no loss."""
    _, head, policy = _setup("full", depths=3)
    ids, mask = _batch(lengths=(12, 7), prompt=2)
    with torch.no_grad():
        _, stats = mtp_loss(head, policy_forward(policy, ids), ids, mask)
        for b, n in enumerate((12, 7)):
            one_ids, one_mask = ids[b : b + 1, :n], mask[b : b + 1, :n]
            _, alone = mtp_loss(head, policy_forward(policy, one_ids), one_ids, one_mask)
            for k in range(3):
                assert alone[k]["count"] == int(stats[k]["valid"][b].sum())
                assert torch.equal(alone[k]["hits"][0], stats[k]["hits"][b, :n])
        total = [sum(float(s["loss_sum"]) for s in _per_seq(head, policy, ids, mask, k)) for k in range(3)]
        for k in range(3):
            assert float(stats[k]["loss_sum"]) == pytest.approx(total[k], rel=1e-5)


def _per_seq(head, policy, ids, mask, k):
    for b, n in enumerate((12, 7)):
        one_ids, one_mask = ids[b : b + 1, :n], mask[b : b + 1, :n]
        yield mtp_loss(head, policy_forward(policy, one_ids), one_ids, one_mask)[1][k]


# ---------------------------------------------------------------------------- SFT data and runs
def test_sft_mask_covers_exactly_the_answers(tiny_llama):
    tok = tiny_llama.tokenizer
    record = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    [(prompt, answers)] = record_dialogue(record, "x:1")
    ex = build_example(tok, prompt, answers, tiny_llama.eos_token_ids[0])
    masked = [i for i, m in zip(ex.ids, ex.mask, strict=True) if m]
    assert tok.decode(masked) == "hello<|im_end|>4<|im_end|>"
    full = tok.apply_chat_template(
        [*record["messages"]], tokenize=False
    )  # the same text the template writes for the whole conversation
    assert tok.decode(ex.ids) == full.rstrip("\n")
    [(p, a)] = record_dialogue({"question": "q?", "answer": "x #### 3"}, "g:1")
    assert p.turns == ("q?",) and a == ["x #### 3"]


def _sft_cfg(out, data, steps):
    cfg = SFTConfig(
        model="tiny-llama",
        out=str(out),
        policy=PolicyConfig(mode="lora"),
        head={"num_depths": 2},
        data=SFTDataConfig(paths=[str(data)], max_seq_len=128, batch_size=2, eval_examples=2),
        max_steps=steps,
        save_every=2,
        eval_every=100,
        log_every=1,
        progress=False,
    )
    cfg.optim.lr = cfg.optim.head_lr = 1e-3
    return cfg


def test_sft_resume_continues_exactly(tmp_path):
    pytest.importorskip("peft")
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}. #### {2 * i}"}) + "\n"
            for i in range(10)
        )
    )
    straight = sft(_sft_cfg(tmp_path / "a", data, 4))
    sft(_sft_cfg(tmp_path / "b", data, 2))
    resumed = sft(_sft_cfg(tmp_path / "b", data, 4), resume=True)
    a = load_file(f"{straight['model']}/model.safetensors")
    b = load_file(f"{resumed['model']}/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha, hb = (
        load_file(f"{straight['head']}/model.safetensors"),
        load_file(f"{resumed['head']}/model.safetensors"),
    )
    for k in ha:
        assert torch.equal(ha[k], hb[k]), k
    # The outputs are ready for eval: the merged model loads, and the head accepts it.
    merged = load_target(straight["model"])
    load_head(straight["head"], merged)


# ---------------------------------------------------------------------------- merging and names
def _randomize_lora(policy):
    g = torch.Generator().manual_seed(1)
    for name, p in policy.named_trainable().items():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])  # deepseek_v3: LoRA on fused MoE experts too
def test_lora_merge_equals_peft_merge_and_unload(family):
    _, _, policy = _setup("lora", family=family)
    _randomize_lora(policy)
    ours = merged_state_dict(policy.peft_model)
    merged = copy.deepcopy(policy.peft_model).merge_and_unload()
    reference = checkpoint_names(merged, merged.state_dict())
    assert ours.keys() == reference.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], atol=0, rtol=1e-6, msg=k)
    assert any(
        not torch.equal(ours[k], v) for k, v in merged_state_dict(load_target(f"tiny-{family}").model).items()
    )


def test_qlora_merge_reproduces_the_adapted_model():
    """NF4 is dequantized and the adapter added in float32 (peft re-quantizes when merging into 4-bit)."""
    target, _, policy = _setup("qlora")
    _randomize_lora(policy)
    ids, _ = _batch()
    with torch.no_grad():
        expected = target.model(input_ids=ids).logits
    plain = load_target("tiny-llama").model
    plain.load_state_dict(merged_state_dict(policy.peft_model))
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


MTP_PARTS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


def test_engine_names_follow_the_deepseek_mtp_layout(tmp_path):
    target, head, policy = _setup("lora", depths=2, family="deepseek_v3")
    L = target.num_layers
    state = engine_state_dict(policy.peft_model, head)
    for d in range(2):
        for part in MTP_PARTS:
            assert f"model.layers.{L + d}.{part}" in state
    # Each block is named as the target's own last decoder layer in its checkpoint (MoE experts
    # one by one: mlp.experts.{e}.{gate,up,down}_proj.weight, as in DeepSeek-V3's release), one
    # layer index on; and the policy's names are its checkpoint names, without peft's.
    plain = load_target("tiny-deepseek_v3").model
    base = checkpoint_names(plain, plain.state_dict())
    last = f"model.layers.{L - 1}."
    own = {k.replace(last, f"model.layers.{L}.") for k in base if k.startswith(last)}
    block = {k for k in state if k.startswith(f"model.layers.{L}.")} - {
        f"model.layers.{L}.{p}" for p in MTP_PARTS
    }
    assert block == own and f"model.layers.{L}.mlp.experts.7.up_proj.weight" in own
    head_names = {k for k in state if k.startswith("model.layers.") and int(k.split(".")[2]) >= L}
    assert set(state) - head_names == set(base)
    out = write_engine_weights(tmp_path / "engine", policy.peft_model, head, target.tokenizer)
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(state) | {
        f"model.layers.{L + d}.{p}"
        for d in range(2)
        for p in ("embed_tokens.weight", "shared_head.head.weight")
    }
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 2


def test_saved_moe_policy_reloads_as_the_trained_model(tmp_path):
    """Merged LoRA on fused experts, written under checkpoint names, loads back through transformers."""
    target, _, policy = _setup("lora", family="deepseek_v3")
    _randomize_lora(policy)
    ids, _ = _batch()
    with torch.no_grad():
        expected = target.model(input_ids=ids).logits
    reloaded = load_target(str(save_policy(policy, tmp_path / "model")))
    with torch.no_grad():
        got = reloaded.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_shipped_joint_configs_load():
    from mtpkit.config import load_config
    from mtpkit.joint.rl import RLConfig

    sft_cfg = load_config(SFTConfig, REPO / "configs/joint/sft_smollm2.yaml", ["policy.mode=qlora"])
    assert sft_cfg.policy.mode == "qlora" and sft_cfg.mtp.detach == ["hidden", "embed", "lm_head"]
    rl_cfg = load_config(RLConfig, REPO / "configs/joint/rl_smollm2.yaml", ["rollout.enable_rollout=true"])
    assert rl_cfg.rollout.enable_rollout and rl_cfg.algo.eps_high == 0.28


def test_undetached_mtp_loss_is_logged(caplog):
    from mtpkit.joint.mtp_loss import warn_if_undetached

    warn_if_undetached(MTPLossConfig(detach=["embed"]))
    assert "hidden, lm_head" in caplog.text
    caplog.clear()
    warn_if_undetached(MTPLossConfig())
    assert not caplog.text
