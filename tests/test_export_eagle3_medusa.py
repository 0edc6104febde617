"""EAGLE-3 and Medusa exports: vllm-eagle3, sglang-eagle3, speculators, vllm-medusa — loader contracts.

- vLLM 0.32 / 0.33 `vllm/model_executor/models/llama_eagle3.py`: `Eagle3LlamaForCausalLM.load_weights`
  skips `t2d`, renames `d2t` → `draft_id_to_target_id`, prefixes `model.` to everything but
  `lm_head`; `LlamaModel.load_weights` renames `midlayer.` → `layers.0.` and stacks q/k/v and
  gate/up; `fc` input is 3 x target_hidden_size; q/k/v input 2 x hidden_size; `attention_bias`
  covers q/k/v/o alike; `norm_before_residual` read from the config.
- SGLang 0.5.23 (wheel source, `sglang/srt/models/`): `llama_eagle3.py:272` `LlamaForCausalLMEagle3`;
  `:303-314` a tied config makes lm_head the embedding and a missing `draft_vocab_size` loads the
  target's LM head (we write `tie_word_embeddings: false` and the size); `:339` renames `midlayer` →
  `layers.0`; `:350-353` hot_token_id = d2t + arange; `:355` skips t2d; `llama.py:939-941` captures
  layer `id + 1` for each `eagle_config.eagle_aux_hidden_state_layer_ids` entry (HF id − 1).
- speculators `src/speculators/config.py`: `speculators_model_type`, `speculators_config`
  (proposal_methods, default_proposal_method, verifier), `transformer_layer_config`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import saved_tiny_llama
from safetensors.torch import load_file, save_file

from mtpkit.export import ExportError, export_head
from mtpkit.heads import build_head, save_head

LAYERS = [1, 2, 3]  # HF hidden_states ids, inside a 5-layer target
ROPE_THETA = 100000.0  # SmolLM2's; not the 10000 a loader falls back to


@pytest.fixture(scope="module")
def llama5(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama5")
    target = saved_tiny_llama(root, num_hidden_layers=5, rope_theta=ROPE_THETA)
    torch.manual_seed(0)
    head = build_head(target, "eagle3", {"layers": LAYERS, "draft_vocab_size": 64})
    head.init_vocab(torch.randint(0, 50, (target.vocab_size,)))  # a non-trivial d2t
    return target, head, save_head(head, root / "head", target)


def vllm_eagle3_param(name: str) -> str | None:
    if "t2d" in name:
        return None
    if "d2t" in name:
        return "draft_id_to_target_id"
    name = name if "lm_head" in name else "model." + name
    return name.replace("midlayer.", "layers.0.")


def vllm_eagle3_params(hidden: int) -> set[str]:
    p = "model.layers.0."
    names = {"model.fc.weight", "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"}
    names |= {"draft_id_to_target_id"}
    names |= {p + n + ".weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")}
    names |= {f"{p}self_attn.{n}_proj.weight" for n in "qkvo"}  # q/k/v stacked into qkv_proj on load
    names |= {f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    return names


def test_vllm_eagle3(llama5, tmp_path):
    target, head, path = llama5
    out = export_head(path, "vllm-eagle3", tmp_path / "v", k=4)
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    H = target.hidden_size
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == 64 and config["target_hidden_size"] == H
    assert config["norm_before_residual"] is False  # written explicitly
    assert config["eagle_aux_hidden_state_layer_ids"] == LAYERS
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == LAYERS
    assert not config.get("attention_bias")  # no biases: matches the bias-free tensors
    # speculators' converter reads the top-level rope_theta (else 10000); transformers 5 the other
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == ROPE_THETA
    assert {vllm_eagle3_param(k) for k in tensors} - {None} == vllm_eagle3_params(H)
    assert tensors["fc.weight"].shape == (H, 3 * H)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * H
    assert tensors["lm_head.weight"].shape == (64, H)
    assert torch.equal(tensors["embed_tokens.weight"], target.embed_tokens.weight)
    state = head.state_dict()
    assert all(torch.equal(tensors[k], v) for k, v in state.items())  # exact, names unchanged
    # d2t: draft id d means target id d + d2t[d] — the draft vocabulary's target ids.
    draft_ids = torch.arange(64) + tensors["d2t"]
    assert torch.equal(draft_ids, torch.nonzero(head.t2d).flatten())
    assert '"method": "eagle3"' in (out / "SERVE.md").read_text()


def test_sglang_eagle3_shifts_layer_ids(llama5, tmp_path):
    _, _, path = llama5
    out = export_head(path, "sglang-eagle3", tmp_path / "s", k=3)
    config = json.loads((out / "config.json").read_text())
    assert config["eagle_config"] == {
        "eagle_aux_hidden_state_layer_ids": [0, 1, 2],
        "use_aux_hidden_state": True,
    }
    assert "eagle_aux_hidden_state_layer_ids" not in config  # SGLang reads only the nested form
    # llama_eagle3.py:303: a tied config would make SGLang's draft LM head the embedding (SmolLM2 ties)
    assert config["tie_word_embeddings"] is False and config["draft_vocab_size"] == 64
    serve = (out / "SERVE.md").read_text()
    assert "--speculative-algorithm EAGLE3" in serve and "--speculative-num-draft-tokens 4" in serve


def test_speculators_config(llama5, tmp_path):
    target, _, path = llama5
    out = export_head(path, "speculators", tmp_path / "sp", k=3)
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    spec = config["speculators_config"]
    assert (
        spec["proposal_methods"][0]["speculative_tokens"] == 3 and spec["default_proposal_method"] == "greedy"
    )
    assert spec["verifier"]["name_or_path"] == str(Path(target.name).resolve())
    assert spec["verifier"]["architectures"] == ["LlamaForCausalLM"]
    assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    assert config["eagle_aux_hidden_state_layer_ids"] == LAYERS and config["norm_before_residual"] is False
    assert config["transformer_layer_config"]["rope_theta"] == ROPE_THETA


def test_speculators_names_the_decoder_layer_layers_0(llama5, tmp_path):
    """speculators 0.9 Eagle3DraftModel owns `layers.0.*`; a `midlayer.*` export loaded with only
    "unexpected key" warnings and a random decoder layer. tests/test_engines.py loads it for real."""
    _, head, path = llama5
    tensors = load_file(str(export_head(path, "speculators", tmp_path / "sp") / "model.safetensors"))
    assert not [k for k in tensors if k.startswith("midlayer.")]
    for name, t in head.state_dict().items():
        assert torch.equal(tensors[name.replace("midlayer.", "layers.0.")], t), name


@pytest.mark.parametrize("fmt", ["vllm-eagle3", "sglang-eagle3", "speculators"])
def test_full_vocabulary_head_writes_no_vocabulary_maps(llama5, tmp_path, fmt):
    """draft_vocab_size = the target's vocabulary: vLLM builds no draft_id_to_target_id then, and
    its loader raised on the d2t tensor; the maps are identities, so they are dropped."""
    target = llama5[0]
    head = build_head(target, "eagle3", {"layers": LAYERS, "draft_vocab_size": 10**6})  # clamped
    assert head.draft_vocab_size == target.vocab_size
    out = export_head(save_head(head, tmp_path / "full", target), fmt, tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    assert "d2t" not in tensors and "t2d" not in tensors
    assert tensors["lm_head.weight"].shape[0] == target.vocab_size
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == target.vocab_size
    with torch.no_grad():  # a full vocabulary with a non-identity map has no engine form
        head.d2t[3] = 1
    with pytest.raises(ExportError, match="d2t is not the identity"):
        export_head(save_head(head, tmp_path / "bad", target), fmt, tmp_path / "x")


def test_aux_layer_zero_is_refused_per_engine(llama5, tmp_path):
    """vLLM captures the residual stream entering layer k for k in 0..L-1 (k = 0: embeddings);
    SGLang's ids are HF id - 1, so HF id 0 has none. The final post-norm state (L) neither."""
    target = llama5[0]
    path = save_head(build_head(target, "eagle3", {"layers": [0, 2, 4]}), tmp_path / "h0", target)
    for fmt in ("vllm-eagle3", "speculators"):
        config = json.loads((export_head(path, fmt, tmp_path / fmt) / "config.json").read_text())
        assert config["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]
    with pytest.raises(ExportError, match=r"sglang-eagle3: .*ids 1\.\.4.*SGLang cannot capture id 0"):
        export_head(path, "sglang-eagle3", tmp_path / "s")
    final = save_head(build_head(target, "eagle3", {"layers": [1, 2, 5]}), tmp_path / "h5", target)
    with pytest.raises(ExportError, match=r"ids 0\.\.4 \(not 5 = the final"):
        export_head(final, "vllm-eagle3", tmp_path / "v")


def test_eagle3_refusals(llama5, tiny_llama, tmp_path):
    target, _, path = llama5
    default = save_head(
        build_head(tiny_llama, "eagle3", {"draft_vocab_size": 32}), tmp_path / "d", tiny_llama
    )
    with pytest.raises(ExportError, match=r"aux layers \[0, 1, 2\].*ids 0\.\.1 \(not 2"):
        export_head(default, "vllm-eagle3", tmp_path / "x")
    two = save_head(
        build_head(target, "eagle3", {"layers": [1, 3], "draft_vocab_size": 32}), tmp_path / "t", target
    )
    with pytest.raises(ExportError, match="exactly 3 target layers"):
        export_head(two, "speculators", tmp_path / "x")
    nbr = build_head(
        target, "eagle3", {"layers": LAYERS, "draft_vocab_size": 32, "norm_before_residual": True}
    )
    nbr_path = save_head(nbr, tmp_path / "nbr", target)
    with pytest.raises(ExportError, match="only norm_before_residual=false"):
        export_head(nbr_path, "sglang-eagle3", tmp_path / "x")
    assert json.loads((export_head(nbr_path, "vllm-eagle3", tmp_path / "ok") / "config.json").read_text())[
        "norm_before_residual"
    ]
    with pytest.raises(ExportError, match="cannot represent a 'eagle3' head"):
        export_head(path, "vllm-mtp", tmp_path / "x")


# ---------------------------------------------------------------------------- Medusa
def _synthetic_medusa(tmp_path, target, own_lm_head: bool):
    """A native Medusa head directory with the documented key names (blocks.*, lm_heads.*)."""
    H, V = target.hidden_size, target.vocab_size
    g = torch.Generator().manual_seed(0)
    state = {
        f"blocks.{h}.layers.0.{p}": torch.randn(*s, generator=g)
        for h in range(3)
        for p, s in (("weight", (H, H)), ("bias", (H,)))
    }
    if own_lm_head:
        state |= {f"lm_heads.{h}.weight": torch.randn(V, H, generator=g) for h in range(3)}
    path = tmp_path / f"medusa-{own_lm_head}"
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    config = {"num_heads": 3, "num_layers": 1, "own_lm_head": own_lm_head, "bias": True}
    meta = {"head_type": "medusa", "head_config": config, "target": target.identity(), "mtpkit_format": 1}
    (path / "config.json").write_text(json.dumps(meta))
    return path, state


@pytest.mark.parametrize("own_lm_head", [True, False])
def test_vllm_medusa_layout(tiny_llama, tmp_path, own_lm_head):
    """vLLM 0.32 `vllm/model_executor/models/medusa.py` (MedusaModel / Medusa.load_weights):
    `blocks.{h}.layers.{l}.weight/.bias`, `lm_heads.{h}.weight`, config num_heads /
    num_hidden_layers / truncated_vocab_size / medusa_fc_bias / original_lm_head / logit_scale."""
    path, state = _synthetic_medusa(tmp_path, tiny_llama, own_lm_head)
    out = export_head(path, "vllm-medusa", tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert config["num_heads"] == 3 and config["num_hidden_layers"] == 1 and config["medusa_fc_bias"] is True
    assert config["truncated_vocab_size"] == config["vocab_size"] == tiny_llama.vocab_size
    tensors = load_file(str(out / "model.safetensors"))
    expected = {f"blocks.{h}.layers.0.{p}" for h in range(3) for p in ("weight", "bias")}
    assert set(tensors) == expected | {f"lm_heads.{h}.weight" for h in range(3)}
    assert all(torch.equal(tensors[k], v) for k, v in state.items())
    if not own_lm_head:  # the target's LM head in every head: exact whatever original_lm_head does
        assert all(torch.equal(tensors[f"lm_heads.{h}.weight"], tiny_llama.lm_head.weight) for h in range(3))
    assert '"method": "medusa"' in (out / "SERVE.md").read_text()
    with pytest.raises(ExportError, match="-k 4 needs 4 Medusa heads"):
        export_head(path, "vllm-medusa", tmp_path / "x", k=4)
    with pytest.raises(ExportError, match="cannot represent a 'medusa' head.*vllm-medusa, native"):
        export_head(path, "vllm-mtp", tmp_path / "x")


@pytest.mark.parametrize("own_lm_head", [True, False])
def test_vllm_medusa_from_a_real_head(tiny_llama, tmp_path, own_lm_head):
    """The exporter on a head built by heads/medusa.py (not a synthetic state dict): every tensor
    lands under vLLM's name, unchanged, and vLLM's MedusaModel forward on the exported tensors
    (x + SiLU(Linear(x)) per layer, then lm_heads.{h}) gives mtpkit's logits."""
    torch.manual_seed(0)
    head = build_head(tiny_llama, "medusa", {"num_heads": 2, "num_layers": 2, "own_lm_head": own_lm_head})
    with torch.no_grad():  # leave the identity initialisation so the blocks matter
        for p in head.blocks.parameters():
            p.normal_(0, 0.05)
    out = export_head(save_head(head, tmp_path / "head", tiny_llama), "vllm-medusa", tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    for name, t in head.state_dict().items():
        assert torch.equal(tensors[name], t), name
    x = torch.randn(5, tiny_llama.hidden_size)
    for h in range(2):
        y = x
        for layer in range(2):
            w, b = tensors[f"blocks.{h}.layers.{layer}.weight"], tensors[f"blocks.{h}.layers.{layer}.bias"]
            y = y + torch.nn.functional.silu(y @ w.T + b)
        vllm_logits = y @ tensors[f"lm_heads.{h}.weight"].T
        student, _ = head.output_layers(h + 1)
        torch.testing.assert_close(vllm_logits, student(head.forward_train(None, x[None], 2)[h][0]))
