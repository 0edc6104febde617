"""Run configs of every command, built one way: dataclass defaults < YAML file (--config) < dotted
overrides (`section.field=value`) < explicit command-line flags.

Every field's type comes from its annotation and every numeric range / choice is declared once, with
`checked(default, ge=..., choices=...)` (dataclass field metadata) and enforced by `check_fields`
from the config's `__post_init__`, so a bad value fails when the config is built, before any work,
and reads the same in every command: where the value came from (file, override or flag), the
dotted field, and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mtpkit.errors import MtpkitError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(MtpkitError, ValueError):
    """A config file or field that cannot be used; the message names the file and field."""


class FieldError(ConfigError):
    """A field whose value is out of range; `field` is its name, for the loader to name its origin."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------- declared checks
def checked(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable | None = None,
    meaning: str | None = None,
) -> Any:
    """A dataclass field with its valid range or choices (None always passes: "not set").

    A list value is checked element-wise. `meaning` documents a special value, e.g. "0 = off".
    """
    check = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None}
    check = {k: v for k, v in check.items() if v is not None}
    if meaning:
        check["meaning"] = meaning
    kw = {"default": default} if default_factory is _MISSING else {"default_factory": default_factory}
    return dataclasses.field(**kw, metadata={"check": check})


def describe_check(check: dict) -> str:
    """'>= 1', 'in [0, 1)', 'one of [...]' — for error messages and --help texts."""
    if "choices" in check:
        return f"one of {list(check['choices'])}"
    lo = ("[", check["ge"]) if "ge" in check else ("(", check["gt"]) if "gt" in check else None
    hi = ("]", check["le"]) if "le" in check else (")", check["lt"]) if "lt" in check else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + str(lo[1])
    if hi:
        return ("<= " if hi[0] == "]" else "< ") + str(hi[1])
    return "valid"


