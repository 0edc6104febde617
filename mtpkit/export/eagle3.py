"""EAGLE-3 heads as vLLM / SGLang (`LlamaForCausalLMEagle3`) and vllm-project/speculators load them.

Weights: `fc.weight` [H, 3·H], the decoder layer, `norm.weight`, `lm_head.weight` [draft_vocab, H],
`d2t` (target_id = draft_id + d2t[draft_id]; vLLM reads it, SGLang turns it into hot_token_id),
`t2d` (both skip it), and `embed_tokens.weight` = the target's, so no loader can start from a
random one. The decoder layer is `midlayer.*` for vllm-eagle3 / sglang-eagle3 (the EAGLE-3
release's names; vLLM renames them to `layers.0.*`, SGLang accepts both) and `layers.0.*` for
speculators, whose `Eagle3DraftModel` owns `layers.0.*` and would leave a `midlayer.*` layer
randomly initialised (`from_pretrained` only reports the keys as unexpected). A full-vocabulary
head writes no `d2t` / `t2d`: vLLM then builds no `draft_id_to_target_id` and its loader raises on
an unknown tensor.

Config differences the formats must get right (vLLM 0.32/0.33 `llama_eagle3.py`, SGLang 0.5
`llama_eagle3.py`, speculators 0.9 `config.py`):
- aux layer ids: mtpkit records HF `hidden_states` ids (i = output of decoder layer i). vLLM's id k
  captures the residual stream entering layer k = HF id k (k = 0 is the embedding output), so
  vLLM and speculators take HF ids 0..L−1. SGLang captures before layer v + 1, so its id is
  HF id − 1 and it reaches only HF ids 1..L−1. Neither captures id L (the post-norm state), and
  vLLM's `fc` takes exactly 3 layers.
- `norm_before_residual` is always written (vLLM's speculators path defaults a missing value to
  true); SGLang implements only false.
- both `rope_theta` (speculators' converter and older loaders read it; a missing one silently
  becomes 10000) and transformers 5's `rope_parameters`.
- vLLM's Llama layer gives q/k/v/o one `attention_bias`; Qwen2-style q/k/v-only biases are refused.
"""

from __future__ import annotations

import json

from safetensors.torch import save_file

from mtpkit.export.checkpoint import SINGLE
from mtpkit.export.source import ExportError, HeadSource
from mtpkit.models.loader import causal_lm_architectures

EAGLE3_ARCH = "LlamaForCausalLMEagle3"
NUM_AUX_LAYERS = 3  # vLLM: fc input = 3 * target_hidden_size
# Lowest HF hidden_states id each format's engine captures. vLLM 0.32 `models/llama.py:428-441`
# appends the residual stream before layer 0 (the embeddings) and after each layer idx as id idx + 1
# (`interfaces.py:1601` `_maybe_add_hidden_state`): id k = HF id k for k < L, while its id L is the
# pre-norm state, not HF's post-norm one. SGLang 0.5.23 `models/llama.py:941` captures id + 1, so
# HF id 0 has no SGLang id.
LOWEST_AUX_ID = {"vllm-eagle3": 0, "speculators": 0, "sglang-eagle3": 1}


def aux_layer_ids(src: HeadSource, fmt: str) -> list[int]:
    layers = list(src.head_config["layers"])
    return [i - 1 for i in layers] if fmt == "sglang-eagle3" else layers


