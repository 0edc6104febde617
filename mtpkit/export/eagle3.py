"""EAGLE-3 heads as vLLM / SGLang (`LlamaForCausalLMEagle3`) and vllm-project/speculators load them.

Weights (all three formats): `fc.weight` [H, 3·H], `midlayer.*` (vLLM renames to `layers.0.*`),
`norm.weight`, `lm_head.weight` [draft_vocab, H], `d2t` (target_id = draft_id + d2t[draft_id];
vLLM reads it, SGLang turns it into hot_token_id), `t2d` (both skip it), and `embed_tokens.weight`
= the target's embedding, so no loader can start from a random one.

Config differences the formats must get right (vLLM 0.33 `llama_eagle3.py`, SGLang 0.5
`llama_eagle3.py`, speculators `config.py`):
- aux layer ids: mtpkit records HF `hidden_states` ids (i = output of decoder layer i). vLLM's id k
  captures the residual stream before layer k = HF id k; SGLang captures before layer v + 1, so
  its id is HF id − 1. Both capture only inside the decoder (ids 1..L−1 in HF numbering) and
  vLLM's `fc` takes exactly 3 layers.
- `norm_before_residual` is always written (vLLM's speculators path defaults a missing value to
  true); SGLang implements only false.
- vLLM's Llama layer gives q/k/v/o one `attention_bias`; Qwen2-style q/k/v-only biases are refused.
"""

from __future__ import annotations

import json

from safetensors.torch import save_file

from mtpkit.export.checkpoint import SINGLE
from mtpkit.export.source import ExportError, HeadSource

EAGLE3_ARCH = "LlamaForCausalLMEagle3"
NUM_AUX_LAYERS = 3  # vLLM: fc input = 3 * target_hidden_size


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
    if not all(1 <= i <= L - 1 for i in layers):
        raise ExportError(
            f"{fmt}: aux layers {layers} (HF hidden_states ids) include ids the engines cannot capture: they read "
            f"the residual stream between decoder layers, ids 1..{L - 1} (not 0 = embeddings, not {L} = the "
            "final post-norm state). Train with other head.layers, or export native."
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


def eagle3_tensors(src: HeadSource) -> dict:
    tensors = {k: v.contiguous() for k, v in src.state.items()}
    tensors["embed_tokens.weight"] = src.target_tensor("model.embed_tokens.weight").clone()
    return tensors


def layer_config(src: HeadSource) -> dict:
    """The draft layer's Llama config: the target's decoder fields, one layer."""
    fields = src.config.to_dict()
    for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(key, None)
    fields.update(model_type="llama", num_hidden_layers=1, tie_word_embeddings=False)
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
            "verifier": {"name_or_path": verifier, "architectures": list(src.config.architectures or [])},
        },
        "transformer_layer_config": layer_config(src),
        "draft_vocab_size": src.state["lm_head.weight"].shape[0],
        "norm_before_residual": bool(cfg.get("norm_before_residual", False)),
        "target_hidden_size": src.config.hidden_size,
        "eagle_aux_hidden_state_layer_ids": aux_layer_ids(src, "speculators"),
    }


def _writer(fmt: str):
    def write(src: HeadSource, out, k: int) -> None:
        save_file(eagle3_tensors(src), str(out / SINGLE), {"format": "pt"})
        config = speculators_config(src, k) if fmt == "speculators" else engine_config(src, fmt)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        src.tokenizer.save_pretrained(out)

    return write


write_vllm_eagle3 = _writer("vllm-eagle3")
write_sglang_eagle3 = _writer("sglang-eagle3")
write_speculators = _writer("speculators")
