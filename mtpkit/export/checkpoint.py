"""Reading Hugging Face safetensors checkpoints one tensor at a time.

A DeepSeek-V3 checkpoint is 163 shards and 671B parameters; import and export only ever need
a few layers of it, so nothing here loads a whole shard: `model.safetensors.index.json` says
which file holds a key and `safe_open` reads just that tensor. A missing or truncated shard is
reported by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from mtpkit.errors import MtpkitError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FP8_BLOCK = 128  # DeepSeek-V3's weight_scale_inv covers 128 x 128 blocks


class CheckpointError(MtpkitError, ValueError):
    """A checkpoint directory that cannot be read; the message names the file."""


class ShardedCheckpoint:
    """Key → tensor access over a (possibly sharded) safetensors directory, reading lazily."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index = self.root / INDEX
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
        elif (self.root / SINGLE).is_file():
            self.weight_map = dict.fromkeys(self._open(SINGLE).keys(), SINGLE)
        else:
            raise CheckpointError(f"{self.root}: no {INDEX} or {SINGLE} (not a safetensors checkpoint)")
        self._handles: dict[str, object] = {}

    def _open(self, filename: str):
        path = self.root / filename
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {INDEX} is missing")
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # truncated header, wrong magic, ...
            raise CheckpointError(f"{path}: unreadable safetensors shard ({exc})") from exc

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def get(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.root}: no tensor {key!r}")
        filename = self.weight_map[key]
        if filename not in self._handles:
            self._handles[filename] = self._open(filename)
        try:
            return self._handles[filename].get_tensor(key)
        except Exception as exc:  # a shard cut short reads fine up to the missing bytes
            raise CheckpointError(f"{self.root / filename}: cannot read {key!r} ({exc})") from exc

    def get_dequantized(self, key: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The tensor, with FP8 block quantisation (a sibling `weight_scale_inv`) undone."""
        tensor = self.get(key)
        scale_key = key.removesuffix("weight") + "weight_scale_inv"
        if key.endswith("weight") and scale_key in self.weight_map:
            return dequantize_fp8_blocks(tensor, self.get(scale_key), dtype)
        if tensor.element_size() == 1 and tensor.is_floating_point():
            raise CheckpointError(
                f"{self.root}: {key!r} is {tensor.dtype} without a {scale_key!r}; only DeepSeek-style "
                "128x128 block-scaled FP8 is supported"
            )
        return tensor


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """DeepSeek-V3 FP8: block (i, j) of 128 x 128 values is stored as w / s; multiply s back.

    `scale_inv` has shape [ceil(rows/128), ceil(cols/128)] (the name is DeepSeek's: it is the
    inverse of the quantisation scale, i.e. the factor that restores the value).
    """
    rows, cols = weight.shape
    want = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight "
            f"in {FP8_BLOCK}x{FP8_BLOCK} blocks (expected {want})"
        )
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return (weight.float() * scale[:rows, :cols]).to(dtype)
