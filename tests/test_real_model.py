"""Integration on the real embedded model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
import torch
from helpers import collect_store, shared_prompts

from mtpkit.data.collect import CollectConfig, collect
from mtpkit.data.prompts import load_prompts
from mtpkit.data.store import Store

pytestmark = pytest.mark.slow


def test_collect_stores_the_targets_own_final_hidden_states(tmp_path, smollm2):
    path = shared_prompts("vicuna_bench.jsonl")
    cfg = CollectConfig(
        model="smollm2-135m-instruct",
        prompts=[str(path)],
        out=str(tmp_path / "s"),
        max_prompts=3,
        max_new_tokens=24,
        batch_size=3,
        progress=False,
    )
    summary = collect(cfg, smollm2)
    st = Store(tmp_path / "s")
    assert len(st) == 3 and st.layers == [30]
    tok = smollm2.tokenizer
    for prompt, i in zip(load_prompts([path])[:3], range(3), strict=False):
        s = st[i]
        text = tok.decode(s.input_ids)
        assert text.startswith("<|im_start|>system\n") and prompt.turns[0] in text
        answer = tok.decode(s.input_ids[s.loss_mask], skip_special_tokens=True)
        assert len(answer.split()) >= 5  # a real answer, not noise
        assert text.endswith(tok.decode(s.input_ids[s.loss_mask]))  # the answer closes the sequence
        # The generating forwards' states: every row but the last (never fed back: zeros).
        fresh = smollm2.hidden_states(s.input_ids[None])[0]  # unpadded, batch of one
        torch.testing.assert_close(
            s.hidden_states[:-1].float(), fresh[:-1].to(torch.bfloat16).float(), rtol=1e-2, atol=2e-2
        )
        assert not s.hidden_states[-1].any()
        # The stored hidden state is what the LM head reads: its argmax reproduces the answer.
        logits = smollm2.lm_head(s.hidden_states[:, 0].float())
        start = int(s.loss_mask.int().argmax())
        agree = (logits[start - 1 : -1].argmax(-1) == s.input_ids[start:]).float().mean()
        assert agree > 0.9
    # Bytes per token: 2 bytes x 576 x 1 layer + int32 id + uint8 mask, plus small headers.
    assert 1157 <= summary["bytes_per_token"] < 1157 * 1.1


def test_train_then_decode_losslessly_on_the_real_model(tmp_path, smollm2):
    from mtpkit.config import from_dict
    from mtpkit.decode.evaluate import EvalConfig, evaluate
    from mtpkit.train.config import TrainConfig
    from mtpkit.train.trainer import train

    store = tmp_path / "store"
    collect_store(smollm2, store, ["builtin"], max_prompts=4, max_new_tokens=24, batch_size=4)
    before = {
        k: v.clone()
        for k, v in smollm2.model.state_dict().items()
        if k.endswith(("embed_tokens.weight", "norm.weight", "layers.29.mlp.down_proj.weight"))
    }
    cfg = from_dict(
        TrainConfig,
        {
            "out": str(tmp_path / "run"),
            "max_steps": 8,
            "log_every": 1,
            "eval_every": 8,
            "save_every": 8,
            "progress": False,
            "precision": "bf16",
            "head": {"num_depths": 1, "train_depths": 2, "init": "last_layer"},
            "data": {"store": str(store), "token_budget": 512, "eval_fraction": 0.25},
            "optim": {"lr": 2e-3, "warmup_steps": 2},
        },
    )
    result = train(cfg, target=smollm2)
    import json

    losses = [
        json.loads(x)["loss"]
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["split"] == "train"
    ]
    assert len(losses) == 8 and all(loss == loss for loss in losses)
    assert min(losses[-3:]) < losses[0]  # it learns on repeated batches
    for k, v in before.items():
        assert torch.equal(smollm2.model.state_dict()[k], v), k
    report = evaluate(
        EvalConfig(
            head=result["head"],
            prompts=["builtin"],
            out=str(tmp_path / "r.json"),
            k=[2],
            max_prompts=1,
            max_new_tokens=16,
            hf_baseline=False,
            progress=False,
        ),
        smollm2,
    )
    assert report["identical"] == 1  # speculative output == plain greedy output on the real model
