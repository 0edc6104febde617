"""Key-name and config contracts of the serving engines' MTP loaders, restated from their source.

Neither vLLM nor SGLang runs on this CPU-only machine, so each test re-states, in a few lines,
the name mapping a loader applies and checks an mtpkit export against it in both directions:
every exported key is one the loader maps (a key it skips is a weight silently lost), and every
parameter the loader's module owns is in the export.

- vLLM 0.33 `vllm/model_executor/models/deepseek_mtp.py` (`DeepSeekMTP.load_weights`,
  `_rewrite_spec_layer_name`, `get_spec_layer_idx_from_weight_name` in `deepseek_v2.py`) and
  `vllm/config/speculative.py` (`hf_config_override`: deepseek_v3 / deepseek_v32 → DeepSeekMTPModel,
  `n_predict = num_nextn_predict_layers`).
- SGLang, re-read from the sglang 0.5.23 wheel (`pip download sglang==0.5.23 --no-deps`), paths under
  `sglang/srt/models/`: `deepseek_common/deepseek_weight_loader.py:552-584` (`_initialize_nextn_conf`:
  `num_nextn_predict_layers` must exist and `assert num_nextn_layers == 1` at :567; prefix
  `model.layers.{0 if num_hidden_layers == 1 else num_hidden_layers}` at :570; spec names
  `shared_head.norm`, `eh_proj`, `enorm`, `hnorm` at :579) and `:324-335` (names outside the prefix
  skipped; `shared_head.head` / `embed_tokens` skipped at :328, the target's are used; spec names →
  `model.*`, the rest → `model.decoder.*`). `deepseek_v2.py:519` reads `config.topk_method` (the
  correction bias exists only for `noaux_tc`, :535), `:775` `config.scoring_func`, `:2791`
  `config.moe_layer_freq` — plain attribute reads, hence the router fields in every DeepSeek export.
"""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from mtpkit.export import export_head
from mtpkit.heads import build_head, save_head
from mtpkit.models import load_target

# The parameters of one DeepSeek-V3 MoE decoder layer, in checkpoint names (README_WEIGHTS.md of
# deepseek-ai/DeepSeek-V3 lists the same for layer 61).
_ATTN = (
    "q_a_proj",
    "q_a_layernorm",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_a_layernorm",
    "kv_b_proj",
    "o_proj",
)
# Decoder fields DeepseekV2DecoderLayer / DeepseekV2MoE / MLA read from the config.
_DECODER_FIELDS = (
    "hidden_size", "rms_norm_eps", "vocab_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
    "first_k_dense_replace", "max_position_embeddings", "hidden_act",
    "topk_method", "scoring_func", "moe_layer_freq",
)  # fmt: skip
# transformers' DeepseekV3 router (sigmoid scores + e_score_correction_bias, group top-k) in the
# engines' vocabulary; vLLM's deepseek_v2.py defaults scoring_func to softmax and creates the
# correction bias only for topk_method "noaux_tc"; SGLang's NextN class reads moe_layer_freq.
_ROUTER = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1}


