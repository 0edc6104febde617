"""Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`) as a corpus source.

Megatron-LM's `tools/preprocess_data.py` writes already-tokenized text in the MMapIndexedDataset
layout (megatron/core/datasets/indexed_dataset.py, `_IndexWriter`):

    PREFIX.idx  b"MMIDIDX\\x00\\x00"  version <Q (= 1)  dtype code <B
                sequence count <Q  document count <Q
                sequence_lengths int32 [S]   tokens per sequence
                sequence_pointers int64 [S]  byte offset of each sequence in .bin
                document_indices int64 [D]   sequence boundaries: document i = sequences
                                             document_indices[i] .. document_indices[i+1]-1
                (sequence_modes int8 [S]: multimodal datasets only, not read here)
    PREFIX.bin  the tokens of every sequence, back to back, in the .idx dtype

A document (one JSON line given to preprocess_data; its sentences are separate sequences with
--split-sentences) is read back as the concatenation of its sequences; its EOD token, if
--append-eod was given, is already the last token. The ids must come from the target's
tokenizer: a Megatron corpus is only a valid source for the model family it was tokenized for.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtpkit.data.prompts import PromptFormatError

HEADER = b"MMIDIDX\x00\x00"
DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_INTEGER = {1, 2, 3, 4, 5, 8}


@dataclass
class TokenDocument:
    """A corpus document that is already token ids (corpus mode windows it without tokenizing)."""

    ids: np.ndarray
    source: str


def megatron_prefix(spec: str | Path) -> Path | None:
    """The dataset prefix if `spec` names a Megatron dataset (PREFIX, PREFIX.bin or PREFIX.idx
    with both files present), else None."""
    p = Path(spec).expanduser()
    prefix = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    if prefix.with_suffix(".idx").is_file() and prefix.with_suffix(".bin").is_file():
        return prefix
    if p.suffix in (".bin", ".idx"):
        other = prefix.with_suffix(".idx" if p.suffix == ".bin" else ".bin")
        if p.is_file():
            raise PromptFormatError(f"{p}: Megatron indexed dataset without its {other.name}")
    return None


def fingerprint(prefix: Path) -> str:
    """What a collect job key hashes: the whole index, and the data file's size and ends (the
    index fixes every sequence's length and offset; reading a multi-GB .bin in full is not needed)."""
    h = hashlib.sha256(prefix.with_suffix(".idx").read_bytes())
    data = prefix.with_suffix(".bin")
    size = data.stat().st_size
    with open(data, "rb") as f:
        h.update(str(size).encode() + f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def read_index(prefix: Path) -> tuple[type, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence_lengths, sequence_pointers, document_indices) of PREFIX.idx, checked."""
    path = prefix.with_suffix(".idx")
    raw = path.read_bytes()
    fixed = len(HEADER) + 8 + 1 + 8 + 8
    if len(raw) < fixed or raw[: len(HEADER)] != HEADER:
        raise PromptFormatError(f"{path}: not a Megatron indexed dataset index (bad header)")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, len(HEADER))
    if version != 1:
        raise PromptFormatError(f"{path}: index version {version} unsupported (need 1)")
    if code not in _INTEGER:
        raise PromptFormatError(f"{path}: token dtype code {code} is not an integer type")
    need = fixed + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if len(raw) < need:
        raise PromptFormatError(f"{path}: truncated index ({len(raw)} bytes, header promises {need})")
    lengths = np.frombuffer(raw, np.int32, n_seq, fixed)
    pointers = np.frombuffer(raw, np.int64, n_seq, fixed + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, fixed + 12 * n_seq)
    if n_doc == 0 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
        raise PromptFormatError(f"{path}: document_indices do not partition the {n_seq} sequences")
    return DTYPES[code], lengths, pointers, docs


def load_megatron(prefix: Path, vocab_size: int | None = None) -> list[TokenDocument]:
    """Every document of the dataset, in order, as token ids (memory-mapped, copied per document)."""
    dtype, lengths, pointers, docs = read_index(prefix)
    data_path = prefix.with_suffix(".bin")
    itemsize = np.dtype(dtype).itemsize
    size = data_path.stat().st_size
    ends = pointers + lengths.astype(np.int64) * itemsize
    if len(ends) and ends.max() > size:
        raise PromptFormatError(f"{data_path}: shorter ({size} bytes) than its index says ({ends.max()})")
    data = np.memmap(data_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    out = []
    for d in range(len(docs) - 1):
        parts = [
            np.frombuffer(data, dtype, int(lengths[s]), int(pointers[s])) for s in range(docs[d], docs[d + 1])
        ]
        ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if vocab_size is not None and len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise PromptFormatError(
                f"{data_path}: document {d} holds token id {int(ids.max())} outside the target's "
                f"vocabulary of {vocab_size}: was it tokenized with this target's tokenizer?"
            )
        out.append(TokenDocument(ids, f"{prefix}#{d}"))
    return out
