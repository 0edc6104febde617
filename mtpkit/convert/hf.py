"""Hugging Face safetensors directories, read as zero-copy views and written shard by shard.

Reading memory-maps each file and hands out `torch.frombuffer` views, so taking a TP slice of a
tensor copies only that slice. Writing flushes a shard as soon as it reaches `max_shard_bytes`.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtpkit.convert.layout import ConvertError

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Files of an HF model directory that are not weights: copied along with converted weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ConvertError(f"{index}: names {missing[0]}, which does not exist in {path}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConvertError(
            f"{path}: no *.safetensors files (and no {INDEX}); is this a Hugging Face model dir?"
        )
    return files


class HFReader:
    """All tensors of an HF directory by name, as read-only views of memory-mapped files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ConvertError(f"{self.path}: no config.json; is this a Hugging Face model dir?")
        self.config = json.loads((self.path / "config.json").read_text())
        self._where: dict[str, tuple[mmap.mmap, dict, int, Path]] = {}
        for f in weight_files(self.path):
            with open(f, "rb") as fh:
                try:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
                except (struct.error, ValueError) as exc:
                    raise ConvertError(f"{f}: not a safetensors file ({exc})") from exc
                mm = (
                    mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(f) > 8 + n else None
                )
            header.pop("__metadata__", None)
            for name, info in header.items():
                if name in self._where:
                    raise ConvertError(f"{f}: tensor {name} also appears in {self._where[name][3]}")
                self._where[name] = (mm, info, 8 + n, f)
        # bitsandbytes 4-bit weights (QLoRA bases): packed uint8 plus `<name>.absmax`, `.quant_map`,
        # `.quant_state.bitsandbytes__nf4`, ... sidecars, as transformers saves them.
        self.quantized: dict[str, list[str]] = {}
        for name in self._where:
            m = re.match(r"^(.+\.weight)\.quant_state\.bitsandbytes__(nf4|fp4)$", name)
            if m:
                w = m.group(1)
                self.quantized[w] = [n for n in self._where if n.startswith(w + ".")]

    def names(self) -> list[str]:
        sidecars = {s for v in self.quantized.values() for s in v}
        return [n for n in self._where if n not in sidecars]

    def shape(self, name: str) -> list[int]:
        return self._where[name][1]["shape"]

    def get(self, name: str) -> torch.Tensor:
        if name in self.quantized:
            return self._dequantize(name)
        return self._view(name)

    def _dequantize(self, name: str) -> torch.Tensor:
        try:
            from bitsandbytes.functional import QuantState, dequantize_4bit
        except ImportError:
            raise ConvertError(
                f"{self.path}: {name} is a bitsandbytes 4-bit (QLoRA) weight; install bitsandbytes to "
                "dequantize it before merging, or convert the unquantized base model instead"
            ) from None
        parts = {n[len(name) + 1 :]: self._view(n).clone() for n in self.quantized[name]}
        state = QuantState.from_dict(parts, device=torch.device("cpu"))
        return dequantize_4bit(self._view(name).clone(), state)

    def _view(self, name: str) -> torch.Tensor:
        mm, info, base, f = self._where[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConvertError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        with warnings.catch_warnings():  # the buffer is read-only; every consumer copies before writing
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(
                mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=base + begin
            )
        return flat.view(info["shape"])


def owned(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor with its own storage (a view would save its whole storage)."""
    if (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ):
        return t
    return t.clone(memory_format=torch.contiguous_format)


class HFWriter:
    """Writes model-0000i-of-0000n.safetensors shards (or model.safetensors) and the index."""

    def __init__(self, path: Path, max_shard_bytes: int = 5 * 2**30):
        self.path, self.max = path, max_shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = owned(t)
        if any(t.data_ptr() == o.data_ptr() for o in self._shard.values()):
            t = t.clone()
        nbytes = t.numel() * t.element_size()
        if self._shard and self._bytes + nbytes > self.max:
            self._flush()
        self._shard[name] = t
        self._bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        name = f"part-{len(self._files):05d}.safetensors"
        save_file(self._shard, str(self.path / name), metadata={"format": "pt"})
        self._files.append((name, list(self._shard)))
        self._shard, self._bytes = {}, 0

    def close(self) -> None:
        if self._shard or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            os.replace(self.path / self._files[0][0], self.path / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.path / tmp, self.path / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.path / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_non_weights(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Config, generation config, tokenizer files, chat template... everything but weights."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != INDEX and f.name not in skip:
            shutil.copy2(f, dst / f.name)
