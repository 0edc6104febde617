"""DTensor tensor-parallel plans for transformers' DeepseekV2/V3 models, applied outside model code.

- MLA attention: q_b_proj (or q_proj without a q LoRA rank) and kv_b_proj column-parallel, so each
  rank owns num_heads / tp heads; o_proj row-parallel (all-reduce). q_a_proj, kv_a_proj_with_mqa
  and their norms stay replicated (the latents are small and shared by all heads). The rotary key
  slice of kv_a_proj_with_mqa's output feeds the local heads directly, not through a parallel
  linear, so its gradient is only a partial sum over local heads: `RopeKeyGradAllReduce` all-reduces
  it in backward (the kv latent part is already reduced by kv_b_proj's column-parallel input).
- Dense MLPs and shared experts: gate/up column-parallel, down row-parallel.
- Routed experts are left alone: shard them with expert parallelism (expert_parallel.py) on
  another mesh dimension, or keep them replicated.
- Vocab-parallel embedding (row-parallel over the vocabulary, all-reduce) and LM head
  (column-parallel over the vocabulary, logits all-gathered to every rank).

The attention code reshapes with `-1` heads, so it runs unchanged on the local heads.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import all_reduce
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from mtpkit.errors import MtpkitError


class TensorParallelError(MtpkitError):
    pass


class _AllReduceInBackward(torch.autograd.Function):
    """Identity forward, sum over the tensor-parallel group backward (Megatron's "copy to region")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), "sum", ctx.group), None


class RopeKeyGradAllReduce(ParallelStyle):
    """For kv_a_proj_with_mqa (replicated): all-reduce the gradient of the trailing rotary-key columns."""

    def __init__(self, rope_dim: int):
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group, rope = device_mesh.get_group(), self.rope_dim

        def hook(_module, _args, out):
            return torch.cat([out[..., :-rope], _AllReduceInBackward.apply(out[..., -rope:], group)], dim=-1)

        module.register_forward_hook(hook)
        return module


def mla_plan(prefix: str, attn: nn.Module) -> dict:
    q = "q_proj" if getattr(attn, "q_proj", None) is not None else "q_b_proj"
    return {
        f"{prefix}.{q}": ColwiseParallel(),
        f"{prefix}.kv_a_proj_with_mqa": RopeKeyGradAllReduce(attn.qk_rope_head_dim),
        f"{prefix}.kv_b_proj": ColwiseParallel(),
        f"{prefix}.o_proj": RowwiseParallel(),
    }


def mlp_plan(prefix: str) -> dict:
    return {
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": RowwiseParallel(),
    }


def deepseek_tp_plan(model: nn.Module, tp: int) -> dict:
    """The `parallelize_module` plan for a DeepseekV2/V3ForCausalLM (or its inner model), with the
    divisibility checks that would otherwise fail deep inside DTensor."""
    config = model.config
    if config.num_attention_heads % tp:
        raise TensorParallelError(
            f"num_attention_heads={config.num_attention_heads} not divisible by tp={tp}"
        )
    if config.vocab_size % tp:
        raise TensorParallelError(f"vocab_size={config.vocab_size} not divisible by tp={tp}")
    base = model.model if hasattr(model, "lm_head") else model
    prefix = "model." if base is not model else ""
    plan = {f"{prefix}embed_tokens": RowwiseParallel(input_layouts=Replicate())}
    for i, layer in enumerate(base.layers):
        name = f"{prefix}layers.{i}"
        plan.update(mla_plan(f"{name}.self_attn", layer.self_attn))
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):  # dense layer
            plan.update(mlp_plan(f"{name}.mlp"))
        elif getattr(mlp, "shared_experts", None) is not None:
            plan.update(mlp_plan(f"{name}.mlp.shared_experts"))
    if hasattr(model, "lm_head"):
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def apply_deepseek_tp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `mesh` (1-D, or a mesh with a dimension named "tp")."""
    if mesh.ndim > 1:
        if mesh.mesh_dim_names is None or "tp" not in mesh.mesh_dim_names:
            raise TensorParallelError(f"device mesh {mesh.mesh_dim_names} has no 'tp' dimension")
        mesh = mesh["tp"]
    return parallelize_module(model, mesh, deepseek_tp_plan(model, mesh.size()))
