"""The process group and the (dp, tp) device mesh, from torchrun's environment.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python`
run sees none of them and gets a single-process `Parallel` that makes every collective below a
no-op, so the trainer has one code path. Ranks are laid out dp-major: rank = dp_rank * tp + tp_rank,
so the tp ranks of a group are neighbours (on one node when tp <= GPUs per node).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from mtpkit.config import check_fields, checked
from mtpkit.errors import MtpkitError

log = logging.getLogger(__name__)

DATA_PARALLEL = ("fsdp", "replicate")


class DistributedError(MtpkitError, RuntimeError):
    pass


@dataclass
class DistributedConfig:
    tp: int = 1  # tensor-parallel degree of the frozen target (online mode); dp = world size / tp
    data_parallel: str = "fsdp"  # fsdp (FSDP2 fully_shard) | replicate (gradients all-reduced)
    backend: str = "auto"  # auto = nccl when CUDA is available, else gloo
    timeout_s: int = checked(1800, gt=0)  # a collective waiting longer fails the run instead of hanging it

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"distributed.tp must be >= 1, got {self.tp}")
        if self.data_parallel not in DATA_PARALLEL:
            raise ValueError(f"distributed.data_parallel must be one of {DATA_PARALLEL}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"distributed.backend must be auto, nccl or gloo, got {self.backend!r}")
        check_fields(self)


@dataclass
class Parallel:
    """Where this process sits: rank, world, device and the (dp, tp) mesh (None when alone)."""

    cfg: DistributedConfig = field(default_factory=DistributedConfig)
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh with dims ("dp", "tp")
    owns_group: bool = False  # this object started the process group (and ends it in `close`)
    _head_mesh: object | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def tp(self) -> int:
        return self.cfg.tp if self.enabled else 1

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def head_mesh(self):
        """A 1-D mesh of every rank: the head is sharded over all of them, tp ranks included.

        The tp ranks of a group train on the same data, so their gradients are equal and the
        average over all ranks is the average over dp groups; sharding over the whole world
        divides the head's memory by the world size rather than by dp alone.
        """
        from torch.distributed.device_mesh import DeviceMesh

        if self._head_mesh is None:
            self._head_mesh = DeviceMesh.from_group(
                dist.group.WORLD, self.device.type, mesh_dim_names=("world",)
            )
        return self._head_mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """Sum each value over the data-parallel ranks (tp ranks of a group hold the same data)."""
        if self.dp == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.mesh["dp"].get_group())
        return dict(zip(keys, t.tolist(), strict=True))

    def to_device(self, batch):
        """A dataclass of tensors (a training `Batch`) on this rank's device."""
        if self.device.type == "cpu":
            return batch
        moved = {
            f.name: getattr(batch, f.name).to(self.device, non_blocking=True)
            for f in dataclasses.fields(batch)
        }
        return dataclasses.replace(batch, **moved)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def init_parallel(cfg: DistributedConfig | None = None) -> Parallel:
    """Join (or start) the process group torchrun describes and build the (dp, tp) mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    cfg = cfg or DistributedConfig()
    if dist.is_initialized():
        world, rank, owns = dist.get_world_size(), dist.get_rank(), False
    else:
        world, rank, owns = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), True
    local_rank = _env_int("LOCAL_RANK", 0)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistributedError("distributed.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if world == 1:
        if cfg.tp > 1:
            log.warning("distributed.tp=%d ignored: a single process runs the whole target", cfg.tp)
        return Parallel(cfg, device=device)
    if world % cfg.tp:
        raise DistributedError(f"world size {world} is not a multiple of distributed.tp={cfg.tp}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owns:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DistributedError(f"WORLD_SIZE={world} but {var} is unset: launch with torchrun")
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    mesh = init_device_mesh(device.type, (world // cfg.tp, cfg.tp), mesh_dim_names=("dp", "tp"))
    if rank == 0:
        log.info("%d processes (%s): dp=%d x tp=%d", world, backend, world // cfg.tp, cfg.tp)
    else:  # one console: other ranks report only problems
        logging.getLogger("mtpkit").setLevel(logging.WARNING)
    return Parallel(cfg, rank, world, device, mesh, owns)