def block_params(config, layer: int) -> set[str]:
    p = f"model.layers.{layer}."
    names = {f"{p}self_attn.{n}.weight" for n in _ATTN}
    names |= {f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"}
    names |= {f"{p}mlp.gate.weight"}
    if config.get("topk_method") == "noaux_tc":  # else vLLM owns no bias and KeyErrors on it
        names |= {f"{p}mlp.gate.e_score_correction_bias"}
    names |= {f"{p}mlp.shared_experts.{n}_proj.weight" for n in ("gate", "up", "down")}
    names |= {
        f"{p}mlp.experts.{e}.{n}_proj.weight"
        for e in range(config["n_routed_experts"])
        for n in ("gate", "up", "down")
    }
    return names


# ---------------------------------------------------------------------------- vLLM
_VLLM_SPEC_LAYER_NAMES = ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head")


def vllm_mtp_param(config: dict, name: str) -> str | None:
    """DeepSeekMTP.load_weights: checkpoint name → parameter name, None when skipped."""
    L, n = config["num_hidden_layers"], config["num_nextn_predict_layers"]
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if not m or not L <= int(m.group(1)) < L + n:  # get_spec_layer_idx_from_weight_name
        return None
    layer = int(m.group(1))
    if not any(w in name for w in _VLLM_SPEC_LAYER_NAMES):
        return name.replace(f"model.layers.{layer}.", f"model.layers.{layer}.mtp_block.")
    if "embed_tokens" in name:  # shared: top level, and only the first MTP layer's copy is loaded
        return "model.embed_tokens.weight" if layer == L else None
    return name


def vllm_mtp_params(config: dict) -> set[str]:
    """The parameters DeepSeekMultiTokenPredictor owns (one layer per index in [L, L+n))."""
    L, n = config["num_hidden_layers"], config["num_nextn_predict_layers"]
    names = {"model.embed_tokens.weight"}
    for layer in range(L, L + n):
        p = f"model.layers.{layer}."
        names |= {p + k for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight")}
        names |= {p + "shared_head.norm.weight", p + "shared_head.head.weight"}
        names |= {n.replace(p, p + "mtp_block.") for n in block_params(config, layer)}
    return names


# ---------------------------------------------------------------------------- SGLang
_SGLANG_NEXTN_SPEC = ("shared_head.norm", "eh_proj", "enorm", "hnorm")


def sglang_nextn_param(config: dict, name: str) -> str | None:
    L = config["num_hidden_layers"]
    prefix = f"model.layers.{0 if L == 1 else L}"
    if not name.startswith(prefix + "."):
        return None
    if "shared_head.head" in name or "embed_tokens" in name:
        return None  # the target's are used
    if any(w in name for w in _SGLANG_NEXTN_SPEC):
        return name.replace(prefix, "model")
    return name.replace(prefix, "model.decoder")


def sglang_nextn_params(config: dict) -> set[str]:
    L = config["num_hidden_layers"]
    names = {
        "model." + k for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
    }
    names |= {n.replace(f"model.layers.{L}.", "model.decoder.") for n in block_params(config, L)}
    return names


# ---------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("contracts")
    target = load_target("tiny-deepseek_v3")
    one = save_head(build_head(target, "mtp", {"num_depths": 1, "train_depths": 2}), root / "d1", target)
    two = save_head(build_head(target, "mtp", {"num_depths": 2}), root / "d2", target)
    return {
        "vllm-d1": export_head(one, "vllm-mtp", root / "vllm-d1"),
        "vllm-d2": export_head(two, "vllm-mtp", root / "vllm-d2"),
        "sglang": export_head(one, "sglang-nextn", root / "sglang"),
        "hf": export_head(one, "transformers", root / "hf"),
    }


def _load(path):
    return json.loads((path / "config.json").read_text()), set(load_file(str(path / "model.safetensors")))


@pytest.mark.parametrize("name", ["vllm-d1", "vllm-d2"])
def test_vllm_deepseek_mtp_maps_every_key_and_gets_every_param(exports, name):
    config, keys = _load(exports[name])
    assert config["model_type"] in ("deepseek_v3", "deepseek_v32")  # hf_config_override → DeepSeekMTPModel
    assert all(config.get(f) is not None for f in _DECODER_FIELDS)
    mapped = {k: vllm_mtp_param(config, k) for k in keys}
    skipped = sorted(k for k, v in mapped.items() if v is None)
    # Only the second layer's embed_tokens copy is skipped (vLLM loads the first one only).
    L = config["num_hidden_layers"]
    assert skipped == [
        f"model.layers.{L + d}.embed_tokens.weight" for d in range(1, config["num_nextn_predict_layers"])
    ]
    assert {v for v in mapped.values() if v} == vllm_mtp_params(config)


def test_sglang_nextn_maps_every_key_and_gets_every_param(exports):
    config, keys = _load(exports["sglang"])
    assert config["num_nextn_predict_layers"] == 1  # DeepseekV3ForCausalLMNextN asserts it
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]  # SGLang swaps in the NextN class for drafts
    mapped = {k: sglang_nextn_param(config, k) for k in keys}
    skipped = {k for k, v in mapped.items() if v is None}
    L = config["num_hidden_layers"]
    assert skipped == {f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L}.shared_head.head.weight"}
    assert {v for v in mapped.values() if v} == sglang_nextn_params(config)


def test_full_checkpoint_serves_mtp_from_the_target_directory(exports):
    """vLLM `method: mtp` without a draft model and SGLang NEXTN without a draft path read the
    MTP layers from the target directory itself; the index must route them to the MTP shard."""
    path = exports["hf"]
    config = json.loads((path / "config.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    mtp_keys = {k for k in index if vllm_mtp_param(config, k)}
    assert mtp_keys == set(load_file(str(path / "model-mtp.safetensors")))
    assert {vllm_mtp_param(config, k) for k in mtp_keys} == vllm_mtp_params(config)


def test_deepseek_exports_carry_the_router_fields_the_engines_read(exports, tmp_path):
    """The tiny V3 config lacked them and neither engine could build it (SGLang AttributeError,
    vLLM KeyError on e_score_correction_bias); a target config without them still gets them."""
    for path in exports.values():
        config = json.loads((path / "config.json").read_text())
        assert {k: config.get(k) for k in _ROUTER} == _ROUTER, path.name
    from transformers import AutoConfig, AutoModelForCausalLM

    from mtpkit.models.tiny import TINY_CONFIGS, tiny_tokenizer

    fields = {k: v for k, v in TINY_CONFIGS["deepseek_v3"].items() if k not in _ROUTER}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    assert not hasattr(model.config, "topk_method")
    model.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    target = load_target(str(tmp_path / "target"))
    head = save_head(build_head(target, "mtp", {"num_depths": 1}), tmp_path / "head", target)
    for fmt in ("vllm-mtp", "transformers"):
        config = json.loads((export_head(head, fmt, tmp_path / fmt) / "config.json").read_text())
        assert {k: config.get(k) for k in _ROUTER} == _ROUTER, fmt
