"""Proof that transformers loads and uses an exported MTP head: `generate(use_mtp=True)`.

transformers 5.24 (`modeling_layers.py` MtpLayer / MtpModel, `generation/candidate_generator.py`
MTPCandidateGenerator) reads `model.layers.{L+i}.*` from the main model's own checkpoint. Its
DeepseekV3ForCausalLM only registers the pattern `model\\.layers\\.61.*` (the released model's
MTP layer), so the proof uses a tiny random DeepSeek-V3 with the released depth — 61 layers —
and loads the export with no patching at all.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.candidate_generator import MTPCandidateGenerator

from mtpkit.config import from_dict
from mtpkit.decode.engine import SpeculativeDecoder
from mtpkit.export import export_head
from mtpkit.heads import load_head
from mtpkit.models import load_target
from mtpkit.models.tiny import TINY_CONFIGS, tiny_tokenizer
from mtpkit.train.config import TrainConfig
from mtpkit.train.trainer import train

PROMPTS = [[5, 9, 14, 20, 27, 33, 41, 5, 9, 14], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110]]


@pytest.fixture(scope="module")
def deepseek61(tmp_path_factory):
    """A tiny random DeepSeek-V3 checkpoint with 61 (dense, cheap) layers, like the real model."""
    root = tmp_path_factory.mktemp("ds61")
    fields = dict(
        TINY_CONFIGS["deepseek_v3"], num_hidden_layers=61, first_k_dense_replace=61, intermediate_size=64
    )
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "target")
    tiny_tokenizer().save_pretrained(root / "target")
    target = load_target(str(root / "target"))
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 40))
    cfg = from_dict(
        TrainConfig,
        {
            "out": str(root / "run"),
            # transformers' MtpModel never zeroes the first embedding row (vLLM does), so the head
            # whose drafts must match transformers' exactly is trained without it.
            "head": {"num_depths": 1, "train_depths": 1, "zero_first_embedding": False},
            "max_steps": 3,
            "eval_every": 3,
            "save_every": 3,
            "progress": False,
            "data": {
                "online": {"prompts": [str(corpus)], "mode": "corpus", "sample_size": 24, "batch_size": 4}
            },
        },
    )
    result = train(cfg, target=target)
    out = export_head(result["run"], "transformers", root / "export")
    return target, load_head(result["head"], target), out


def _record_drafts(monkeypatch) -> tuple[list[list[int]], list[torch.Tensor]]:
    drafts: list[list[int]] = []
    draft_logits: list[torch.Tensor] = []
    original = MTPCandidateGenerator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        candidates, logits = original(self, input_ids, *args, **kwargs)
        if logits is not None:  # the first call only lets the main model prefill
            drafts.append(candidates[0, input_ids.shape[1] :].tolist())
            draft_logits.append(logits[0, -1])
        return candidates, logits

    monkeypatch.setattr(MTPCandidateGenerator, "get_candidates", recording)
    return drafts, draft_logits


def test_transformers_use_mtp_matches_plain_greedy_and_mtpkit_drafts(deepseek61, monkeypatch):
    target, head, out = deepseek61
    model = AutoModelForCausalLM.from_pretrained(out)  # unmodified: layer 61 is what it looks for
    assert model.config.num_nextn_predict_layers == 1
    engine = SpeculativeDecoder(target, head, k=1, draft_dtype=torch.float32)
    mtpkit_drafts: list[list[int]] = []
    mtpkit_logits: list[torch.Tensor] = []
    draft, pick = engine._draft, engine.drafter.pick

    def recording_pick(logits):
        mtpkit_logits.append(logits)
        return pick(logits)

    def recording_draft(ids):
        tokens, probs = draft(ids)
        mtpkit_drafts.append(tokens)
        return tokens, probs

    monkeypatch.setattr(engine.drafter, "pick", recording_pick)
    monkeypatch.setattr(engine, "_draft", recording_draft)
    hf_drafts, hf_logits = _record_drafts(monkeypatch)
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        plain = model.generate(ids, do_sample=False, max_new_tokens=16)
        hf_drafts.clear(), hf_logits.clear()
        with_mtp = model.generate(ids, do_sample=False, max_new_tokens=16, use_mtp=True)
        assert with_mtp.tolist() == plain.tolist()
        mtpkit_drafts.clear(), mtpkit_logits.clear()
        ours = engine.generate(prompt, 16, eos_ids=[])
        assert ours.tokens == plain[0, len(prompt) :].tolist()  # the same target, the same greedy text
        # Step by step, transformers drafted what mtpkit drafts from the same verified context.
        n = min(len(hf_drafts), len(mtpkit_drafts))
        assert n >= 8 and hf_drafts[:n] == mtpkit_drafts[:n], (hf_drafts, mtpkit_drafts)
        # Not just the argmax: the draft logits agree (up to RoPE's float error — transformers
        # runs the MTP layer one position later than vLLM and mtpkit, which cancels in attention).
        torch.testing.assert_close(
            torch.stack(hf_logits[:n]), torch.stack(mtpkit_logits[:n]), atol=1e-4, rtol=0
        )


def test_serve_md_snippet_runs_for_other_depths(tmp_path):
    """For L != 61 SERVE.md's snippet points transformers at the exported layers; run it as written."""
    from mtpkit.heads import build_head, save_head

    target = load_target("tiny-deepseek_v3")
    torch.manual_seed(1)
    save_head(build_head(target, "mtp", {"num_depths": 2}), tmp_path / "head", target)
    out = export_head(tmp_path / "head", "transformers", tmp_path / "export")
    code = re.search(r"```python\n(.*?)```", (out / "SERVE.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # the documented snippet itself is what is being tested
    plain = scope["model"].generate(**scope["inputs"], do_sample=False, max_new_tokens=64)
    assert scope["ids"].tolist() == plain.tolist()
