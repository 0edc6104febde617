"""`mtpkit import-mtp`: the MTP layers of a DeepSeek-V3 / V3.2-style checkpoint as an mtpkit head.

Only the tensors of layers with index >= num_hidden_layers are read, one at a time, through the
safetensors index (the other 670B parameters of DeepSeek-V3 are never touched). FP8 weights
with a `weight_scale_inv` are dequantised to bf16. The result is a native head directory
(`mtpkit train --init-from`, `mtpkit eval`, `mtpkit export`), or with `--extract-only` the raw
layers under their checkpoint names.

Memory: the imported layers are held in memory once (DeepSeek-V3's layer 61 is ~11.5B
parameters, 23 GB in bf16).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from mtpkit.export.checkpoint import INDEX, SINGLE, CheckpointError, ShardedCheckpoint
from mtpkit.export.mtp import _LAYER, checkpoint_to_head
from mtpkit.export.source import (
    PROVENANCE,
    ExportError,
    _tiny_family,
    atomic_dir,
    target_config_and_tokenizer,
)
from mtpkit.heads import HEAD_CONFIG, HEAD_WEIGHTS
from mtpkit.models.loader import config_hash, tokenizer_hash

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def read_mtp_layers(root: Path) -> tuple[dict, dict, int]:
    """(checkpoint config, {key: tensor} of the MTP layers, L); FP8 dequantised to bf16."""
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{root}: no config.json (not a Hugging Face checkpoint directory)")
    config = json.loads(config_file.read_text())
    L = config.get("num_hidden_layers")
    if not isinstance(L, int):
        raise CheckpointError(f"{config_file}: no integer num_hidden_layers")
    ckpt = ShardedCheckpoint(root)
    keys = [k for k in ckpt.weight_map if (m := _LAYER.match(k)) and int(m.group(1)) >= L]
    if not keys:
        declared = config.get("num_nextn_predict_layers", "absent")
        raise ExportError(
            f"{root}: no MTP layers — looked for tensors model.layers.N.* with N >= num_hidden_layers ({L}) in "
            f"{INDEX if (root / INDEX).is_file() else SINGLE} (num_nextn_predict_layers: {declared}). "
            "Released DeepSeek-V3 keeps them at model.layers.61; some conversions drop them."
        )
    layers = sorted({int(_LAYER.match(k).group(1)) for k in keys})
    if layers != list(range(L, L + len(layers))):
        raise ExportError(f"{root}: MTP layers {layers} are not consecutive from {L}")
    tensors = {k: ckpt.get_dequantized(k) for k in keys if not k.endswith("weight_scale_inv")}
    return config, tensors, L


def _head_target(root: Path, provenance: dict | None, target: str | None) -> tuple[str, str | None]:
    """The target spec the head runs on, and its weights hash when known to be the trained one.

    --target wins; then the target an mtpkit export records (when it is still at hand); then
    the checkpoint itself when it holds the base model (a released DeepSeek-V3 directory).
    """
    if target:
        return target, None
    recorded = (provenance or {}).get("target", {})
    spec = recorded.get("model_id")
    if spec and (_tiny_family(spec) or Path(spec).exists()):
        return spec, recorded.get("weights_hash")
    if "model.norm.weight" in ShardedCheckpoint(root).weight_map:
        return str(root), None
    raise ExportError(
        f"{root}: holds MTP layers only and its target ({spec or f'no {PROVENANCE}'}) is not at hand; "
        "pass --target SPEC"
    )


@dataclass
class ImportConfig:
    """`mtpkit import-mtp`: what `import_mtp` is called with."""

    model: str  # checkpoint directory (config.json + safetensors)
    out: str  # head directory to write
    target: str | None = None  # default: the checkpoint, or the one an export records
    extract_only: bool = False


def import_mtp(
    model: str | os.PathLike, out: str | os.PathLike, target: str | None = None, extract_only=False
) -> dict:
    root, out = Path(model), Path(out)
    config, tensors, L = read_mtp_layers(root)
    depths = len({int(_LAYER.match(k).group(1)) for k in tensors})
    summary = {"checkpoint": str(root), "num_hidden_layers": L, "mtp_layers": depths, "tensors": len(tensors)}
    summary["parameters"] = sum(t.numel() for t in tensors.values())

    if extract_only:
        config.pop("quantization_config", None)  # the weights written are dequantised

        def write_raw(tmp: Path) -> None:
            save_file(tensors, str(tmp / SINGLE), {"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in _TOKENIZER_FILES:
                if (root / name).is_file():
                    shutil.copy2(root / name, tmp / name)

        atomic_dir(out, write_raw)
        return {**summary, "out": str(out), "format": "extract-only"}

    provenance = json.loads((root / PROVENANCE).read_text()) if (root / PROVENANCE).is_file() else None
    spec, weights_hash = _head_target(root, provenance, target)
    tconfig, tokenizer = target_config_and_tokenizer(spec)
    if tconfig.num_hidden_layers != L or tconfig.hidden_size != config.get("hidden_size"):
        raise ExportError(
            f"{root}: MTP layers for a {L}-layer, hidden {config.get('hidden_size')} model, but target {spec!r} "
            f"has {tconfig.num_hidden_layers} layers, hidden {tconfig.hidden_size}"
        )
    head_config = dict(
        (provenance or {}).get("head_config") or {"num_depths": depths, "train_depths": depths}
    )
    if head_config.get("num_depths") != depths:
        raise ExportError(
            f"{root}: {PROVENANCE} says {head_config.get('num_depths')} MTP layers, found {depths}"
        )
    meta = {
        "head_type": "mtp",
        "head_config": head_config,
        "target": {
            "model_id": spec,
            "model_type": tconfig.model_type,
            "config_hash": config_hash(tconfig),
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "weights_hash": weights_hash,  # unknown unless the export recorded it: loading the target is the check
            "num_layers": tconfig.num_hidden_layers,
            "hidden_size": tconfig.hidden_size,
            "vocab_size": tconfig.vocab_size,
        },
        "mtpkit_format": 1,
        "imported_from": str(root.resolve()),
    }
    state = checkpoint_to_head(tensors, L)

    def write_head(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / HEAD_WEIGHTS), {"format": "pt"})
        (tmp / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    atomic_dir(out, write_head)
    return {**summary, "out": str(out), "target": spec, "head_config": head_config}
