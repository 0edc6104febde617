"""Draft heads: one folder per family, and the registry every other part goes through.

A family (`heads/<name>/`) is a config dataclass, a `DraftHead` subclass built as
`Head(target, cfg)` and its `Drafter`, registered once below with the export formats that
represent it (`base.HeadFamily`); `base.DraftHead` states the whole interface the trainer,
losses, decoding engine, exporters and joint training use. Heads are saved in mtpkit's native
format — a directory with `config.json` (family, config, the identity of the target it was
trained for) and `model.safetensors` — and loading refuses a target that differs in what the
head depends on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from mtpkit.config import from_dict
from mtpkit.errors import MtpkitError
from mtpkit.heads import diffusion, eagle3, medusa, mtp
from mtpkit.heads.base import DepthOutputs, Drafter, DraftHead, HeadFamily, TargetModules
from mtpkit.heads.mtp import MTPConfig, MTPHead
from mtpkit.io import atomic_dir
from mtpkit.models import Target
from mtpkit.models.loader import identity_differences

log = logging.getLogger(__name__)


class HeadError(MtpkitError, ValueError):
    """A head that cannot be built, loaded or used with this target."""


def check_family(family: HeadFamily) -> None:
    """Refuse a family that lacks a piece the rest of mtpkit relies on, naming the piece."""
    where = f"head family {family.name!r}"
    if not dataclasses.is_dataclass(family.config):
        raise HeadError(f"{where}: config must be a dataclass, got {family.config!r}")
    if not (isinstance(family.model, type) and issubclass(family.model, DraftHead)):
        raise HeadError(f"{where}: model must subclass mtpkit.heads.base.DraftHead")
    if getattr(family.model, "head_type", None) != family.name:
        raise HeadError(f"{where}: model.head_type must be {family.name!r}")
    for method in ("forward_train", "make_drafter"):
        if getattr(family.model, method) is getattr(DraftHead, method):
            raise HeadError(f"{where}: model does not implement {method}()")
    missing = [m for m in ("start", "commit", "draft") if not callable(getattr(family.drafter, m, None))]
    if missing:
        raise HeadError(f"{where}: drafter {family.drafter.__name__} lacks {missing} (see base.Drafter)")
    if "train_depths" not in {f.name for f in dataclasses.fields(family.config)} and not isinstance(
        getattr(family.config, "train_depths", None), property
    ):
        raise HeadError(f"{where}: config needs train_depths (a field or a property)")


FAMILIES: dict[str, HeadFamily] = {}


def register(family: HeadFamily) -> HeadFamily:
    check_family(family)
    if family.name in FAMILIES:
        raise HeadError(f"head family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


for _module in (mtp, eagle3, medusa, diffusion):
    register(_module.FAMILY)
HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "model.safetensors"
# A head is tied to these: a different value means different hidden states or token ids.
_TARGET_MUST_MATCH = ("hidden_size", "vocab_size", "num_layers", "config_hash", "tokenizer_hash")


def head_family(head_type: str) -> HeadFamily:
    if head_type not in FAMILIES:
        raise HeadError(f"unknown head type {head_type!r}; available: {sorted(FAMILIES)}")
    return FAMILIES[head_type]


def head_config(head_type: str, fields: dict | None = None):
    cfg_cls = head_family(head_type).config
    try:  # the config loader's messages: unknown field (did you mean), wrong type, range
        return from_dict(cfg_cls, fields or {}, where="head")
    except (TypeError, ValueError) as exc:
        raise HeadError(f"head config for {head_type!r}: {exc}") from exc


def default_k(head_type: str, fields: dict | None = None) -> int:
    """Draft tokens per step a head is served with unless told otherwise: its trained depths."""
    return head_config(head_type, fields).train_depths


def build_head(target: Target, head_type: str, fields: dict | None = None) -> DraftHead:
    cfg = head_config(head_type, fields)
    try:
        return head_family(head_type).model(target, cfg)
    except ValueError as exc:
        raise HeadError(f"{head_type} head for {target.name}: {exc}") from exc


def save_head(head: DraftHead, out: str | os.PathLike, target: Target) -> Path:
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


def _check_shapes(head: DraftHead, state: dict, path: Path, meta: dict) -> None:
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


def load_head(path: str | os.PathLike, target: Target) -> DraftHead:
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
    "FAMILIES",
    "DepthOutputs",
    "DraftHead",
    "Drafter",
    "HeadError",
    "HeadFamily",
    "MTPConfig",
    "MTPHead",
    "TargetModules",
    "build_head",
    "default_k",
    "head_dir",
    "head_family",
    "load_head",
    "read_head_config",
    "save_head",
]
