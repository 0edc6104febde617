"""torch.distributed.checkpoint (DCP) directories with HF tensor names: mtpkit's own sharded format.

DCP stores each tensor with its global shape and reshards on load, so a DCP checkpoint has no TP/PP
layout of its own: any mesh loads it (`dcp.load` into DTensors), and this module reads it back one
tensor at a time. Writing is one `dcp.save` call over the whole state dict; from an HF source the
tensors are memory-mapped views, so only what is being written is resident.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from mtpkit.convert.hf import copy_non_weights
from mtpkit.convert.layout import ConvertError, model_shape
from mtpkit.convert.megatron import HF_META, META

DCP_METADATA = ".metadata"


def is_dcp(path: str | Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def write_dcp(
    get: Callable[[str], torch.Tensor], names: list[str], out: Path, config: dict, hf_meta: Path | None
) -> int:
    state = {n: get(n) for n in names}
    with warnings.catch_warnings():  # "no process group": a single-process save is what we want
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out)))
    (out / META).write_text(json.dumps({"format": "dcp", "hf_config": config}, indent=1) + "\n")
    if hf_meta is not None:
        (out / HF_META).mkdir()
        copy_non_weights(hf_meta, out / HF_META)
    return sum(t.numel() * t.element_size() for t in state.values())


class DCPSource:
    def __init__(self, path: str | Path, hf_config: str | Path | None = None):
        self.path = Path(path)
        meta = json.loads((self.path / META).read_text()) if (self.path / META).is_file() else {}
        if hf_config is not None:
            p = Path(hf_config)
            self.config = json.loads((p / "config.json" if p.is_dir() else p).read_text())
            self.hf_meta = p if p.is_dir() else p.parent
        elif "hf_config" in meta:
            self.config = meta["hf_config"]
            self.hf_meta = self.path / HF_META if (self.path / HF_META).is_dir() else None
        else:
            raise ConvertError(f"{self.path}: DCP checkpoint without {META}; pass --hf-config")
        self.shape = model_shape(self.config, "hf config")
        self.reader = dcp.FileSystemReader(str(self.path))
        self._meta = self.reader.read_metadata().state_dict_metadata
        n = 0
        while f"model.layers.{self.shape.num_layers + n}.eh_proj.weight" in self._meta:
            n += 1
        self.mtp_num_layers = n

    def names(self) -> list[str]:
        return list(self._meta)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._meta:
            raise ConvertError(f"{self.path}: DCP checkpoint has no tensor {name}")
        md = self._meta[name]
        out = {name: torch.empty(md.size, dtype=md.properties.dtype)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(out, storage_reader=self.reader)
        return out[name]