def check_eagle3_export(src: HeadSource, fmt: str, k: int) -> None:
    cfg, L = src.head_config, src.num_layers
    layers = cfg["layers"]
    if len(layers) != NUM_AUX_LAYERS:
        raise ExportError(
            f"{fmt}: the engines fuse exactly {NUM_AUX_LAYERS} target layers (vLLM's fc is 3 x target_hidden_size); "
            f"this head fuses {len(layers)} ({layers}). Train with head.layers of 3 ids in 1..{L - 1}, or export native."
        )
    lowest = LOWEST_AUX_ID.get(fmt, 1)
    if not all(lowest <= i <= L - 1 for i in layers):
        reach = "the embedding output and " if lowest == 0 else ""
        raise ExportError(
            f"{fmt}: aux layers {layers} (HF hidden_states ids) include ids the engine cannot capture: it reads "
            f"{reach}the residual stream entering decoder layers, ids {lowest}..{L - 1} (not {L} = the final "
            "post-norm state"
            + ("" if lowest == 0 else "; SGLang cannot capture id 0 = embeddings, vLLM can: use vllm-eagle3")
            + "). Train with other head.layers, or export native."
        )
    state = src.state
    if state["lm_head.weight"].shape[0] == src.config.vocab_size and "d2t" in state and state["d2t"].any():
        raise ExportError(
            f"{fmt}: the head's draft vocabulary is the whole target vocabulary but its d2t is not the identity; "
            "the engines build no draft→target map for a full vocabulary. Export native."
        )
    if cfg.get("norm_before_residual") and fmt == "sglang-eagle3":
        raise ExportError(
            "sglang-eagle3: SGLang implements only norm_before_residual=false and this head was trained with true; "
            "use vllm-eagle3 or speculators"
        )
    if any(key.startswith("midlayer.") and key.endswith(".bias") for key in src.state):
        raise ExportError(
            f"{fmt}: the head's midlayer has biases (a Qwen2-style target); vLLM's LlamaForCausalLMEagle3 gives "
            "q/k/v/o one attention_bias, so q/k/v-only biases cannot be represented. Export native."
        )


def full_vocabulary(src: HeadSource) -> bool:
    return src.state["lm_head.weight"].shape[0] == src.config.vocab_size


def eagle3_tensors(src: HeadSource, fmt: str) -> dict:
    tensors = {k: v.contiguous() for k, v in src.state.items()}
    if full_vocabulary(src):  # identity maps (checked): the engines have no parameter for them
        tensors.pop("d2t", None)
        tensors.pop("t2d", None)
    if fmt == "speculators":  # speculators' Eagle3DraftModel owns layers.0.*, not midlayer.*
        tensors = {
            "layers.0." + k.removeprefix("midlayer.") if k.startswith("midlayer.") else k: v
            for k, v in tensors.items()
        }
    tensors["embed_tokens.weight"] = src.target_tensor("model.embed_tokens.weight").clone()
    return tensors


def layer_config(src: HeadSource) -> dict:
    """The draft layer's Llama config: the target's decoder fields, one layer."""
    fields = src.config.to_dict()
    for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(key, None)
    fields.update(model_type="llama", num_hidden_layers=1, tie_word_embeddings=False)
    rope = fields.get("rope_parameters") or {}
    if "rope_theta" in rope:  # transformers 5 keeps it only in rope_parameters
        fields.setdefault("rope_theta", rope["rope_theta"])
    return fields


def engine_config(src: HeadSource, fmt: str) -> dict:
    cfg = src.head_config
    ids = aux_layer_ids(src, fmt)
    config = layer_config(src)
    config.update(
        architectures=[EAGLE3_ARCH],
        draft_vocab_size=src.state["lm_head.weight"].shape[0],
        target_hidden_size=src.config.hidden_size,
        norm_before_residual=bool(cfg.get("norm_before_residual", False)),
        eagle_config={"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
    )
    if fmt == "vllm-eagle3":
        config["eagle_aux_hidden_state_layer_ids"] = ids  # vLLM also reads the top-level form
    return config


def verifier_architectures(src: HeadSource) -> list[str]:
    # A config built in memory (tiny targets) or read from an old cache may lack the field.
    return list(src.config.architectures or causal_lm_architectures(src.model_type))


def speculators_config(src: HeadSource, k: int) -> dict:
    cfg = src.head_config
    verifier = str(src.model_dir.resolve()) if src.model_dir is not None else src.target_spec
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.1.0",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": k,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": verifier_architectures(src)},
        },
        "transformer_layer_config": layer_config(src),
        "draft_vocab_size": src.state["lm_head.weight"].shape[0],
        "norm_before_residual": bool(cfg.get("norm_before_residual", False)),
        "target_hidden_size": src.config.hidden_size,
        "eagle_aux_hidden_state_layer_ids": aux_layer_ids(src, "speculators"),
    }


def _writer(fmt: str):
    def write(src: HeadSource, out, k: int) -> None:
        save_file(eagle3_tensors(src, fmt), str(out / SINGLE), {"format": "pt"})
        config = speculators_config(src, k) if fmt == "speculators" else engine_config(src, fmt)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        src.tokenizer.save_pretrained(out)

    return write


write_vllm_eagle3 = _writer("vllm-eagle3")
write_sglang_eagle3 = _writer("sglang-eagle3")
write_speculators = _writer("speculators")
