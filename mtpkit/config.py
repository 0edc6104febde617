"""Run configs: plain dataclasses filled from defaults, then a YAML file, then command-line flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mtpkit.errors import MtpkitError

T = TypeVar("T")


class ConfigError(MtpkitError, ValueError):
    """A config file or field that cannot be used; the message names the file and field."""


def read_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """The fields of a YAML config file, checked against the dataclass `cls`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of field: value")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
    return data


def build_config(cls: type[T], yaml_path: str | Path | None = None, **overrides: Any) -> T:
    """`cls` from its defaults, updated by the YAML file, then by `overrides` (CLI flags given)."""
    fields = read_yaml(yaml_path, cls) if yaml_path else {}
    fields.update(overrides)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in fields]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ConfigError(f"missing required field(s) {missing}: pass {flags} or set them in --config")
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ConfigError(f"{yaml_path or 'config'}: {exc}") from exc