def _passes(value: Any, check: dict) -> bool:
    if "choices" in check:
        return value in check["choices"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True  # the type check reports non-numbers
    return (
        ("ge" not in check or value >= check["ge"])
        and ("gt" not in check or value > check["gt"])
        and ("le" not in check or value <= check["le"])
        and ("lt" not in check or value < check["lt"])
    )


def check_fields(obj: Any, error: type[Exception] | None = None) -> None:
    """Enforce the `checked(...)` declarations of a dataclass instance (call from `__post_init__`)."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        if not check or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not _passes(v, check):
                meaning = f" ({check['meaning']})" if "meaning" in check else ""
                message = f"{f.name} must be {describe_check(check)}{meaning}, got {value!r}"
                if error is not None:
                    raise error(message)
                raise FieldError(f.name, message)


class Checked:
    """Base of config dataclasses: their `checked(...)` declarations hold from construction on."""

    def __post_init__(self):
        check_fields(self)


def check_section(cls: type[T], data: dict[str, Any], name: str) -> T:
    """`cls` built from the plain mapping held in field `name` (e.g. a head family's config), with
    the loader's messages; call from `__post_init__` so the section fails when the config is built."""
    try:
        return _build(cls, data, name, _Origins(""))
    except ConfigError as exc:
        raise FieldError(name, str(exc).removeprefix(": ")) from None


def field_help(cls: type, name: str, text: str = "") -> str:
    """`text` plus the field's valid range and default, for an argparse help string."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    parts = [text] if text else []
    check = f.metadata.get("check")
    if check and "choices" not in check:
        parts.append(describe_check(check) + (f"; {check['meaning']}" if "meaning" in check else ""))
    if f.default is not _MISSING and f.default is not None and not isinstance(f.default, bool):
        parts.append(f"default {f.default}")
    return "; ".join(parts) if parts else ""


# ---------------------------------------------------------------------------- types
def _type_name(tp) -> str:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _dataclass_in(tp) -> type | None:
    """The dataclass a field's type names, also inside `X | None`."""
    for candidate in (tp, *typing.get_args(tp)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


class _BadType(Exception):
    pass


def _convert(value: Any, tp) -> Any:
    """`value` as type `tp`, or _BadType. YAML 1.1 reads "3e-4" as a string: numbers in strings
    are numbers; a scalar for a list field is a one-element list."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _BadType:
                continue
        raise _BadType
    if origin in (list, tuple) or tp in (list, tuple):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if value is None:
            raise _BadType
        item_tp = args[0] if args else Any
        out = [_convert(v, item_tp) for v in items]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _BadType
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _BadType
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:
                value = float(value)
            except ValueError:
                raise _BadType from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _BadType
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _BadType from None
        raise _BadType
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `out=123` means the directory "123"
        raise _BadType
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _BadType
    return value


# ---------------------------------------------------------------------------- building
class _Origins:
    """Where each dotted key's value came from: a file, an override or a flag."""

    def __init__(self, default: str = "config"):
        self.default = default
        self.by_key: dict[str, str] = {}

    def set(self, key: str, origin: str, value: Any) -> None:
        self.by_key.pop(key, None)  # keep the order of setting: the last one is the latest layer
        self.by_key[key] = origin
        if isinstance(value, dict):
            for sub, v in value.items():
                self.set(f"{key}.{sub}", origin, v)

    def of(self, key: str) -> str:
        while key:
            if key in self.by_key:
                return self.by_key[key]
            key = key.rpartition(".")[0]
        return self.default

    def latest_in(self, key: str) -> str:
        """The latest layer that set `key` or anything under it (a section checked as a whole)."""
        inside = [o for k, o in self.by_key.items() if k == key or k.startswith(key + ".")]
        return inside[-1] if inside else self.of(key)


def _closest(name: str, valid: list[str]) -> str | None:
    """The likeliest intended field: a transposition ('modle' -> 'model') first, then difflib's best."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    same_letters = [c for c in close if sorted(c) == sorted(name)]
    return (same_letters or close or [None])[0]


def _unknown(names: list[str], valid: list[str]) -> str:
    hints = [m for n in names if (m := _closest(n, valid))]
    hint = f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
    return f"unknown field(s) {names}{hint}"


def _build(cls: type[T], data: dict[str, Any], path: str, origins: _Origins) -> T:
    def at(name: str = "") -> str:
        return f"{path}.{name}" if path and name else path or name

    if not isinstance(data, dict):
        raise ConfigError(f"{origins.of(path)}: {path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        origin = origins.of(at(unknown[0]))
        section = f"{path}: " if path else ""
        valid = f"valid fields{' of ' + path if path else ''}: {sorted(known)}"
        raise ConfigError(f"{origin}: {section}{_unknown(unknown, sorted(known))}; {valid}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_in(hints[name])
        if sub is not None and isinstance(value, dict):
            kwargs[name] = _build(sub, value, at(name), origins)
            continue
        try:
            kwargs[name] = _convert(value, hints[name])
        except _BadType:
            raise ConfigError(
                f"{origins.of(at(name))}: {at(name)}: expected {_type_name(hints[name])}, got {value!r}"
            ) from None
    required = [n for n, f in known.items() if f.default is _MISSING and f.default_factory is _MISSING]
    missing = [n for n in required if n not in kwargs]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ConfigError(f"missing required field(s) {missing}: pass {flags} or set them in --config")
    try:
        return cls(**kwargs)
    except FieldError as exc:  # its message starts with the field's name
        raise ConfigError(f"{origins.latest_in(at(exc.field))}: {path + '.' if path else ''}{exc}") from None
    except (TypeError, ValueError) as exc:
        section = f"{path}: " if path else ""
        raise ConfigError(f"{origins.of(path)}: {section}{exc}") from None


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file (empty file: no fields)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config file must be a mapping of field: value, got {type(data).__name__}"
        )
    return data


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(
    data: dict[str, Any], overrides: list[str], origins: _Origins | None = None
) -> dict[str, Any]:
    """Apply dotted `section.field=value` overrides (values parsed as YAML) to a nested mapping."""
    data = dict(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip() or any(not p for p in key.strip().split(".")):
            raise ConfigError(f"override {item!r}: expected section.field=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: invalid value ({exc})") from None
        _set(data, key, value)
        if origins is not None:
            origins.set(key.strip(), f"override {item!r}", value)
    return data


def load_config(
    cls: type[T],
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    flag_names: dict[str, str] | None = None,
) -> T:
    """The one way configs are built: dataclass defaults < YAML file < dotted overrides < flags.

    flags: dotted field -> value of the command-line flags given (None values are not given);
    flag_names: dotted field -> the flag's spelling, for error messages (default --field-name).
    """
    origins = _Origins(str(yaml_path) if yaml_path else "config")
    data: dict[str, Any] = {}
    if yaml_path:
        data = read_yaml_file(yaml_path)
        for key, value in data.items():
            origins.set(str(key), str(yaml_path), value)
    data = apply_overrides(data, list(overrides or []), origins)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        _set(data, key, value)
        name = (flag_names or {}).get(key) or "--" + key.rpartition(".")[2].replace("_", "-")
        origins.set(key, name, value)
    return _build(cls, data, "", origins)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build nested dataclasses from a mapping; unknown or bad fields are named with their path."""
    return _build(cls, data, "", _Origins(where))


_CLI_ONLY = ("func", "command", "verbose", "config", "overrides", "direction")


def config_from_args(
    cls: type[T],
    args: Any,
    *,
    exclude: Iterable[str] = (),
    rename: dict[str, str] | None = None,
    flag_names: dict[str, str] | None = None,
) -> T:
    """`load_config` for an argparse namespace: `--config` and `overrides` if the command has them,
    and every other attribute as a flag (parsers leave flags not given absent or None, so that the
    dataclass defaults and the YAML file are not overridden by argparse defaults).

    rename: namespace attribute -> dotted config field (e.g. head -> head_type).
    """
    rename = rename or {}
    skip = set(_CLI_ONLY) | set(exclude)
    flags = {rename.get(k, k): v for k, v in vars(args).items() if k not in skip}
    names = {rename.get(k, k): ("--" if len(k) > 1 else "-") + k.replace("_", "-") for k in vars(args)}
    names.update(flag_names or {})
    return load_config(
        cls, getattr(args, "config", None), list(getattr(args, "overrides", None) or []), flags, names
    )


def build_config(cls: type[T], yaml_path: str | Path | None = None, **flags: Any) -> T:
    """`cls` from its defaults, updated by the YAML file, then by `flags` (CLI flags given)."""
    return load_config(cls, yaml_path, [], flags)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)
