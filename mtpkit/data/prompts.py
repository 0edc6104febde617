"""Prompt and corpus sources: JSONL in the common formats, local Parquet/JSON/CSV, plain text.

Every record is turned into a `Prompt` (user turns + optional system message) for generation
mode, or into a `Document` (raw text) for corpus mode. The format is detected per record;
`record_format` forces one and `text_field` selects a field by name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mtpkit.errors import MtpkitError

log = logging.getLogger(__name__)

BUILTIN = "builtin"  # `--prompts builtin` (8 prompts) or `builtin:NAME` (mtpkit/data/builtin/NAME.jsonl)

# Detection order matters: the first format whose field a record has wins.
FORMATS = ("sharegpt", "messages", "turns", "self_instruct", "alpaca", "question", "prompt", "text")
_FORMAT_FIELDS = {
    "sharegpt": "conversations",
    "messages": "messages",
    "turns": "turns",
    "self_instruct": "instances",
    "alpaca": "instruction",
    "question": "question",
    "prompt": "prompt",
    "text": "text",
}
_DATASETS_SUFFIXES = {".parquet": "parquet", ".json": "json", ".csv": "csv", ".tsv": "csv"}
_TEXT_SUFFIXES = {".txt", ".md"}
USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot", "chatgpt"}


class PromptFormatError(MtpkitError, ValueError):
    """A record or file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    turns: tuple[str, ...]  # user messages, in order; assistant answers are regenerated
    system: str | None
    source: str  # "path:line" (or ":instance" for self-instruct), for provenance and errors


@dataclass(frozen=True)
class Document:
    text: str
    source: str


def _field_hint() -> str:
    return "select one with --format {" + ",".join(FORMATS) + "} or --text-field NAME"


def _detect(record: dict, where: str, record_format: str | None, text_field: str | None) -> str:
    if text_field is not None:
        if text_field not in record:
            raise PromptFormatError(
                f"{where}: no field {text_field!r} (--text-field); the record has fields {sorted(record)}"
            )
        return "field"
    if record_format is not None:
        needed = _FORMAT_FIELDS[record_format]
        if needed not in record:
            raise PromptFormatError(
                f"{where}: --format {record_format} needs field {needed!r}; the record has fields {sorted(record)}"
            )
        return record_format
    for fmt in FORMATS:
        if fmt == "self_instruct" and "instruction" not in record:
            continue
        if _FORMAT_FIELDS[fmt] in record:
            return fmt
    raise PromptFormatError(
        f"{where}: no recognisable prompt field; the record has fields {sorted(record)}; {_field_hint()}"
    )


