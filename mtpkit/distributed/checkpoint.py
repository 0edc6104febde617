"""Sharded training state with torch.distributed.checkpoint (DCP), and its export to one head file.

Every rank writes its own shards of the head and optimizer state (`__<rank>_0.distcp`) plus
rank 0 the global `.metadata`; loading reads whichever pieces this rank's shards need, so a
checkpoint saved by N processes resumes on M (DCP reshards by the recorded global shapes).
A single process (no process group) reads and writes the same format.

`consolidate_head` turns the model part of a checkpoint into mtpkit's native head directory
(config.json + model.safetensors, what `save_head` writes) without building the head or loading
the target: the tensors are read by name and shape from the DCP metadata.

    python -m mtpkit.distributed.checkpoint RUN/checkpoints/step-000100 OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mtpkit.errors import MtpkitError

STATE = "state"  # the DCP directory inside a checkpoint
HEAD_META = "head.json"  # head family, config and target identity (config.json of the export)


class ExportError(MtpkitError, ValueError):
    pass


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _quiet():
    """DCP warns that it runs in a single process even when told so (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_state(path: Path, head: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of head + optimizer state under `path`."""
    model_sd, optim_sd = get_state_dict(head, optimizer)
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), no_dist=_no_dist())


def load_state(path: Path, head: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: fill this rank's head and optimizer shards from a checkpoint of any world size."""
    model_sd, optim_sd = get_state_dict(head, optimizer)  # the layout to fill (this rank's shards)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=_no_dist())
    set_state_dict(head, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def head_meta(head: nn.Module, target) -> dict:
    from dataclasses import asdict

    return {"head_type": head.head_type, "head_config": asdict(head.cfg), "target": target.identity()}


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The head's full tensors from a DCP directory (any world size), read in this process."""
    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata()
    state = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    with _quiet():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key.removeprefix("model."): t for key, t in state.items()}


@dataclass
class _SavedHead:
    """What `save_head` reads from a head: its family, config and tensors."""

    head_type: str
    cfg: object
    tensors: dict

    def state_dict(self) -> dict:
        return self.tensors


def consolidate_head(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's head as a native head directory (loadable by `load_head`, `mtpkit eval`)."""
    from mtpkit.heads import head_config, save_head

    checkpoint = Path(checkpoint)
    meta_file = checkpoint / HEAD_META
    if not meta_file.is_file() or not (checkpoint / STATE / ".metadata").is_file():
        raise ExportError(f"{checkpoint}: not an mtpkit checkpoint (needs {HEAD_META} and {STATE}/.metadata)")
    meta = json.loads(meta_file.read_text())
    saved = _SavedHead(
        meta["head_type"],
        head_config(meta["head_type"], meta["head_config"]),
        read_model_tensors(checkpoint / STATE),
    )
    target = SimpleNamespace(identity=lambda: meta["target"])
    return save_head(saved, out, target)


@dataclass
class CheckpointExportConfig:
    checkpoint: str  # RUN/checkpoints/step-NNNNNN
    out: str  # head directory to write


def main(argv: list[str] | None = None) -> int:
    from mtpkit.config import config_from_args

    p = argparse.ArgumentParser(
        prog="python -m mtpkit.distributed.checkpoint",
        description="Export a (sharded) training checkpoint to one head directory.",
    )
    p.add_argument("checkpoint", help="RUN/checkpoints/step-NNNNNN")
    p.add_argument("out", help="head directory to write (config.json + model.safetensors)")
    try:
        cfg = config_from_args(CheckpointExportConfig, p.parse_args(argv))
        print(consolidate_head(cfg.checkpoint, cfg.out))
    except (MtpkitError, OSError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
