"""DeepSeek-style MTP heads in the layout vLLM, SGLang and transformers load.

An MTP head with D modules on a target with L layers becomes checkpoint layers L..L+D−1:

    model.layers.{L+d}.{enorm,hnorm,eh_proj,shared_head.norm}.weight   the MTP module
    model.layers.{L+d}.{self_attn,mlp,input_layernorm,post_attention_layernorm}.*   its block
    model.layers.{L+d}.{embed_tokens,shared_head.head}.weight   copies of the target's

which is the released DeepSeek-V3 layout (layer 61) that vLLM's `deepseek_mtp.py`, SGLang's
`deepseek_nextn.py` and transformers' `MtpModel` read. transformers 5 keeps MoE experts fused
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]); checkpoints list
them per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`), so the block is un-fused here
and fused again on import.

Formats:
  vllm-mtp / sglang-nextn  a draft directory: config.json (the target's, num_hidden_layers = L,
                           num_nextn_predict_layers = D), model.safetensors (the MTP layers),
                           tokenizer files. SGLang's NEXTN loads exactly one layer.
  transformers             the target's own checkpoint with the MTP layers added: what
                           `from_pretrained(...).generate(use_mtp=True)` loads, and what vLLM /
                           SGLang serve as a target with built-in MTP (no separate draft model).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtpkit.export.checkpoint import INDEX, SINGLE, ShardedCheckpoint
from mtpkit.export.source import ExportError, HeadSource, _tiny_family
from mtpkit.models.tiny import DEEPSEEK_V3_ROUTER, build_tiny

# vLLM's SpeculativeConfig.hf_config_override maps exactly these model types to DeepSeekMTPModel;
# SGLang's draft-model override maps their architectures to the NextN class.
MTP_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}
# Tensors of an MTP layer that are the module's own (the rest is its decoder block).
MODULE_KEYS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
# Copies of the target's embedding / LM head that every released MTP layer carries.
SHARED_KEYS = ("embed_tokens.weight", "shared_head.head.weight")
MTP_SHARD = "model-mtp.safetensors"
_EXPERT = re.compile(r"^(?P<base>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------- key mapping
def head_to_checkpoint(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Native MTP head keys (`layers.{d}.…`) → checkpoint keys (`model.layers.{L+d}.…`)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        depth, _, rest = key.removeprefix("layers.").partition(".")
        prefix = f"model.layers.{num_layers + int(depth)}."
        rest = rest.removeprefix("block.")
        if rest.endswith("experts.gate_up_proj"):  # [E, 2I, H] → gate [I, H] and up [I, H] per expert
            base, inter = rest.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}{base}.{e}.gate_proj.weight"] = tensor[e, :inter].contiguous()
                out[f"{prefix}{base}.{e}.up_proj.weight"] = tensor[e, inter:].contiguous()
        elif rest.endswith("experts.down_proj"):  # [E, H, I] → down [H, I] per expert
            base = rest.removesuffix(".down_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}{base}.{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            out[prefix + rest] = tensor.contiguous()
    return out


def checkpoint_to_head(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Checkpoint keys of MTP layers (index >= L) → native head keys; the inverse of the above.

    The target's embedding / LM head copies (`embed_tokens`, `shared_head.head`) are dropped:
    the head uses the target's own, as the serving engines do.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LAYER.match(key)
        if not match or int(match.group(1)) < num_layers:
            raise ExportError(f"{key!r} is not an MTP layer key (model.layers.N.* with N >= {num_layers})")
        depth, rest = int(match.group(1)) - num_layers, match.group(2)
        if rest in SHARED_KEYS:
            continue
        if rest in MODULE_KEYS:
            out[f"layers.{depth}.{rest}"] = tensor
        elif expert := _EXPERT.match(rest):
            base = f"layers.{depth}.block.{expert['base']}"
            experts.setdefault((base, expert["proj"]), {})[int(expert["e"])] = tensor
        else:
            out[f"layers.{depth}.block.{rest}"] = tensor
    for (base, proj), by_id in sorted(experts.items()):
        if sorted(by_id) != list(range(len(by_id))):
            raise ExportError(f"{base}: experts {sorted(by_id)} are not 0..{len(by_id) - 1}")
        stacked = torch.stack([by_id[e] for e in range(len(by_id))])
        if proj == "down_proj":
            out[f"{base}.down_proj"] = stacked
        elif proj == "gate_proj":
            up = experts.get((base, "up_proj"))
            if up is None or len(up) != len(by_id):
                raise ExportError(f"{base}: gate_proj experts without matching up_proj experts")
            out[f"{base}.gate_up_proj"] = torch.cat([stacked, torch.stack([up[e] for e in sorted(up)])], 1)
    return out


# ---------------------------------------------------------------------------- checks
def check_mtp_export(src: HeadSource, fmt: str, k: int) -> None:
    """Refuse what the format cannot represent exactly, saying what would work instead."""
    if src.head_type != "mtp":
        raise ExportError(f"{fmt} holds DeepSeek-style MTP heads, not {src.head_type!r} heads")
    if src.model_type not in MTP_ARCHITECTURES:
        raise ExportError(
            f"{fmt}: the target is a {src.model_type!r} model, and vLLM / SGLang have MTP classes only for "
            f"{', '.join(MTP_ARCHITECTURES)} (vllm/config/speculative.py maps those to DeepSeekMTPModel; there is "
            "no Llama/Qwen2 MTP class). Export this head with --format native and measure it with `mtpkit eval`; "
            "to serve a draft for this target in vLLM / SGLang, train an EAGLE-3 head (vllm-eagle3, sglang-eagle3)."
        )
    depths = src.head_config["num_depths"]
    if fmt == "sglang-nextn" and depths != 1:
        raise ExportError(
            f"sglang-nextn: SGLang's NEXTN loads exactly one MTP layer (deepseek_nextn.py asserts "
            f"num_nextn_predict_layers == 1) and this head has num_depths={depths}. Use --format vllm-mtp, "
            "or train with head.num_depths=1 (head.train_depths can stay > 1: SGLang chains the one layer)."
        )
    if fmt == "vllm-mtp" and k > depths and k % depths:
        raise ExportError(
            f"vllm-mtp: vLLM requires num_speculative_tokens ({k}) to be a multiple of the number of MTP "
            f"layers ({depths}) when it is larger; pick -k {depths * (k // depths)} or {depths * (k // depths + 1)}"
        )


# ---------------------------------------------------------------------------- writers
def mtp_tensors(src: HeadSource) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the head's MTP layers, with the target's embedding / head copies."""
    L = src.num_layers
    tensors = head_to_checkpoint(src.state, L)
    embed, lm_head = src.target_tensor("model.embed_tokens.weight"), src.target_tensor("lm_head.weight")
    for d in range(src.head_config["num_depths"]):
        # Separate storage per key: safetensors refuses aliased tensors.
        tensors[f"model.layers.{L + d}.embed_tokens.weight"] = embed.clone()
        tensors[f"model.layers.{L + d}.shared_head.head.weight"] = lm_head.clone()
    return tensors


