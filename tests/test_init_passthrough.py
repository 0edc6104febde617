"""`head.init: passthrough`: MTP and EAGLE-3 heads that start at the target's own prediction
from the hidden state they are fed, instead of at noise."""

from __future__ import annotations

import pytest
import torch

from mtpkit.heads import build_head, load_head, save_head
from mtpkit.models import load_target


def _teacher_forced(target, layers=None, T=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, target.vocab_size, (2, T), generator=g)
    return ids, target.hidden_states(ids, None, layers)


def _agreement_and_kl(target, logits, hidden):
    """Top-1 agreement of `logits` [B, T, V] with the target's greedy from `hidden` [B, T, H],
    and the mean KL(p_target ‖ q_head)."""
    ref = target.lm_head(hidden)
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True)
    return agree, kl.item() * logits.shape[-1]  # kl_div's mean is over every element


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_mtp_passthrough_starts_at_the_targets_prediction(family):
    """The diagnostic docs/training.md describes: feed the head the next position's hidden state,
    from which the target's own greedy token is exactly recoverable. Passthrough starts there."""
    target = load_target(f"tiny-{family}")
    with torch.no_grad():  # per-channel final-norm gains, as real models have (SmolLM2's average 1.8)
        target.final_norm.weight.uniform_(1.5, 2.0)
    ids, hs = _teacher_forced(target)
    final = hs[:, :, 0]
    shifted = torch.zeros_like(final)
    shifted[:, :-1] = final[:, 1:]  # row i gets h_{i+1}: its greedy token is t̂_{i+2}, the depth-1 label
    scores = {}
    for init in ("random", "passthrough"):
        torch.manual_seed(0)
        head = build_head(target, "mtp", {"num_depths": 1, "train_depths": 2, "init": init})
        with torch.no_grad():
            states = head.forward_train(ids, shifted, 2)
            scores[init] = [
                _agreement_and_kl(target, target.lm_head(s[:, :-2]), final[:, 1:-1]) for s in states
            ]
    (agree_r, kl_r), (agree_p, kl_p) = scores["random"][0], scores["passthrough"][0]
    assert agree_p == 1.0 and agree_r < 0.5, scores
    assert kl_p < 0.5 * kl_r, scores
    # A chained step reads the module's own output: still the pass-through.
    assert scores["passthrough"][1][0] == 1.0, scores
    head = build_head(target, "mtp", {"init": "passthrough"})
    w = head.layers[0].eh_proj.weight  # input is [enorm(e) ; hnorm(h)]
    H = target.hidden_size
    assert torch.equal(w[:, :H], torch.zeros(H, H)) and torch.equal(w[:, H:], torch.eye(H))


def test_eagle3_passthrough_selects_the_last_feature_layer(tiny_llama):
    layers = [0, 1, 2]  # 2 = the final normed state on the 2-layer tiny Llama
    ids, features = _teacher_forced(tiny_llama, layers)
    scores = {}
    for init in ("random", "passthrough"):
        torch.manual_seed(0)
        head = build_head(tiny_llama, "eagle3", {"layers": layers, "ttt_steps": 1, "init": init})
        with torch.no_grad():
            (state,) = head.forward_train(ids, features, 1)
            # Step 1 at row i reads h_i and e(t_{i+1}); passthrough ignores the embedding and
            # predicts the target's t̂_{i+1} from h_i.
            scores[init] = _agreement_and_kl(tiny_llama, head.lm_head(state), features[:, :, -1])
    assert scores["passthrough"][0] == 1.0 and scores["random"][0] < 0.5, scores
    assert scores["passthrough"][1] < 0.5 * scores["random"][1], scores
    H = tiny_llama.hidden_size
    fc = head.fc.weight
    assert torch.equal(fc[:, : 2 * H], torch.zeros(H, 2 * H)) and torch.equal(fc[:, 2 * H :], torch.eye(H))


@pytest.mark.parametrize(
    ("head_type", "fields"),
    [("mtp", {"num_depths": 2}), ("eagle3", {"layers": [0, 1, 2], "draft_vocab_size": 16})],
)
def test_passthrough_heads_save_load_and_export_round_trip(tmp_path, tiny_llama, head_type, fields):
    from mtpkit.export import export_head

    head = build_head(tiny_llama, head_type, {**fields, "init": "passthrough"})
    with torch.no_grad():  # as after some training: loading must not re-apply the init
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_head(head, tmp_path / "h", tiny_llama)
    for back in (
        load_head(path, tiny_llama),
        load_head(export_head(path, "native", tmp_path / "n"), tiny_llama),
    ):
        assert back.cfg == head.cfg and back.cfg.init == "passthrough"
        sd, bd = head.state_dict(), back.state_dict()
        assert sd.keys() == bd.keys() and all(torch.equal(sd[k], bd[k]) for k in sd)


def test_bad_init_names_the_choices(tiny_llama):
    with pytest.raises(
        ValueError, match=r"head init must be one of \('random', 'last_layer', 'passthrough'\)"
    ):
        build_head(tiny_llama, "mtp", {"init": "identity"})
    with pytest.raises(ValueError, match=r"head init must be one of \('random', 'passthrough'\)"):
        build_head(tiny_llama, "eagle3", {"layers": [0, 1, 2], "init": "last_layer"})
