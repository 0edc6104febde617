"""Every head family decodes losslessly through the one engine, and its drafts are exactly the
training-time forward's predictions for the same inputs (which is what makes caches right)."""

from __future__ import annotations

import pytest
import torch
from helpers import decode_with_draft_trace, shared_prompts, train_tiny_head

from mtpkit.data import chat
from mtpkit.data.collect import CollectConfig, collect
from mtpkit.data.prompts import Prompt
from mtpkit.decode.engine import DecodeError, SpeculativeDecoder

HEADS = {
    "eagle3": {"draft_vocab_size": 200, "ttt_steps": 3},
    "medusa": {"num_heads": 4},
    "diffusion": {"block_length": 4, "denoising_steps": 2, "max_anchors": 256},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("heads")
    collect(
        CollectConfig(
            model="tiny-llama",
            prompts=[str(shared_prompts("vicuna_bench.jsonl"))],
            out=str(root / "store"),
            layers=[0, 1, 2],
            max_new_tokens=32,
            max_prompts=40,
            progress=False,
        ),
        tiny_llama,
    )
    return root


@pytest.fixture(scope="module")
def trained(store, tiny_llama):
    return {
        name: train_tiny_head(tiny_llama, store / "store", store / name, name, fields)
        for name, fields in HEADS.items()
    }


def _prompt(target, text="Tell me about the sea, please."):
    return chat.start(target.tokenizer, Prompt((text,), None, "test")).ids  # as trained: a chat turn


def _expected_drafts(head, target, seq: list[int], k: int) -> list[int]:
    """The training forward over seq (+ drafts so far), read at the anchor row N−2."""
    N = len(seq)
    expected: list[int] = []
    head.eval()
    # EAGLE-3: fused layers; others: the final state
    layers = None if head.feature_layers == [target.num_layers] else head.feature_layers
    with torch.no_grad():
        feats = target.hidden_states(torch.tensor([seq[: N - 1]]), None, layers)[0]
        feats = feats if layers else feats[:, 0]
        for depth in range(1, k + 1):
            full = seq + expected + [0] * (k + 1)
            x = torch.zeros(1, len(full), *feats.shape[1:])
            x[0, : N - 1] = feats
            outs = head.forward_train(torch.tensor([full]), x, depth)
            outs = outs[0] if isinstance(outs, tuple) else outs
            student, _ = head.output_layers(depth)
            token = int(student(outs[-1][0, N - 2]).argmax())
            expected.append(int(head.draft_to_target()[token]) if hasattr(head, "d2t") else token)
    return expected


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("k", [1, 3, 4])
def test_greedy_is_lossless_and_drafts_match_training_forward(trained, tiny_llama, monkeypatch, name, k):
    head = trained[name]
    ids = _prompt(tiny_llama)
    plain = SpeculativeDecoder(tiny_llama).generate(ids, 40)
    spec, trace = decode_with_draft_trace(monkeypatch, tiny_llama, head, k, ids, 40)
    assert spec.tokens == plain.tokens
    assert sum(s.accepted for s in spec.steps) > 0, "the trained head should be accepted sometimes"
    for seq, drafts in trace:
        assert drafts == _expected_drafts(head, tiny_llama, seq, k)
    # bf16 drafting (the eval default) changes drafts at most, never the output.
    monkeypatch.undo()
    bf16 = SpeculativeDecoder(tiny_llama, head, k=k, draft_dtype=torch.bfloat16).generate(ids, 40)
    assert bf16.tokens == plain.tokens


@pytest.mark.parametrize("name", list(HEADS))
def test_sampling_runs_and_drafts_stay_in_the_heads_vocabulary(trained, tiny_llama, monkeypatch, name):
    head = trained[name]
    seen = []
    real = SpeculativeDecoder._draft

    def record(self, seq):
        drafts, probs = real(self, seq)
        for d, q in zip(drafts, probs, strict=True):
            assert q is not None and q[d] > 0 and torch.isclose(q.sum(), torch.tensor(1.0))
            seen.append(q)
        return drafts, probs

    monkeypatch.setattr(SpeculativeDecoder, "_draft", record)
    out = SpeculativeDecoder(tiny_llama, head, k=3, temperature=0.8, seed=1).generate(_prompt(tiny_llama), 20)
    assert len(out.tokens) >= 1 and seen
    if hasattr(head, "t2d"):  # reduced vocabulary: no probability outside it
        assert all(float(q[~head.t2d].sum()) == 0 for q in seen)


def test_bad_k(trained, tiny_llama):
    with pytest.raises(DecodeError, match="must be >= 1"):
        SpeculativeDecoder(tiny_llama, trained["eagle3"], k=0)
