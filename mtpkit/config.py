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


def _dataclass_in(tp) -> type | None:
    """The dataclass a field's type names, also inside `X | None`."""
    import typing

    for candidate in (tp, *typing.get_args(tp)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _coerce(value: Any, tp, where: str) -> Any:
    """Numbers written as YAML strings ("3e-4" is a string to YAML 1.1) become numbers."""
    import typing

    allowed = set(typing.get_args(tp)) or {tp}
    if isinstance(value, str) and str not in allowed:
        for number in (int, float):
            if number in allowed:
                try:
                    return number(value)
                except ValueError:
                    continue
        if allowed & {int, float}:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        return float(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build nested dataclasses from a mapping; unknown or missing fields are named with their path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    import typing

    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_in(hints[name])
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `section.field=value` overrides (values parsed as YAML) to a nested mapping."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: invalid value ({exc})") from exc
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], yaml_path: str | Path | None, overrides: list[str]) -> T:
    """Nested config: dataclass defaults < YAML file < dotted overrides."""
    data: dict[str, Any] = {}
    if yaml_path:
        try:
            data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{yaml_path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{yaml_path}: invalid YAML ({exc})") from exc
    return from_dict(cls, apply_overrides(data, overrides), str(yaml_path or "config"))


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)