def engine_config(src: HeadSource):
    """The target's config as the engines read an MTP checkpoint: L layers + D MTP layers."""
    cfg = copy.deepcopy(src.config)
    cfg.num_hidden_layers = src.num_layers
    cfg.num_nextn_predict_layers = src.head_config["num_depths"]
    cfg.architectures = [MTP_ARCHITECTURES[src.model_type]]
    for key, value in DEEPSEEK_V3_ROUTER.items():  # what transformers computes; the engines need them
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)
    return cfg


def write_draft_dir(src: HeadSource, out: Path, k: int) -> None:
    """vllm-mtp / sglang-nextn: config.json, model.safetensors (MTP layers only), tokenizer."""
    save_file(mtp_tensors(src), str(out / SINGLE), {"format": "pt"})
    engine_config(src).save_pretrained(out)
    src.tokenizer.save_pretrained(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # a 600 GB checkpoint is not copied when the file system allows
    except OSError:
        shutil.copy2(src, dst)


def write_full_checkpoint(src: HeadSource, out: Path, k: int) -> None:
    """transformers: the target's checkpoint minus any old MTP layers, plus this head's layers."""
    L = src.num_layers
    base = src.model_dir
    scratch = None
    if base is None:  # a tiny in-memory target: write its checkpoint first
        scratch = base = out / "_target"
        build_tiny(_tiny_family(src.target_spec))[0].save_pretrained(scratch)
    ckpt = ShardedCheckpoint(base)
    weight_map: dict[str, str] = {}
    for filename in ckpt.files():
        keys = [k for k, f in ckpt.weight_map.items() if f == filename]
        keep = [k for k in keys if not ((m := _LAYER.match(k)) and int(m.group(1)) >= L)]
        name = "model-base.safetensors" if filename == SINGLE else filename  # the index must win
        if len(keep) == len(keys):
            _link_or_copy(base / filename, out / name)
        elif keep:  # a shard that also holds old MTP layers: rewrite it without them
            save_file({k: ckpt.get(k) for k in keep}, str(out / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(keep, name))
    tensors = mtp_tensors(src)
    save_file(tensors, str(out / MTP_SHARD), {"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, MTP_SHARD))
    index = {"metadata": {"source": "mtpkit export"}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for extra in sorted(base.iterdir()):  # generation config, chat template, custom code, ...
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (INDEX, "config.json"):
            shutil.copy2(extra, out / extra.name)
    if scratch is not None:
        shutil.rmtree(scratch)
    engine_config(src).save_pretrained(out)
    src.tokenizer.save_pretrained(out)
