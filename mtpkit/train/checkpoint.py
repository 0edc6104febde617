"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    run/checkpoints/step-000100/
      head/                 native head directory (config.json + model.safetensors)
      optimizer.pt          optimizer + LR scheduler state
      trainer_state.json    step, data position, metrics so far
      rng.pt                torch and Python RNG states
      trainable.safetensors the trained model weights, when the model is trained too (joint training)
    run/checkpoints/latest  name of the newest complete checkpoint

Each checkpoint is written to a temporary directory and renamed; `latest` is updated after
the rename, so a crash leaves the previous checkpoint as the one resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from mtpkit.errors import MtpkitError
from mtpkit.heads import HeadError, check_target, read_head_config, save_head

LATEST = "latest"
TRAINABLE = "trainable.safetensors"


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
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_head(head, tmp / "head", target)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
    )
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    if tensors:
        from safetensors.torch import save_file

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
    return final


def latest_checkpoint(run: Path) -> Path | None:
    pointer = checkpoint_dir(run) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: names {path.name}, which does not exist")
    return path


def load_checkpoint(path: Path, head, target, optimizer, scheduler) -> dict:
    """Restore head, optimizer, scheduler and RNG from `path`; return the trainer state."""
    try:
        meta = read_head_config(path / "head")
        check_target(meta, target, str(path / "head"))
        from safetensors.torch import load_file

        head.load_state_dict(load_file(str(path / "head" / "model.safetensors")))
        opt = torch.load(path / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        rng = torch.load(path / "rng.pt", weights_only=False)
        state = json.loads((path / "trainer_state.json").read_text())
    except HeadError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path}: corrupt or incomplete checkpoint ({type(exc).__name__}: {exc}); nothing was overwritten — "
            f"point {path.parent / LATEST} at an older checkpoint or start a new run"
        ) from exc
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state


__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
