"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    run/checkpoints/step-000100/
      state/                head + optimizer state, sharded by torch.distributed.checkpoint
                            (one file per rank; resumable at any world size, see mtpkit.distributed)
      head.json             head family, config and target identity (gathered by `consolidate_head`)
      trainer.pt            LR scheduler, torch and Python RNG states
      trainer_state.json    step, data position, metrics so far
      trainable.safetensors joint training (`mtpkit sft` / `rl`, one process): the trained model
                            weights; head + optimizer then go to head.safetensors + optimizer.pt, not state/
    run/checkpoints/latest  name of the newest complete checkpoint

Each checkpoint is written to a temporary directory and renamed; `latest` is updated after
the rename, so a crash leaves the previous checkpoint as the one resumed from. Under torchrun
every rank writes its shards into the same directory (multi-node runs need a shared
filesystem for `out`); rank 0 writes the rest and renames.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mtpkit.distributed.checkpoint import HEAD_META, STATE, head_meta, load_state, save_state
from mtpkit.errors import MtpkitError
from mtpkit.heads import HeadError, check_target

LATEST = "latest"
TRAINABLE = "trainable.safetensors"
JOINT_HEAD = "head.safetensors"
JOINT_OPTIMIZER = "optimizer.pt"


class CheckpointError(MtpkitError, RuntimeError):
    pass


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def save_checkpoint(
    run: Path,
    step: int,
    head,
    target,
    optimizer,
    scheduler,
    state: dict,
    keep: int = 2,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    root = checkpoint_dir(run)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp"
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if tensors is None:
        save_state(tmp / STATE, head, optimizer)  # collective: every rank writes its shards
    _barrier()
    if main:
        (tmp / HEAD_META).write_text(json.dumps(head_meta(head, target), indent=2) + "\n")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save({"scheduler": scheduler.state_dict(), **rng}, tmp / "trainer.pt")
        if tensors is not None:
            # Joint training's optimizer also holds model parameters, which DCP would key through
            # the head; it runs in one process, so plain files keep head, optimizer and model.
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, tmp / JOINT_HEAD)
            torch.save({"optimizer": optimizer.state_dict()}, tmp / JOINT_OPTIMIZER)
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / TRAINABLE)
        (tmp / "trainer_state.json").write_text(json.dumps(dict(state, step=step), indent=1))
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / (LATEST + ".tmp")
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / LATEST)
        # Keep the newest `keep` checkpoints.
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / name


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(run: Path) -> Path | None:
    pointer = checkpoint_dir(run) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: names {path.name}, which does not exist")
    return path


def checkpoint_problem(path: Path) -> str | None:
    """What is missing or truncated in a checkpoint (None: every file it needs is whole), read from
    the DCP metadata's shard sizes without loading any tensor."""
    needed = [HEAD_META, "trainer.pt", "trainer_state.json"]
    if not (path / JOINT_OPTIMIZER).is_file():
        needed.append(f"{STATE}/.metadata")
    for name in needed:
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"{path / name}: missing or empty"
    if (path / JOINT_OPTIMIZER).is_file():
        return None
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.FileSystemReader(str(path / STATE)).read_metadata()
    except Exception as exc:
        return f"{path / STATE / '.metadata'}: unreadable ({type(exc).__name__}: {exc})"
    ends: dict[str, int] = {}
    for info in meta.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = path / STATE / name
        size = shard.stat().st_size if shard.is_file() else None
        if size is None:
            return f"shard {shard}: missing"
        if size < end:
            return f"shard {shard}: truncated ({size} bytes; the metadata records {end})"
    return None


def last_good_checkpoint(run: Path, before: Path | None = None) -> Path | None:
    """The newest checkpoint of `run` (older than `before`) whose files are all whole."""
    for ckpt in sorted((p for p in checkpoint_dir(run).glob("step-*") if p.is_dir()), reverse=True):
        if (before is None or ckpt.name < before.name) and checkpoint_problem(ckpt) is None:
            return ckpt
    return None


def _resume_hint(path: Path) -> str:
    good = last_good_checkpoint(path.parent.parent, before=path)
    pointer = path.parent / LATEST
    if good is None:
        return f"nothing was overwritten; no older whole checkpoint in {path.parent} — start a new run"
    return (
        f"nothing was overwritten; the last good checkpoint is {good} — resume from it with "
        f"`echo {good.name} > {pointer}` and --resume, or start a new run"
    )


def check_checkpoint(path: Path) -> None:
    """Refuse a checkpoint with a missing or truncated file, naming it and the last good checkpoint."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: corrupt or incomplete checkpoint ({problem}); {_resume_hint(path)}")


def load_checkpoint(path: Path, head, target, optimizer, scheduler) -> dict:
    """Restore head, optimizer, scheduler and RNG from `path`; return the trainer state."""
    from torch.distributed.checkpoint.api import CheckpointException

    check_checkpoint(path)
    try:
        meta = json.loads((path / HEAD_META).read_text())
        check_target(meta, target, str(path))
        extra = torch.load(path / "trainer.pt", weights_only=False)
        state = json.loads((path / "trainer_state.json").read_text())
        if (path / JOINT_OPTIMIZER).is_file():  # joint training (see save_checkpoint)
            from safetensors.torch import load_file

            head.load_state_dict(load_file(str(path / JOINT_HEAD)))
            optimizer.load_state_dict(torch.load(path / JOINT_OPTIMIZER, weights_only=False)["optimizer"])
        else:
            load_state(path / STATE, head, optimizer)  # collective, any world size
        scheduler.load_state_dict(extra["scheduler"])
    except HeadError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, CheckpointException):  # the per-rank errors, not DCP's traceback dump
            detail = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in exc.failures.items())
        raise CheckpointError(
            f"{path}: corrupt or incomplete checkpoint ({detail.splitlines()[0] if detail else ''}); "
            f"{_resume_hint(path)}"
        ) from None
    torch.set_rng_state(extra["torch"])
    random.setstate(extra["python"])
    return state


__all__ = ["CheckpointError", "check_checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
