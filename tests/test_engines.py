"""Exports loaded by the real engines, in their side venvs (scripts/verify_engines.sh makes them).

Marked `engines` and skipped, saying why, when $MTPKIT_ENGINES_VENV_DIR/<engine> (default
.venvs/<engine>) is absent, so the default suite stays fast; the key-name contract tests
(test_export_contracts.py, test_export_eagle3_medusa.py) stay in it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import saved_tiny_llama
from safetensors.torch import load_file, save_file

from mtpkit.export import export_head
from mtpkit.heads import build_head, save_head

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import verify_engines as engines

LAYERS = [1, 2, 3]
ROPE_THETA = 100000.0  # not the 10000 speculators' converter falls back to


def needs(venv: str):
    return [
        pytest.mark.engines,
        pytest.mark.skipif(
            engines.venv_python(venv) is None,
            reason=f"side venv {engines.venv_dir() / venv} absent (scripts/verify_engines.sh creates it; "
            "MTPKIT_ENGINES_VENV_DIR points elsewhere)",
        ),
    ]


pytestmark = needs("speculators")


@pytest.fixture(scope="module")
def eagle3(tmp_path_factory):
    """A 5-layer Llama target saved as an HF directory and an EAGLE-3 head with moved weights
    (so a randomly initialised layer in the engine could not pass), reduced vocabulary."""
    root = tmp_path_factory.mktemp("engines")
    target = saved_tiny_llama(root, num_hidden_layers=5, rope_theta=ROPE_THETA)
    torch.manual_seed(0)
    head = build_head(target, "eagle3", {"layers": LAYERS, "draft_vocab_size": 64})
    head.init_vocab(torch.randint(0, 50, (target.vocab_size,)))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = save_head(head, root / "head", target)
    return {
        "root": root,
        "target": target,
        "head": path,
        "speculators": export_head(path, "speculators", root / "sp", k=3),
        "vllm-eagle3": export_head(path, "vllm-eagle3", root / "v", k=3),
    }


def test_speculators_loads_our_export_and_drafts_like_mtpkit(eagle3):
    """speculators 0.9 `SpeculatorModel.from_pretrained` (pydantic config validation included):
    every weight from the file (nothing missing but the verifier's norm / LM head, nothing
    unexpected), bit-equal, and `Eagle3DraftModel.forward`'s 3 TTT steps give mtpkit's logits."""
    report = engines.speculators_load(eagle3["speculators"], eagle3["head"])
    assert report["class"] == "Eagle3DraftModel"
    assert set(report["missing"]) == engines.SPECULATORS_VERIFIER_KEYS and not report["unexpected"]
    assert report["differ"] == [] and report["nan_params"] == []
    assert max(report["max_abs_logit_diff_per_step"]) < 1e-4 and report["drafts_equal"]
    config = report["config"]
    assert config["eagle_aux_hidden_state_layer_ids"] == LAYERS and config["rope_theta"] == ROPE_THETA
    assert config["verifier"]["architectures"] == ["LlamaForCausalLM"] and config["draft_vocab_size"] == 64


def test_midlayer_names_would_leave_speculators_a_random_layer(eagle3, tmp_path):
    """The defect the `layers.0.*` names fix, reproduced: the same file with `midlayer.*` names
    loads without an error, with the decoder layer unexpected and missing, and drafts differently."""
    bad = tmp_path / "midlayer"
    shutil.copytree(eagle3["speculators"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    save_file(
        {k.replace("layers.0.", "midlayer."): v for k, v in tensors.items()}, str(bad / "model.safetensors")
    )
    report = engines.speculators_load(bad, eagle3["head"])
    assert len(report["unexpected"]) == 10 and all(k.startswith("midlayer.") for k in report["unexpected"])
    assert len(report["missing_beyond_verifier"]) == 10 and not report["loads"]
    assert max(report["max_abs_logit_diff_per_step"]) > 1e-2


def test_full_vocabulary_head_loads_in_speculators(eagle3, tmp_path):
    """draft_vocab_size = the target's: speculators registers no d2t / t2d buffers, so the
    export must not carry them (they would be unexpected keys)."""
    target = eagle3["target"]
    head = build_head(target, "eagle3", {"layers": LAYERS, "draft_vocab_size": target.vocab_size})
    path = save_head(head, tmp_path / "full", target)
    report = engines.speculators_load(export_head(path, "speculators", tmp_path / "sp"), path)
    assert report["loads"] and report["differ"] == [] and report["drafts_equal"]
    assert report["config"]["draft_vocab_size"] == target.vocab_size


def test_speculators_converter_on_our_vllm_eagle3_export_gives_our_speculators_export(eagle3):
    """speculators' Eagle3Converter (midlayer.* → layers.0.*, config rebuilt from the EAGLE-3
    config.json and the base model) turns vllm-eagle3 into exactly our speculators export: the
    same tensors and the same resolved config, rope_theta included (it reads the top-level one)."""
    converted = engines.speculators_convert(
        eagle3["vllm-eagle3"], eagle3["speculators"], eagle3["root"] / "target", LAYERS
    )
    assert converted["only_converted"] == converted["only_ours"] == converted["differ"] == []
    ours = engines.speculators_load(eagle3["speculators"], eagle3["head"])["config"]
    assert converted["config"] == ours
    assert json.loads((eagle3["vllm-eagle3"] / "config.json").read_text())["rope_theta"] == ROPE_THETA
