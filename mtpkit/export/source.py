"""What an exporter reads: a trained head's files plus its target's config, tokenizer and a few
of its tensors — never the whole target model (a DeepSeek-V3 target is 671B parameters)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mtpkit import io
from mtpkit.errors import MtpkitError
from mtpkit.export.checkpoint import ShardedCheckpoint
from mtpkit.heads import HEAD_WEIGHTS, head_dir, read_head_config
from mtpkit.models.loader import (
    TargetLoadError,
    config_hash,
    identity_differences,
    resolve_target,
    tokenizer_hash,
)
from mtpkit.models.tiny import TINY_CONFIGS, build_tiny, tiny_tokenizer

PROVENANCE = "mtpkit_export.json"  # written by every export; import reads the head's target from it


class ExportError(MtpkitError, ValueError):
    """A head that cannot be exported to (or imported from) a format; the message says why."""


def atomic_dir(out: Path, write) -> Path:
    """Run `write(tmp)` in a fresh temporary directory renamed to `out` when complete (see mtpkit.io)."""
    message = f"{out}: exists and is not empty; choose another --out or remove it"
    try:
        with io.atomic_dir(out, exists_message=message) as tmp:
            write(tmp)
    except io.OutputExistsError as exc:
        raise ExportError(str(exc)) from None
    return out


def _tiny_family(spec: str) -> str | None:
    try:
        return resolve_target(spec).tiny_family
    except TargetLoadError:
        return None


def model_dir(spec: str) -> Path | None:
    """The local HF directory behind a target spec (None for the in-memory tiny targets)."""
    try:
        path = resolve_target(spec).hf_dir()
    except TargetLoadError as exc:
        raise ExportError(str(exc)) from exc
    if path is not None and not (path / "config.json").is_file():
        raise ExportError(f"target {spec!r} is not a local model directory (no config.json)")
    return path


def target_config_and_tokenizer(spec: str):
    """The target's transformers config and tokenizer, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    family = _tiny_family(spec)
    if family:
        fields = dict(TINY_CONFIGS[family])
        return AutoConfig.for_model(fields.pop("model_type"), **fields), tiny_tokenizer()
    path = model_dir(spec)
    return AutoConfig.from_pretrained(path, local_files_only=True), AutoTokenizer.from_pretrained(
        path, local_files_only=True
    )


@dataclass
class HeadSource:
    path: Path  # the native head directory
    meta: dict  # its config.json (head_type, head_config, target identity)
    state: dict[str, torch.Tensor]  # its weights, native key names
    target_spec: str
    config: object  # the target's transformers config
    tokenizer: object

    @property
    def head_type(self) -> str:
        return self.meta["head_type"]

    @property
    def head_config(self) -> dict:
        return self.meta["head_config"]

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def model_dir(self) -> Path | None:
        return model_dir(self.target_spec)

    def target_tensor(self, name: str) -> torch.Tensor:
        """One tensor of the target under its checkpoint name (e.g. `lm_head.weight`)."""
        return _target_tensor(self.target_spec, name)


@functools.lru_cache(maxsize=8)
def _tiny_state(family: str) -> dict:
    return build_tiny(family)[0].state_dict()


def _target_tensor(spec: str, name: str) -> torch.Tensor:
    family = _tiny_family(spec)
    if family:
        state = _tiny_state(family)
        if name == "lm_head.weight" and name not in state:
            name = "model.embed_tokens.weight"
        return state[name]
    ckpt = ShardedCheckpoint(model_dir(spec))
    if name == "lm_head.weight" and name not in ckpt.weight_map:  # tied embeddings
        name = "model.embed_tokens.weight"
    return ckpt.get_dequantized(name)


def open_head(path: str | Path, model: str | None = None) -> HeadSource:
    """Read a native head (or run directory) and its target's config/tokenizer, checking they match."""
    hdir = head_dir(path)
    meta = read_head_config(hdir)
    spec = model or meta.get("target", {}).get("model_id")
    if not spec:
        raise ExportError(f"{hdir}: the head records no target; pass --model")
    config, tokenizer = target_config_and_tokenizer(spec)
    here = {"config_hash": config_hash(config), "tokenizer_hash": tokenizer_hash(tokenizer)}
    diffs = identity_differences(meta.get("target", {}), here, tuple(here), "head", "target")
    if diffs:
        raise ExportError(f"{hdir}: trained for another target than {spec!r} — " + "; ".join(diffs))
    try:
        state = load_file(str(hdir / HEAD_WEIGHTS))
    except Exception as exc:
        raise ExportError(f"{hdir / HEAD_WEIGHTS}: cannot read head weights ({exc})") from exc
    return HeadSource(hdir, meta, state, spec, config, tokenizer)
