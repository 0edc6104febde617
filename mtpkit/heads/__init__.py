"""Draft heads: one file per family, and the registry every other part goes through.

A head family is a config dataclass plus an nn.Module built as `Head(target, cfg)` with
`forward_train(input_ids, hidden)` (per-depth normed states for the frozen LM head) and
`describe()`. Heads are saved in mtpkit's native format — a directory with `config.json`
(family, config, the identity of the target it was trained for) and `model.safetensors` —
and loading refuses a target that differs in what the head depends on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtpkit.config import from_dict
from mtpkit.errors import MtpkitError
from mtpkit.heads.diffusion import DiffusionConfig, DiffusionHead
from mtpkit.heads.eagle3 import Eagle3Config, Eagle3Head
from mtpkit.heads.medusa import MedusaConfig, MedusaHead
from mtpkit.heads.mtp import MTPConfig, MTPHead
from mtpkit.io import atomic_dir
from mtpkit.models import Target
from mtpkit.models.loader import identity_differences

log = logging.getLogger(__name__)

HEADS: dict[str, tuple[type, type]] = {
    "mtp": (MTPConfig, MTPHead),
    "eagle3": (Eagle3Config, Eagle3Head),
    "medusa": (MedusaConfig, MedusaHead),
    "diffusion": (DiffusionConfig, DiffusionHead),
}
HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "model.safetensors"
# A head is tied to these: a different value means different hidden states or token ids.
_TARGET_MUST_MATCH = ("hidden_size", "vocab_size", "num_layers", "config_hash", "tokenizer_hash")


class HeadError(MtpkitError, ValueError):
    """A head that cannot be built, loaded or used with this target."""


def head_config(head_type: str, fields: dict | None = None):
    if head_type not in HEADS:
        raise HeadError(f"unknown head type {head_type!r}; available: {sorted(HEADS)}")
    cfg_cls = HEADS[head_type][0]
    try:  # the config loader's messages: unknown field (did you mean), wrong type, range
        return from_dict(cfg_cls, fields or {}, where="head")
    except (TypeError, ValueError) as exc:
        raise HeadError(f"head config for {head_type!r}: {exc}") from exc


def build_head(target: Target, head_type: str, fields: dict | None = None) -> torch.nn.Module:
    cfg = head_config(head_type, fields)
    try:
        return HEADS[head_type][1](target, cfg)
    except ValueError as exc:
        raise HeadError(f"{head_type} head for {target.name}: {exc}") from exc


def save_head(head: torch.nn.Module, out: str | os.PathLike, target: Target) -> Path:
    """Write the head in the native format; the directory appears complete or not at all."""
    out = Path(out)
    with atomic_dir(out, replace=True) as tmp:
        state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        save_file(state, tmp / HEAD_WEIGHTS, {"format": "pt"})
        meta = {
            "head_type": head.head_type,
            "head_config": asdict(head.cfg),
            "target": target.identity(),
            "mtpkit_format": 1,
        }
        (tmp / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def head_dir(path: str | os.PathLike) -> Path:
    """Accept a head directory or a run directory that holds one (as `head/`)."""
    path = Path(path)
    if (path / "head" / HEAD_CONFIG).is_file() and not (path / HEAD_CONFIG).is_file():
        return path / "head"
    return path


def read_head_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg_file = path / HEAD_CONFIG
    if not cfg_file.is_file():
        raise HeadError(f"{path}: not an mtpkit head directory (no {HEAD_CONFIG})")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HeadError(f"{cfg_file}: corrupt head config ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("head_type"), str):
        raise HeadError(f"{cfg_file}: not an mtpkit head config (needs an object with 'head_type')")
    for key in ("head_config", "target"):
        if not isinstance(meta.get(key, {}), dict):
            raise HeadError(f"{cfg_file}: {key!r} must be an object, got {type(meta[key]).__name__}")
    return meta


def check_target(meta: dict, target: Target, where: str) -> None:
    """Refuse a target the head was not trained for, saying what differs."""
    trained = meta.get("target", {})
    here = target.identity()
    diffs = identity_differences(trained, here, _TARGET_MUST_MATCH, "head", "target")
    if diffs:
        raise HeadError(
            f"{where}: head was trained for {trained.get('model_id')!r}, not {here.get('model_id')!r} — "
            + "; ".join(diffs)
        )
    if trained.get("weights_hash") not in (None, here.get("weights_hash")):  # None: imported, unknown
        log.warning(
            "%s: target weights differ from those the head was trained on; acceptance may drop", where
        )


def _check_shapes(head: torch.nn.Module, state: dict, path: Path, meta: dict) -> None:
    """Weights of another head shape: say which config and which tensors disagree (not a state-dict dump)."""
    expected = head.state_dict()
    bad = [
        f"{k} is {list(v.shape)} in the weights, {list(expected[k].shape)} for the config"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise HeadError(
            f"{path / HEAD_WEIGHTS}: weights do not fit the {meta['head_type']} head that {path / HEAD_CONFIG} "
            f"describes ({meta.get('head_config')}): " + "; ".join(bad[:3]) + more
        )


def load_head(path: str | os.PathLike, target: Target) -> torch.nn.Module:
    """Load a native head directory for `target` (refused if trained for another target)."""
    path = Path(path)
    meta = read_head_config(path)
    check_target(meta, target, str(path))
    head = build_head(target, meta["head_type"], meta.get("head_config", {}))
    try:
        state = load_file(str(path / HEAD_WEIGHTS))
    except Exception as exc:
        raise HeadError(f"{path / HEAD_WEIGHTS}: cannot read head weights ({exc})") from exc
    _check_shapes(head, state, path, meta)
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HeadError(
            f"{path / HEAD_WEIGHTS}: weights do not fit the head (missing {missing}, unexpected {unexpected})"
        )
    return head


__all__ = [
    "HEADS",
    "HeadError",
    "MTPConfig",
    "MTPHead",
    "build_head",
    "head_dir",
    "load_head",
    "read_head_config",
    "save_head",
]
