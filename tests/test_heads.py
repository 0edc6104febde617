from __future__ import annotations

import pytest
import torch

from mtpkit.heads import HeadError, build_head, load_head, save_head
from mtpkit.models import load_target
from mtpkit.train.losses import depth_weights, lm_loss, shifted_labels


def test_shifted_labels_hand_built():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    labels, valid = shifted_labels(ids, mask, 1)  # row i predicts t_{i+2}
    assert labels.tolist() == [[12, 13, 14, 15, 0, 0]]
    assert valid.tolist() == [[True, True, True, True, False, False]]
    labels, valid = shifted_labels(ids, mask, 3)  # row i predicts t_{i+4}
    assert labels.tolist() == [[14, 15, 0, 0, 0, 0]]
    assert valid.tolist() == [[True, True, False, False, False, False]]
    mask[0, 3] = False  # an unmasked label position is never trained on
    assert shifted_labels(ids, mask, 1)[1].tolist() == [[True, False, True, True, False, False]]


@pytest.mark.parametrize("depths", [1, 2, 3])
def test_depth_k_reads_token_i_plus_k(tiny_llama, depths):
    """Changing token j must leave rows < j−k of depth k untouched and change row j−k: depth k at
    row i consumes e(t_{i+k}) (and hᵏ⁻¹ of rows ≤ i), exactly the alignment that predicts t_{i+k+1}."""
    torch.manual_seed(0)
    head = build_head(tiny_llama, "mtp", {"num_depths": depths, "zero_first_embedding": False})
    T, j = 10, 7
    ids = torch.randint(3, 250, (1, T))
    hidden = torch.randn(1, T, tiny_llama.hidden_size)
    changed = ids.clone()
    changed[0, j] = (ids[0, j] + 1) % 250 + 3
    with torch.no_grad():
        a, b = head.forward_train(ids, hidden), head.forward_train(changed, hidden)
    assert len(a) == depths
    for k in range(1, depths + 1):
        diff = (a[k - 1] - b[k - 1]).abs().amax(-1)[0]
        assert diff[: j - k].max() == 0, k
        assert diff[j - k] > 0, k


def test_repeated_layer_mode_reuses_one_module(tiny_llama):
    head = build_head(tiny_llama, "mtp", {"num_depths": 1, "train_depths": 3})
    assert len(head.layers) == 1 and all(head.module_for_step(s) is head.layers[0] for s in range(3))
    outs = head.forward_train(torch.randint(3, 200, (2, 6)), torch.randn(2, 6, tiny_llama.hidden_size))
    assert len(outs) == 3
    assert not any(k.startswith("layers.1") for k in head.state_dict())
    two = build_head(tiny_llama, "mtp", {"num_depths": 2, "train_depths": 4})
    assert [two.module_for_step(s) for s in range(4)] == [
        two.layers[0],
        two.layers[1],
        two.layers[0],
        two.layers[1],
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2", "deepseek_v3"])
def test_block_is_the_targets_layer_and_last_layer_init_copies_it(family):
    target = load_target(f"tiny-{family}")
    head = build_head(target, "mtp", {"num_depths": 2, "init": "last_layer"})
    assert type(head.layers[0].block) is target.decoder_layer_cls
    assert head.layers[1].block.self_attn.layer_idx == target.num_layers + 1  # exported as layer L+1
    last = target.backbone.layers[-1].state_dict()
    for name, tensor in head.layers[1].block.state_dict().items():
        assert torch.equal(tensor, last[name]), name
    if family == "deepseek_v3":
        assert type(head.layers[0].block.mlp).__name__ == "DeepseekV3MoE"
    # Frozen pieces are the target's own and not part of the head.
    assert head.embed_tokens is target.embed_tokens and head.lm_head is target.lm_head
    assert not any("embed" in k or "lm_head" in k for k in head.state_dict())
    names = {k.split(".", 2)[2] for k in head.state_dict()}
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"} <= names


def test_random_init_is_seeded_and_sane(tiny_llama):
    torch.manual_seed(1)
    a = build_head(tiny_llama, "mtp", {})
    torch.manual_seed(1)
    b = build_head(tiny_llama, "mtp", {})
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert torch.equal(a.layers[0].enorm.weight, torch.ones_like(a.layers[0].enorm.weight))
    # shared_head.norm feeds the target's LM head: it starts as the target's final norm.
    target = load_target("tiny-llama")
    with torch.no_grad():
        target.final_norm.weight.uniform_(1.5, 2.0)
    head = build_head(target, "mtp", {"num_depths": 2})
    for module in head.layers:
        assert torch.equal(module.shared_head.norm.weight, target.final_norm.weight)
    std = a.layers[0].eh_proj.weight.std().item()
    assert 0.01 < std < 0.03  # the family's initializer_range (0.02)


def test_save_load_round_trip_and_target_check(tmp_path, tiny_llama):
    head = build_head(tiny_llama, "mtp", {"num_depths": 2})
    save_head(head, tmp_path / "h", tiny_llama)
    loaded = load_head(tmp_path / "h", tiny_llama)
    assert loaded.cfg == head.cfg
    for (k, v), w in zip(head.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(HeadError, match="trained for 'tiny-llama', not 'tiny-qwen2'.*config_hash"):
        load_head(tmp_path / "h", load_target("tiny-qwen2"))
    with pytest.raises(HeadError, match="not an mtpkit head directory"):
        load_head(tmp_path, tiny_llama)
    with pytest.raises(HeadError, match="unknown head type"):
        build_head(tiny_llama, "nope", {})
    with pytest.raises(ValueError, match="train_depths >= num_depths"):
        build_head(tiny_llama, "mtp", {"num_depths": 3, "train_depths": 2})


def test_depth_weights():
    assert depth_weights(3) == pytest.approx([1 / 3] * 3)
    assert depth_weights(3, decay=0.5) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert depth_weights(2, [3, 1]) == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError, match="2 entries for 3"):
        depth_weights(3, [1, 1])


def test_chunked_losses_match_references():
    torch.manual_seed(0)
    V = H = 16
    lm = torch.nn.Linear(H, V, bias=False)
    h = torch.randn(9, H, requires_grad=True)
    labels = torch.randint(0, V, (9,))
    ce, hit = lm_loss(h, labels, lm, "ce", chunk_size=4)
    logits = lm(h)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    assert torch.equal(hit, logits.argmax(-1) == labels)
    ce.backward()  # gradients flow through the checkpointed chunks
    assert h.grad is not None and h.grad.abs().sum() > 0

    # A one-hot teacher: KL(p||q) equals CE, and TV equals 1 − q[label].
    with torch.no_grad():
        lm.weight.copy_(torch.eye(V))
    teacher = torch.nn.functional.one_hot(labels, V).float() * 1e4
    h2 = torch.randn(9, H)
    kl, _ = lm_loss(h2, labels, lm, "kl", teacher, chunk_size=4)
    ce2, _ = lm_loss(h2, labels, lm, "ce", chunk_size=4)
    torch.testing.assert_close(kl, ce2)
    tv, _ = lm_loss(h2, labels, lm, "tv", teacher, chunk_size=4)
    q = torch.softmax(h2, -1)[torch.arange(9), labels]
    torch.testing.assert_close(tv, (1 - q).sum())
    with pytest.raises(ValueError, match="needs the target's hidden states"):
        lm_loss(h2, labels, lm, "kl")
