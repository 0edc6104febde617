"""Policy + MTP head weights under the names serving engines load (see shared/reference/serving-formats.md).

The policy's weights keep their Hugging Face names (`model.layers.{l}.self_attn.q_proj.weight`,
...), with LoRA adapters merged (W + scaling · B A) and NF4 layers dequantized, without touching
the live model — so RL can push weights to an engine (vLLM / SGLang weight-update calls take
(name, tensor) pairs) every step and keep training. The MTP head's depth d is layer L + d of the
DeepSeek-V3 layout: `model.layers.{L+d}.{enorm,hnorm,eh_proj,shared_head.norm}.weight` and the
block's `self_attn.*`, `mlp.*`, `input_layernorm`, `post_attention_layernorm` directly under the
layer. `embed_tokens` and `shared_head.head` are the policy's own and the engines substitute them,
so they are written only on request (released DeepSeek-V3 checkpoints carry them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mtpkit.export.mtp import head_to_checkpoint
from mtpkit.heads import DraftHead


def _full_precision(param: torch.Tensor) -> torch.Tensor:
    """A weight at full precision (dequantized if it is a bitsandbytes NF4/FP4 parameter)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(param.data, quant_state).to(quant_state.dtype)
    return param.detach()


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _lora_deltas(module: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The innermost base module under a (possibly nested) peft LoRA layer, and the summed
    delta of each of its parameters (`weight`, or e.g. `gate_up_proj` for LoRA on MoE experts)."""
    deltas: dict[str, torch.Tensor] = {}
    while _is_lora(module):
        pname = getattr(module, "parameter_name", "weight")
        if not getattr(module, "merged", False):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter).detach().float()
                    deltas[pname] = deltas[pname] + delta if pname in deltas else delta
        module = module.base_layer
    return module, deltas


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named weights of `model` with active LoRA adapters merged and 4-bit layers dequantized.

    `model` is the transformers model (peft injects its adapters into it in place) or its
    `peft.PeftModel`. Nothing is modified: merging happens in the returned copies (in float32,
    then cast back). Tied weights appear once, as transformers saves them.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    done: list[str] = []  # prefixes of modules already written with everything under them
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(d) for d in done):
            continue
        base, deltas = _lora_deltas(module) if _is_lora(module) else (module, {})
        for pname, param in base.named_parameters(recurse=False):
            weight = _full_precision(param)
            if pname in deltas:
                weight = (weight.float() + deltas[pname].to(weight.device)).to(weight.dtype)
            out[prefix + pname] = weight
        for bname, buf in base.named_buffers(recurse=False):
            if bname not in base._non_persistent_buffers_set:
                out[prefix + bname] = buf.detach()
        if base is not module:
            done.append(prefix)
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return checkpoint_names(model, out)


def checkpoint_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory names -> the checkpoint's (what `save_pretrained` writes and engines
    load): e.g. DeepSeek-V3's fused `mlp.experts.gate_up_proj` [E, 2I, H] becomes
    `mlp.experts.{e}.{gate,up}_proj.weight`. A no-op for models without such conversions (Llama)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, dict(state)))


def head_engine_names(head: DraftHead, include_shared: bool = False) -> dict[str, torch.Tensor]:
    """The MTP head's weights under DeepSeek-V3 / vLLM `deepseek_mtp` checkpoint names (layer
    L + d), by the one key map `mtpkit export` writes with; `include_shared` adds the copies of
    the embedding / LM head every released MTP layer carries."""
    if head.head_type != "mtp":
        raise ValueError(f"only MTP heads have DeepSeek-V3 engine names, not {head.head_type!r}")
    L = head.num_target_layers
    out = head_to_checkpoint({k: v.detach() for k, v in head.state_dict().items()}, L)
    if include_shared:
        for d in range(head.cfg.num_depths):
            out[f"model.layers.{L + d}.embed_tokens.weight"] = head.embed_tokens.weight.detach()
            out[f"model.layers.{L + d}.shared_head.head.weight"] = head.target_lm_head.weight.detach()
    return out


def engine_state_dict(policy_model: nn.Module, head=None, include_shared: bool = False) -> dict:
    """Policy (merged) + head weights, all under the names a serving engine loads."""
    state = merged_state_dict(policy_model)
    if head is not None:
        state.update(head_engine_names(head, include_shared))
    return state


def write_engine_weights(
    out: str | Path, policy_model: nn.Module, head=None, tokenizer=None, include_shared: bool = True
) -> Path:
    """Write policy + head as one HF directory (config gains `num_nextn_predict_layers`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = policy_model.get_base_model() if hasattr(policy_model, "get_base_model") else policy_model
    state = engine_state_dict(model, head, include_shared)
    # Tied tensors share storage: safetensors needs each written as its own tensor.
    save_file(
        {k: v.contiguous().clone() for k, v in state.items()}, out / "model.safetensors", {"format": "pt"}
    )
    config = model.config.to_dict()
    if head is not None:
        config["num_nextn_predict_layers"] = head.cfg.num_depths
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
