"""Expert and tensor parallelism for DeepSeek MoE/MLA on gloo: every sharded run must match the
single-process model (forward outputs and gradients). One spawn per world size keeps this fast."""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mtpkit.distributed.deepseek_tp import apply_deepseek_tp
from mtpkit.distributed.expert_parallel import apply_expert_parallel
from mtpkit.models.moe import MoE, MoEConfig, capacity_moe, expert_capacity, route, swap_moe

TOL = dict(rtol=1e-4, atol=1e-5)


def assert_grad_close(got: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """fp32 reduction order differs between layouts; gradients reach ~1e2, so scale atol."""
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()), msg=name)


def _spawn(world: int, checks: list[str], tmp_path) -> None:
    mp.spawn(_worker, args=(world, checks, str(tmp_path / "store")), nprocs=world, join=True)


def _worker(rank: int, world: int, checks: list[str], store: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for name in checks:
            globals()[name](rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


def _exit_cleanly() -> None:
    """Every check passed (a failure raised above, which spawn reports). Skip interpreter teardown:
    gloo's worker threads sometimes abort there ("terminate called without an active exception",
    seen about once in ten runs on 2 loaded cores), failing a run whose checks all passed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _seeded(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _moe(num_experts=8, **changes) -> MoE:
    cfg = MoEConfig(
        hidden_size=32, intermediate_size=16, num_experts=num_experts, top_k=2, n_group=4, topk_group=2
    )
    torch.manual_seed(0)
    moe = MoE(replace(cfg, **changes)).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
        moe.gate.e_score_correction_bias.normal_(std=0.2)
    return moe


# --------------------------------------------------------------------------- checks (run in workers)


def check_all_to_all_grad(rank, world):
    """Uneven all_to_all_single_autograd: d(loss)/d(input) is the reverse exchange of d(loss)/d(output)."""
    send = [rank + j + 1 for j in range(world)]  # rank r sends r+j+1 rows to rank j
    recv = [r + rank + 1 for r in range(world)]
    x = _seeded(sum(send), 4, seed=rank).requires_grad_()
    y = all_to_all_single_autograd(x, recv, send, dist.group.WORLD)
    g = _seeded(sum(recv), 4, seed=100 + rank)
    (y * g).sum().backward()
    expected = torch.empty_like(x)
    dist.all_to_all_single(expected, g, send, recv)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
    # forward: the rows from rank r arrive in rank order
    first_from_0 = _seeded(sum(j + 1 for j in range(world)), 4, seed=0)
    offset = sum(0 + j + 1 for j in range(rank))
    torch.testing.assert_close(y[: recv[0]].detach(), first_from_0[offset : offset + recv[0]])


def _check_ep_layer(rank, world, dispatch):
    tokens = 24
    reference = _moe(dispatch=dispatch, capacity_factor=float(world * 4))
    x_all = _seeded(world * tokens, 32, seed=1)
    g_all = _seeded(world * tokens, 32, seed=2)
    (reference(x_all) * g_all).sum().backward()
    ref_out = reference(x_all).detach()

    ep = copy.deepcopy(reference)
    ep.zero_grad()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    assert apply_expert_parallel(ep, mesh) == 1
    local = ep.cfg.num_experts // world
    assert _local(ep.experts.down_proj).shape[0] == local
    mine = slice(rank * tokens, (rank + 1) * tokens)
    out = ep(x_all[mine])
    torch.testing.assert_close(out, ref_out[mine], **TOL)
    (out * g_all[mine]).sum().backward()
    experts = slice(rank * local, (rank + 1) * local)  # global id = ep_rank * E_local + j
    for name in ("gate_up_proj", "down_proj"):
        got = _local(getattr(ep.experts, name).grad)
        assert_grad_close(got, getattr(reference.experts, name).grad[experts], name)
    for name, p in ep.named_parameters():  # replicated parameters: data-parallel sum
        if "experts." in name and "shared" not in name:
            continue
        dist.all_reduce(p.grad)
        assert_grad_close(p.grad, reference.get_parameter(name).grad, name)


def check_ep_dropless(rank, world):
    _check_ep_layer(rank, world, "dropless")


def check_ep_capacity(rank, world):
    _check_ep_layer(rank, world, "capacity")


def check_ep_capacity_drops(rank, world):
    """With a tight capacity each rank drops exactly what the single-device capacity path drops
    for its own tokens (capacity is per source rank and expert)."""
    moe = _moe(dispatch="capacity", capacity_factor=0.5)
    x = _seeded(16, 32, seed=10 + rank)
    _, weights, indices = route(moe.gate(x), moe.cfg, moe.gate.e_score_correction_bias)
    capacity = expert_capacity(16, moe.cfg)
    expected, dropped = capacity_moe(x, weights, indices, moe.experts, moe.cfg.num_experts, capacity)
    assert dropped > 0
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    apply_expert_parallel(moe, mesh)
    out = moe(x) - moe.shared_experts(x)
    torch.testing.assert_close(out, expected, **TOL)
    assert moe.dropped == dropped


def _tiny_model():
    from helpers import tiny_v3  # tests/ is on sys.path (pytest rootdir insertion, inherited by spawn)

    model = tiny_v3()
    swap_moe(model)
    return model


def _check_model(rank, world, mesh, data_rank: int, data_size: int):
    """Full tiny DeepSeek-V3 under TP and/or EP vs the unsharded model on the whole batch."""
    reference = _tiny_model()
    ids = torch.randint(0, 320, (2 * data_size, 12), generator=torch.Generator().manual_seed(3))
    target = _seeded(*ids.shape, 320, seed=4)
    (reference(ids).logits * target).sum().backward()
    ref_logits = reference(ids).logits.detach()

    model = copy.deepcopy(reference)
    model.zero_grad()
    names = mesh.mesh_dim_names
    if "tp" in names:
        apply_deepseek_tp(model, mesh)
        assert isinstance(model.model.layers[0].self_attn.q_b_proj.weight, DTensor)
        assert isinstance(model.model.layers[1].mlp.shared_experts.down_proj.weight, DTensor)
    if "ep" in names:
        assert apply_expert_parallel(model, mesh) == 2
    mine = slice(2 * data_rank, 2 * data_rank + 2)
    logits = model(ids[mine]).logits
    torch.testing.assert_close(_full(logits), ref_logits[mine], **TOL)
    (_full(logits) * target[mine]).sum().backward()

    ep_group = mesh["ep"].get_group() if "ep" in names else None
    local = 8 // data_size
    for name, p in model.named_parameters():
        ref = reference.get_parameter(name).grad
        if ".experts." in name and "shared" not in name and ep_group is not None:
            assert_grad_close(_local(p.grad), ref[data_rank * local : (data_rank + 1) * local], name)
            continue
        grad = _full(p.grad).clone()
        if ep_group is not None:  # data-parallel over the ep ranks
            dist.all_reduce(grad, group=ep_group)
        assert_grad_close(grad, ref, name)


def check_tp_model(rank, world):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    _check_model(rank, world, mesh, data_rank=0, data_size=1)


def check_ep_model(rank, world):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    _check_model(rank, world, mesh, data_rank=rank, data_size=world)


def check_ep_tp_model(rank, world):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "tp"))
    _check_model(rank, world, mesh, data_rank=mesh.get_local_rank("ep"), data_size=2)


# --------------------------------------------------------------------------- tests


def test_world_2(tmp_path):
    _spawn(
        2,
        [
            "check_all_to_all_grad",
            "check_ep_dropless",
            "check_ep_capacity",
            "check_ep_capacity_drops",
            "check_tp_model",
            "check_ep_model",
        ],
        tmp_path,
    )


def test_world_4(tmp_path):
    _spawn(
        4, ["check_all_to_all_grad", "check_ep_dropless", "check_ep_capacity", "check_ep_tp_model"], tmp_path
    )
