"""Data parallelism for the head: FSDP2 (`fully_shard`) with a mixed-precision policy, or replication.

FSDP2 shards parameters, gradients and optimizer state over every rank (`Parallel.head_mesh`). Each
decoder layer inside the head (a transformers `GradientCheckpointingLayer`, the bulk of the
parameters) is its own unit, all-gathered just before it runs and freed after; the small rest
(norms, eh_proj) is the root unit, whole for the duration of forward and backward. That needs
every layer to run once per forward: in repeated-layer mode (MTP train_depths > num_depths), or
for a head whose config does not say, a layer may run several times, which crashes torch 2.13's
FSDP2 in backward (SIGSEGV, seen on gloo/CPU), so there the whole head is one unit: gradients
and optimizer state stay sharded, parameters are whole only during forward and backward.

`replicate` keeps a full copy per rank and all-reduces gradients once per step: less
communication for heads small enough to copy (benchmarks/distributed_scaling.py measures both).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from mtpkit.distributed.mesh import Parallel


def shard_head(head: nn.Module, par: Parallel, precision: str) -> nn.Module:
    """Place the head on this rank's device and shard (or replicate) it over all ranks.

    All ranks, not only the dp ranks: see `Parallel.head_mesh`.
    """
    head.to(par.device)
    if not par.enabled:
        return head
    if par.cfg.data_parallel == "replicate":
        for tensor in list(head.parameters()) + list(head.buffers()):  # identical start everywhere
            dist.broadcast(tensor.data, src=0)
        return head
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
    )
    if not _reuses_layers(head):
        for module in head.modules():
            if isinstance(module, GradientCheckpointingLayer):
                fully_shard(module, mesh=par.head_mesh, mp_policy=mp)
    fully_shard(head, mesh=par.head_mesh, mp_policy=mp)
    register_fsdp_forward_method(head, "forward_train")  # the trainer's entry point, not forward()
    return head


def _reuses_layers(head: nn.Module) -> bool:
    """Whether one training forward may run a layer twice (MTP's repeated-layer mode, or unknown)."""
    cfg = head.cfg
    if not hasattr(cfg, "train_depths") or not hasattr(cfg, "num_depths"):
        return True
    return cfg.train_depths > cfg.num_depths


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, par: Parallel) -> float:
    """Synchronise gradients where FSDP does not, clip them, and return the global norm."""
    if par.enabled and par.cfg.data_parallel == "replicate":
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)  # gloo has no AVG
        flat /= par.world
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the head mesh
        norm = norm.full_tensor()
    return float(norm)
