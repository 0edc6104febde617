"""Expert parallelism for `mtpkit.models.moe.MoE` over the `ep` dimension of a device mesh.

Each of the `ep` ranks keeps E_local = E / ep experts (global expert id = ep_rank * E_local + j) as
DTensors sharded on dim 0, and routes its own tokens. Tokens travel to the rank holding their
expert and back with `all_to_all_single_autograd`, so gradients flow through both exchanges:

- dropless: rows sorted by global expert are sent with uneven splits (one host sync for the split
  sizes, as in torchtitan / Megatron), regrouped by local expert, run through the grouped GEMM and
  returned;
- capacity: the [E, C, H] buffer is exchanged with equal splits ([ep, E_local * C, H] per rank),
  fully static.

Parameters other than the experts stay replicated: their gradients must be reduced over the ep
ranks like any data-parallel gradient (FSDP/DDP does that).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from mtpkit.errors import MtpkitError
from mtpkit.models.moe import (
    Experts,
    MoE,
    capacity_slots,
    from_capacity_buffer,
    sort_by_expert,
    to_capacity_buffer,
    unsort_and_combine,
)


class ExpertParallelError(MtpkitError):
    pass


def _wait(t: torch.Tensor) -> torch.Tensor:
    # Functional collectives return AsyncCollectiveTensor; make the result a plain tensor.
    return t.wait() if hasattr(t, "wait") else t


class ExpertParallel:
    """The dispatch/combine used by `MoE.forward` once its experts are sharded over `mesh`."""

    def __init__(self, mesh: DeviceMesh, num_experts: int):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.size = mesh.size()
        self.rank = mesh.get_local_rank()
        if num_experts % self.size:
            raise ExpertParallelError(
                f"num_experts={num_experts} is not divisible by the ep size {self.size}"
            )
        self.num_experts = num_experts
        self.local = num_experts // self.size

    def dropless(self, x, weights, indices, experts: Experts) -> torch.Tensor:
        rows, order, counts = sort_by_expert(x, indices, self.num_experts)
        # received[r, j] = rows that rank r sends to my local expert j
        received = _wait(all_to_all_single(counts, None, None, self.group)).view(self.size, self.local)
        send_splits = counts.view(self.size, self.local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        inbound = _wait(all_to_all_single_autograd(rows, recv_splits, send_splits, self.group))
        # Inbound rows are grouped (source rank, local expert); the grouped GEMM wants (expert, rank).
        keys = (
            torch.arange(self.local, device=x.device)
            .mul(self.size)
            .add(torch.arange(self.size, device=x.device).unsqueeze(1))
        )
        regroup = torch.argsort(torch.repeat_interleave(keys.reshape(-1), received.reshape(-1)), stable=True)
        out = experts.grouped(inbound.index_select(0, regroup), received.sum(0))
        out = torch.zeros_like(out).index_copy(0, regroup, out)
        outbound = _wait(all_to_all_single_autograd(out, send_splits, recv_splits, self.group))
        return unsort_and_combine(outbound, order, weights)

    def capacity(self, x, weights, indices, experts: Experts, capacity: int):
        slots, kept = capacity_slots(indices, self.num_experts, capacity)
        buffer = to_capacity_buffer(x, slots, indices.shape[1], self.num_experts, capacity)
        # [E, C, H] = [ep, E_local, C, H]: chunk r goes to rank r; what comes back from rank r is
        # its tokens for my experts -> [E_local, ep * C, H].
        inbound = _wait(all_to_all_single_autograd(buffer.reshape(-1).contiguous(), None, None, self.group))
        inbound = inbound.view(self.size, self.local, capacity, -1).transpose(0, 1)
        out = experts.batched(inbound.reshape(self.local, self.size * capacity, -1))
        out = out.view(self.local, self.size, capacity, -1).transpose(0, 1).reshape(-1)
        outbound = _wait(all_to_all_single_autograd(out.contiguous(), None, None, self.group))
        out = from_capacity_buffer(outbound.view(self.num_experts, capacity, -1), slots, kept, weights)
        return out, (~kept).sum()


def _ep_mesh(mesh: DeviceMesh) -> DeviceMesh:
    if mesh.ndim == 1:
        return mesh
    if mesh.mesh_dim_names is None or "ep" not in mesh.mesh_dim_names:
        raise ExpertParallelError(f"device mesh {mesh.mesh_dim_names} has no 'ep' dimension")
    return mesh["ep"]


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> int:
    """Shard the experts of every `MoE` in `model` over the ep dimension of `mesh` (a 1-D mesh, or
    one with a dimension named "ep"). Expert weights must be identical on all ranks (they are
    distributed from rank 0 of the ep group). Returns the number of layers sharded."""
    ep_mesh = _ep_mesh(mesh)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        moe.expert_parallel = ExpertParallel(ep_mesh, moe.cfg.num_experts)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(moe.experts, name)
            sharded = distribute_tensor(full.detach(), ep_mesh, [Shard(0)])
            setattr(moe.experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
    return len(layers)