def _str(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise PromptFormatError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _chat_turns(messages, where: str, name: str) -> tuple[tuple[str, ...], str | None]:
    """User turns and system message of a ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) list."""
    if not isinstance(messages, list):
        raise PromptFormatError(f"{where}: field {name!r} must be a list of messages")
    turns, system = [], None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PromptFormatError(f"{where}: {name}[{i}] must be an object")
        role = msg.get("from", msg.get("role"))
        content = msg.get("value", msg.get("content"))
        if role is None or content is None:
            raise PromptFormatError(
                f"{where}: {name}[{i}] needs from/value or role/content, has {sorted(msg)}"
            )
        role = str(role).lower()
        if role == "system":
            system = _str(content, where, f"{name}[{i}]")
        elif role in USER_ROLES:
            turns.append(_str(content, where, f"{name}[{i}]"))
        elif role not in ASSISTANT_ROLES:
            raise PromptFormatError(f"{where}: {name}[{i}] has unknown role {role!r}")
    return tuple(turns), system


def _join(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def record_prompts(
    record: dict, where: str, record_format: str | None = None, text_field: str | None = None
) -> list[Prompt]:
    """The prompts one record yields (self-instruct: one per instance; others: one)."""
    if not isinstance(record, dict):
        raise PromptFormatError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    fmt = _detect(record, where, record_format, text_field)
    system = None
    if fmt == "field":
        value = record[text_field]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            turns, system = _chat_turns(value, where, text_field)
        elif isinstance(value, list):
            turns = tuple(_str(v, where, text_field) for v in value)
        else:
            turns = (_str(value, where, text_field),)
    elif fmt in ("sharegpt", "messages"):
        turns, system = _chat_turns(record[_FORMAT_FIELDS[fmt]], where, _FORMAT_FIELDS[fmt])
    elif fmt == "turns":
        value = record["turns"]
        if not isinstance(value, list):
            raise PromptFormatError(f"{where}: field 'turns' must be a list of strings")
        turns = tuple(_str(v, where, "turns") for v in value)
    elif fmt == "self_instruct":
        instruction = _str(record["instruction"], where, "instruction")
        instances = record["instances"] or [{"input": ""}]
        if not isinstance(instances, list):
            raise PromptFormatError(f"{where}: field 'instances' must be a list")
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise PromptFormatError(
                    f'{where}: instances[{i}] must be an object such as {{"input": "..."}}, '
                    f"got {type(inst).__name__} {inst!r}"
                )
        return [
            Prompt(
                (_join(instruction, _str(inst.get("input", ""), where, "instances[].input")),),
                None,
                f"{where}:{i}",
            )
            for i, inst in enumerate(instances)
        ]
    elif fmt == "alpaca":
        instruction = _str(record["instruction"], where, "instruction")
        turns = (_join(instruction, _str(record.get("input") or "", where, "input")),)
    else:  # question / prompt / text: one string
        turns = (_str(record[_FORMAT_FIELDS[fmt]], where, _FORMAT_FIELDS[fmt]),)
    turns = tuple(t for t in turns if t.strip())
    if not turns:
        raise PromptFormatError(f"{where}: the record has no non-empty user turn")
    return [Prompt(turns, system, where)]


def iter_records(path: Path, skip_bad: bool) -> Iterator[tuple[dict, str]]:
    """(record, "path:line") for JSONL, or "path:row N" for files read through HF datasets."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for lineno, line in _text_lines(path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as exc:
                msg = f"{where}: malformed JSON ({exc.msg} at column {exc.colno})"
                if not skip_bad:
                    raise PromptFormatError(msg + "; pass --skip-bad to skip such lines") from exc
                log.warning("skipping %s", msg)
    elif suffix in _DATASETS_SUFFIXES:
        # HF datasets reads Parquet/JSON/CSV locally; never a hub (the path is a local file).
        import datasets

        try:
            ds = datasets.load_dataset(
                _DATASETS_SUFFIXES[suffix],
                data_files=str(path),
                split="train",
                **({"delimiter": "\t"} if suffix == ".tsv" else {}),
            )
        except Exception as exc:
            raise PromptFormatError(
                f"{path}: cannot read as {suffix[1:]} ({type(exc).__name__}: {exc})"
            ) from exc
        for i, row in enumerate(ds):
            yield row, f"{path}:row {i + 1}"
    else:
        raise PromptFormatError(
            f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, .csv, .tsv, .txt, .md)"
        )


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; a byte that is not UTF-8 is named with its line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptFormatError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None


def _read_text(path: Path) -> str:
    return "".join(line for _, line in _text_lines(path))


def no_prompts_error(paths, what: str = "prompts") -> PromptFormatError:
    """A source list that yields nothing: refused before any store or report is written."""
    names = ", ".join(str(p) for p in paths)
    return PromptFormatError(f"{names}: no {what} (the files are empty, blank or every record was skipped)")


def resolve_source(path: str | Path) -> Path:
    name = str(path)
    if name == BUILTIN or name.startswith(BUILTIN + ":"):
        stem = name.partition(":")[2] or "prompts"
        builtin = Path(str(resources.files("mtpkit.data") / "builtin"))
        found = builtin / f"{stem}.jsonl"
        if not found.is_file():
            names = sorted(f"{BUILTIN}:{p.stem}" for p in builtin.glob("*.jsonl"))
            raise PromptFormatError(f"unknown built-in prompt set {name!r}; available: {', '.join(names)}")
        return found
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptFormatError(f"{p}: prompt file not found")
    return p


def load_prompts(
    paths: list[str | Path],
    record_format: str | None = None,
    text_field: str | None = None,
    skip_bad: bool = False,
) -> list[Prompt]:
    """All prompts of the given files, in file order. Text files: one prompt per non-empty line."""
    prompts: list[Prompt] = []
    for raw in paths:
        path = resolve_source(raw)
        if path.suffix.lower() in _TEXT_SUFFIXES:
            prompts += [
                Prompt((ln.strip(),), None, f"{path}:{i}") for i, ln in _text_lines(path) if ln.strip()
            ]
            continue
        for record, where in iter_records(path, skip_bad):
            try:
                prompts += record_prompts(record, where, record_format, text_field)
            except PromptFormatError as exc:
                if not skip_bad:
                    raise
                log.warning("skipping %s", exc)
    return prompts


def load_documents(
    paths: list[str | Path],
    record_format: str | None = None,
    text_field: str | None = None,
    skip_bad: bool = False,
) -> list[Document]:
    """Raw texts for corpus mode. Text files are one document each; records give their text
    field (`text`, or `text_field`), else their prompt turns joined by blank lines."""
    docs: list[Document] = []
    for raw in paths:
        path = resolve_source(raw)
        if path.suffix.lower() in _TEXT_SUFFIXES:
            docs.append(Document(_read_text(path), str(path)))
            continue
        for record, where in iter_records(path, skip_bad):
            try:
                if not isinstance(record, dict):
                    raise PromptFormatError(
                        f"{where}: a record must be a JSON object, got {type(record).__name__}"
                    )
                if text_field is None and record_format is None and isinstance(record.get("text"), str):
                    text = record["text"]
                else:
                    text = "\n\n".join(
                        "\n\n".join(p.turns) for p in record_prompts(record, where, record_format, text_field)
                    )
            except PromptFormatError as exc:
                if not skip_bad:
                    raise
                log.warning("skipping %s", exc)
                continue
            if text.strip():
                docs.append(Document(text, where))
    return docs
