"""LoRA adapters in peft's format: read, merge into base weights (W += scale · B·A), export adapter-only.

An adapter comes from a peft directory (adapter_config.json + adapter_model.safetensors) or from
a checkpoint that holds base and LoRA tensors together (`*.lora_A.weight` beside the base
weights; alpha and r from an adapter_config.json there or from flags). Names are normalised to
the base model's HF names, so the same adapter merges into an HF directory or into Megatron rank
files (the merge happens on the gathered HF tensor, before it is split again).

The merge follows peft's `merge_and_unload` on CPU: B·A in float32 when the adapter is half
precision, times alpha/r (alpha/√r with rsLoRA), then added in place to the base weight.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtpkit.convert.layout import ConvertError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.weight$"
)
_LORA_KEY_EMB = re.compile(
    r"^(?:base_model\.model\.)?(.+?)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$"
)
# peft saves whole embedding layers beside their LoRA (save_embedding_layers): they replace the base's.
_BASE_LAYER = re.compile(r"^(?:base_model\.model\.)?(.+?)\.base_layer\.weight$")


def is_lora_key(name: str) -> bool:
    return bool(_LORA_KEY.match(name) or _LORA_KEY_EMB.match(name) or _BASE_LAYER.match(name))


@dataclass
class LoraAdapter:
    """LoRA factors by base module name (e.g. model.layers.0.self_attn.q_proj)."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    config: dict
    source: str
    embedding: set[str] = field(default_factory=set)
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> saved base weight

    # -- reading --
    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict, source: str) -> LoraAdapter:
        a, b, emb, base = {}, {}, set(), {}
        for k, v in tensors.items():
            if m := _BASE_LAYER.match(k):
                base[m.group(1)] = v
                continue
            m = _LORA_KEY.match(k) or _LORA_KEY_EMB.match(k)
            if not m:
                raise ConvertError(f"{source}: {k} is not a LoRA tensor (expected *.lora_A/lora_B.weight)")
            module, kind = m.groups()
            (a if kind.endswith("A") else b)[module] = v
            if "embedding" in kind:
                emb.add(module)
        if set(a) != set(b):
            odd = sorted(set(a) ^ set(b))
            raise ConvertError(f"{source}: LoRA A and B factors do not pair up, e.g. {odd[:3]}")
        if not a:
            raise ConvertError(f"{source}: no LoRA tensors")
        return cls(a, b, _check_config(config, source), source, emb, base)

    @classmethod
    def from_peft_dir(cls, path: str | Path) -> LoraAdapter:
        path = Path(path)
        cfg, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        if not cfg.is_file():
            raise ConvertError(f"{path}: no {ADAPTER_CONFIG}; is this a peft adapter directory?")
        if not weights.is_file():
            raise ConvertError(
                f"{path}: no {ADAPTER_WEIGHTS} (adapter_model.bin is not read; re-save with safetensors)"
            )
        return cls.from_tensors(load_file(str(weights)), json.loads(cfg.read_text()), str(path))

    @classmethod
    def from_combined(cls, reader, r: int | None = None, alpha: float | None = None) -> LoraAdapter | None:
        """The LoRA tensors stored beside the base weights of an HF directory, if any."""
        names = [n for n in reader.names() if is_lora_key(n)]
        if not names:
            return None
        cfg_path = reader.path / ADAPTER_CONFIG
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        if r is not None:
            config["r"] = r
        if alpha is not None:
            config["lora_alpha"] = alpha
        if "r" not in config or "lora_alpha" not in config:
            raise ConvertError(
                f"{reader.path}: holds LoRA tensors but no {ADAPTER_CONFIG}; pass --lora-r and --lora-alpha"
            )
        return cls.from_tensors({n: reader.get(n).clone() for n in names}, config, str(reader.path))

    # -- merging --
    def scale(self, module: str) -> float:
        cfg = self.config
        r, alpha = cfg["r"], cfg["lora_alpha"]
        for key, value in (cfg.get("rank_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{key}", module):
                r = value
        for key, value in (cfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{key}", module):
                alpha = value
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.a[module], self.b[module]
        half = a.dtype in (torch.float16, torch.bfloat16)
        if half:
            a, b = a.float(), b.float()
        d = b @ a if module not in self.embedding else (b @ a).T
        if self.config.get("fan_in_fan_out"):
            d = d.T
        d = d * self.scale(module)
        return d.to(self.a[module].dtype) if half else d

    def targets(self) -> dict[str, str]:
        """HF weight name -> module name."""
        return {f"{m}.weight": m for m in self.a}

    def owns(self, name: str) -> bool:
        return is_lora_key(name)

    def wrap(self, get: Callable[[str], torch.Tensor], names: list[str]) -> Callable[[str], torch.Tensor]:
        """`get` with the adapter merged in; every adapted weight must be among `names`."""
        targets = self.targets()
        missing = sorted((set(targets) | {f"{m}.weight" for m in self.replace}) - set(names))
        if missing:
            raise ConvertError(
                f"{self.source}: adapts weights the base model does not have, e.g. {missing[:3]}"
            )

        def merged(name: str) -> torch.Tensor:
            module = name.removesuffix(".weight")
            w = self.replace[module] if module in self.replace else get(name)
            if name not in targets:
                return w
            d = self.delta(targets[name])
            if d.shape != w.shape:
                raise ConvertError(
                    f"{self.source}: LoRA for {name} gives {list(d.shape)}, weight is {list(w.shape)}"
                )
            out = w.clone()
            out += d  # in place, like peft: computed in the wider dtype, stored in the weight's
            return out

        return merged

    # -- export --
    def save_peft(self, out: Path, base_model: str | None = None) -> None:
        """adapter_config.json + adapter_model.safetensors that peft's from_pretrained reads."""
        tensors = {}
        for m in sorted(self.a):
            a_name, b_name = (
                ("lora_embedding_A", "lora_embedding_B") if m in self.embedding else ("lora_A", "lora_B")
            )
            suffix = "" if m in self.embedding else ".weight"
            tensors[f"base_model.model.{m}.{a_name}{suffix}"] = self.a[m].contiguous()
            tensors[f"base_model.model.{m}.{b_name}{suffix}"] = self.b[m].contiguous()
        for m, w in self.replace.items():
            tensors[f"base_model.model.{m}.base_layer.weight"] = w.contiguous()
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "base_model_name_or_path": base_model,
        }
        cfg.update({k: v for k, v in self.config.items() if k not in ("target_modules",)})
        cfg["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in self.a})
        (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_config(config: dict, source: str) -> dict:
    if config.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{source}: peft_type {config['peft_type']!r} is not LoRA")
    for flag in ("use_dora",):
        if config.get(flag):
            raise ConvertError(f"{source}: {flag}=true adapters cannot be merged as W += scale·B·A")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ConvertError(f"{source}: adapters that train biases are not supported")
    for k in ("r", "lora_alpha"):
        if k not in config:
            raise ConvertError(f"{source}: {ADAPTER_CONFIG} has no {k!r}")
    return config
