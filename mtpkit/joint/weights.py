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

_HEAD_PARTS = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")


def _base_weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's full-precision weight (dequantized if it is bitsandbytes NF4/FP4)."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(quant_state.dtype)
    return weight.detach()


def lora_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """scaling · B @ A of one peft LoRA linear layer (fan_in_fan_out layers transposed, as peft does)."""
    a = layer.lora_A[adapter].weight.detach()
    b = layer.lora_B[adapter].weight.detach()
    delta = (b.float() @ a.float()) * layer.scaling[adapter]
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named weights of `model` with active LoRA adapters merged and 4-bit layers dequantized.

    `model` is the transformers model (peft injects its adapters into it in place); a
    `peft.PeftModel` is unwrapped. Tied weights appear once, as transformers saves them.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{name}." if name else ""
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A"):  # a peft LoRA layer
            weight = _base_weight(base).float()
            if not getattr(module, "merged", False):
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + lora_delta(module, adapter).to(weight.device)
            out[prefix + "weight"] = weight.to(_dtype_of(base))
            if base.bias is not None:
                out[prefix + "bias"] = base.bias.detach()
            skip_prefixes.append(prefix)
            continue
        if getattr(getattr(module, "weight", None), "quant_state", None) is not None:  # bare NF4 layer
            out[prefix + "weight"] = _base_weight(module)
            if module.bias is not None:
                out[prefix + "bias"] = module.bias.detach()
            skip_prefixes.append(prefix)
            continue
        for pname, param in module.named_parameters(recurse=False):
            out[prefix + pname] = param.detach()
        for bname, buf in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                out[prefix + bname] = buf.detach()
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def _dtype_of(layer: nn.Module) -> torch.dtype:
    qs = getattr(layer.weight, "quant_state", None)
    return qs.dtype if qs is not None else layer.weight.dtype


def head_engine_names(head, num_target_layers: int, include_shared: bool = False) -> dict:
    """The MTP head's weights under DeepSeek-V3 / vLLM `deepseek_mtp` names (layer L + d)."""
    out = {}
    for key, value in head.state_dict().items():
        depth, _, rest = key.partition(".")[2].partition(".")  # "layers.{d}.{rest}"
        layer = f"model.layers.{num_target_layers + int(depth)}."
        if rest.startswith("block."):
            rest = rest[len("block.") :]
        elif not rest.startswith(_HEAD_PARTS):
            raise ValueError(f"head weight {key!r} has no engine name")
        out[layer + rest] = value.detach()
    if include_shared:
        for d in range(head.cfg.num_depths):
            layer = f"model.layers.{num_target_layers + d}."
            out[layer + "embed_tokens.weight"] = head.embed_tokens.weight.detach()
            out[layer + "shared_head.head.weight"] = head.lm_head.weight.detach()
    return out


def engine_state_dict(policy_model: nn.Module, head=None, include_shared: bool = False) -> dict:
    """Policy (merged) + head weights, all under the names a serving engine loads."""
    state = merged_state_dict(policy_model)
    if head is not None:
        state.update(head_engine_names(head, head.num_target_layers, include_shared))
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
