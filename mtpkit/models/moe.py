"""DeepSeek-V2/V3 mixture-of-experts layer with static-shape expert dispatch.

One file, read top to bottom:

1. `MoEConfig` - the routing/dispatch knobs, read from a transformers DeepseekV2/V3 config.
2. `route` - the router (fp32): V3 sigmoid + `e_score_correction_bias` (selection only) with
   group-limited top-k (group score = sum of top-2, other groups masked with -inf), V2 softmax with
   `greedy` / `group_limited_greedy` (group score = max); `norm_topk_prob`, `routed_scaling_factor`.
3. Auxiliary losses (`balance_loss`) and V3's aux-loss-free bias update (`update_expert_bias`).
4. Dispatch with static shapes, no `nonzero`, boolean indexing or host sync:
   - dropless: sort the T*K (token, expert) rows by expert, count with scatter_add, run a grouped GEMM
     (`torch._grouped_mm`, or a for-loop custom op where it cannot run), unsort and combine;
   - capacity: a fixed [E, C, H] buffer, rows past an expert's capacity go to a discarded slot.
5. `MoE` - drop-in replacement for transformers' `DeepseekV3MoE` / `DeepseekV2Moe` with the same
   parameter names (fused 3-D experts), `swap_moe` to replace them in a loaded model, and
   `fuse_expert_weights` / `split_expert_weights` for per-expert checkpoint keys.

Expert parallelism plugs in through `MoE.expert_parallel` (see mtpkit/distributed/expert_parallel.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from mtpkit.errors import MtpkitError


class MoEConfigError(MtpkitError):
    pass


TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
DISPATCHES = ("dropless", "capacity")


@dataclass
class MoEConfig:
    hidden_size: int
    intermediate_size: int  # per routed expert (`moe_intermediate_size`)
    num_experts: int
    top_k: int
    scoring: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str = "noaux_tc"  # V3 | V2: "greedy", "group_limited_greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 1
    hidden_act: str = "silu"
    dispatch: str = "dropless"
    capacity_factor: float = 1.25  # capacity dispatch: C = ceil(factor * T * K / E)
    aux_loss_alpha: float = 0.0  # > 0: `MoE.aux_loss` is set in training mode
    seq_aux: bool = True  # balance per sequence (V3) instead of over the whole batch (V2)

    def __post_init__(self):
        if self.topk_method not in TOPK_METHODS:
            raise MoEConfigError(f"MoEConfig.topk_method={self.topk_method!r}; choose from {TOPK_METHODS}")
        if self.scoring not in ("sigmoid", "softmax"):
            raise MoEConfigError(f"MoEConfig.scoring={self.scoring!r}; choose 'sigmoid' or 'softmax'")
        if self.dispatch not in DISPATCHES:
            raise MoEConfigError(f"MoEConfig.dispatch={self.dispatch!r}; choose from {DISPATCHES}")
        if self.num_experts % self.n_group:
            raise MoEConfigError(
                f"MoEConfig: num_experts={self.num_experts} not divisible by n_group={self.n_group}"
            )
        if self.topk_group > self.n_group:
            raise MoEConfigError(f"MoEConfig: topk_group={self.topk_group} > n_group={self.n_group}")

    @classmethod
    def from_hf(cls, config, **overrides) -> MoEConfig:
        """Read a transformers DeepseekV2Config / DeepseekV3Config (overrides win)."""
        v3 = config.model_type == "deepseek_v3"
        topk_method = getattr(config, "topk_method", None) or ("noaux_tc" if v3 else "greedy")
        values = dict(
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            scoring=getattr(config, "scoring_func", None) or ("sigmoid" if v3 else "softmax"),
            topk_method="noaux_tc" if v3 else topk_method,
            n_group=config.n_group or 1,
            topk_group=config.topk_group or 1,
            norm_topk_prob=bool(config.norm_topk_prob),
            routed_scaling_factor=float(config.routed_scaling_factor),
            n_shared_experts=config.n_shared_experts or 0,
            hidden_act=config.hidden_act,
            aux_loss_alpha=float(getattr(config, "aux_loss_alpha", 0.0) or 0.0),
            seq_aux=bool(getattr(config, "seq_aux", True)),
        )
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise MoEConfigError(f"unknown MoEConfig fields {sorted(unknown)}")
        return cls(**{**values, **overrides})


# --------------------------------------------------------------------------- router


def route(
    logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 router logits [T, E] -> (scores [T, E], weights [T, K], expert ids [T, K]).

    The bias (V3 `e_score_correction_bias`) only changes which experts are chosen; the weights are
    gathered from the unbiased scores.
    """
    scores = logits.sigmoid() if cfg.scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0).bool()
        expert_mask = group_mask.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1)
        # -inf, not 0: biased sigmoid scores can be negative, and a 0 would outrank them.
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    indices = choice.topk(cfg.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, weights * cfg.routed_scaling_factor, indices


def tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignment counts [E] (int64) with a static shape (`bincount` would depend on the data)."""
    flat = indices.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, cfg: MoEConfig, batch_size: int = 1
) -> torch.Tensor:
    """alpha * mean over groups of sum_i f_i * P_i (DeepSeek-V2 expert-level / V3 sequence-wise).

    f_i = E / (K * T) * (#assignments to expert i), P_i = mean over tokens of the (for sigmoid
    scoring: per-token normalised) score of expert i; a group is one sequence when `cfg.seq_aux`
    (tokens laid out [batch, seq]) and the whole batch otherwise.
    """
    if cfg.scoring == "sigmoid":
        scores = scores / scores.sum(dim=-1, keepdim=True)
    groups = batch_size if cfg.seq_aux else 1
    scores = scores.view(groups, -1, cfg.num_experts)
    indices = indices.reshape(groups, -1)
    tokens = scores.shape[1]
    counts = torch.zeros(groups, cfg.num_experts, device=scores.device).scatter_add_(
        1, indices, torch.ones_like(indices, dtype=torch.float32)
    )
    f = counts * (cfg.num_experts / (cfg.top_k * tokens))
    return cfg.aux_loss_alpha * (f * scores.mean(dim=1)).sum(dim=1).mean()


@torch.no_grad()
def update_expert_bias(model: nn.Module, gamma: float, group=None) -> int:
    """Aux-loss-free balancing (DeepSeek-V3): bias += gamma * sign(mean load - load) per MoE layer.

    Load is the assignment count accumulated in `MoE.load` since the last update (summed over
    `group`, e.g. the data/expert-parallel ranks, when given); the counters are reset. Returns the
    number of layers updated. Call after `optimizer.step()`.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.gate.e_score_correction_bias is not None]
    for moe in layers:
        load = moe.load.float()
        if group is not None:
            torch.distributed.all_reduce(load, group=group)
        moe.gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))
        moe.load.zero_()
    return len(layers)


# --------------------------------------------------------------------------- grouped GEMM


@torch.library.custom_op("mtpkit::grouped_mm_loop", mutates_args=())
def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Reference grouped GEMM: rows offs[e-1]:offs[e] of x times w[e]. An opaque op, so callers still
    compile with fullgraph=True; the loop bounds are read on the host inside it."""
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


@grouped_mm_loop.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("mtpkit::grouped_mm_loop_backward", mutates_args=())
def grouped_mm_loop_backward(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(w)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(grad[start:end], w[e].T, out=grad_x[start:end])
            torch.mm(x[start:end].T, grad[start:end], out=grad_w[e])
        start = end
    return grad_x, grad_w


@grouped_mm_loop_backward.register_fake
def _(x, w, offs, grad):
    return torch.empty_like(x), torch.empty_like(w)


def _loop_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2])


def _loop_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad_x, grad_w = grouped_mm_loop_backward(x, w, offs, grad.contiguous())
    return grad_x, grad_w, None


grouped_mm_loop.register_autograd(_loop_backward, setup_context=_loop_setup)


def _native_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # Row strides must be multiples of 16 bytes; under torch.compile its meta kernel wants bf16
    # (eager CPU also runs fp32).
    aligned = all(s * x.element_size() % 16 == 0 for s in (x.shape[1], w.shape[1], w.shape[2]))
    return aligned and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling())


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, native: bool = True) -> torch.Tensor:
    """x [N, in] rows sorted by group, w [G, in, out], offs [G] int32 cumulative row ends -> [N, out]."""
    if native and _native_grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    return grouped_mm_loop(x, w, offs)


# --------------------------------------------------------------------------- experts and dispatch


class Experts(nn.Module):
    """Routed experts as 3-D tensors, same layout and names as transformers' DeepseekV3Experts:
    gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]
        self.native_grouped_mm = True  # False forces the for-loop grouped GEMM

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The local expert tensors (expert parallelism stores them as DTensors sharded on dim 0)."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if hasattr(gate_up, "to_local"):
            gate_up, down = gate_up.to_local(), down.to_local()
        return gate_up, down

    def _glu(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by local expert with `counts[e]` rows each -> expert outputs, same order."""
        gate_up, down = self.weights()
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = self._glu(grouped_mm(x, gate_up.transpose(1, 2), offs, self.native_grouped_mm))
        return grouped_mm(h, down.transpose(1, 2), offs, self.native_grouped_mm)

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """[E, C, H] capacity buffer -> [E, C, H] outputs."""
        gate_up, down = self.weights()
        return torch.bmm(self._glu(torch.bmm(x, gate_up.transpose(1, 2))), down.transpose(1, 2))


def sort_by_expert(x: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """Dropless dispatch: (rows [T*K, H] grouped by expert, order [T*K], counts [E]).
    Row r of the result is token order[r] // K; the order is stable (token order within an expert)."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = x.index_select(0, order // indices.shape[1])
    return rows, order, tokens_per_expert(flat, num_experts)


def unsort_and_combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Inverse of `sort_by_expert`: weight each (token, k) output and sum over k -> [T, H]."""
    num_tokens, top_k = weights.shape
    unsorted = torch.zeros_like(y).index_copy(0, order, y).view(num_tokens, top_k, -1)
    return (unsorted * weights.unsqueeze(-1)).sum(dim=1).to(y.dtype)


def expert_capacity(num_tokens: int, cfg: MoEConfig) -> int:
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))


def capacity_slots(
    indices: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot in the flattened [E * C] buffer for every (token, k), and whether it was kept.

    An expert's rows fill its C slots in (token, k) order; later rows past C are dropped and point at
    the extra slot E * C, which is discarded (fully static shapes, no boolean indexing).
    """
    flat = indices.reshape(-1)
    one_hot = F.one_hot(flat, num_experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # rank among this expert's rows
    kept = position < capacity
    slots = torch.where(kept, flat * capacity + position, torch.full_like(flat, num_experts * capacity))
    return slots, kept


def to_capacity_buffer(x: torch.Tensor, slots: torch.Tensor, top_k: int, num_experts: int, capacity: int):
    """Tokens [T, H] -> [E, C, H] buffer (empty slots are zeros)."""
    buffer = x.new_zeros(num_experts * capacity + 1, x.shape[1])
    rows = x.repeat_interleave(top_k, dim=0)
    return buffer.index_add(0, slots, rows)[:-1].view(num_experts, capacity, -1)


def from_capacity_buffer(y: torch.Tensor, slots: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor):
    """[E, C, H] outputs -> [T, H]: gather each (token, k) slot, zero the dropped ones, weight, sum."""
    num_tokens, top_k = weights.shape
    flat = torch.cat([y.reshape(-1, y.shape[-1]), y.new_zeros(1, y.shape[-1])])
    rows = flat.index_select(0, slots).view(num_tokens, top_k, -1)
    scale = (weights * kept.view(num_tokens, top_k)).unsqueeze(-1)
    return (rows * scale).sum(dim=1).to(y.dtype)


def dropless_moe(x, weights, indices, experts: Experts, num_experts: int) -> torch.Tensor:
    rows, order, counts = sort_by_expert(x, indices, num_experts)
    return unsort_and_combine(experts.grouped(rows, counts), order, weights)


def capacity_moe(x, weights, indices, experts: Experts, num_experts: int, capacity: int):
    """-> (output [T, H], number of dropped (token, k) rows as a tensor)."""
    slots, kept = capacity_slots(indices, num_experts, capacity)
    buffer = to_capacity_buffer(x, slots, indices.shape[1], num_experts, capacity)
    out = from_capacity_buffer(experts.batched(buffer), slots, kept, weights)
    return out, (~kept).sum()


# --------------------------------------------------------------------------- layer


class Router(nn.Module):
    """Router parameters (fp32), named like transformers' DeepseekV3TopkRouter."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        bias = torch.zeros(cfg.num_experts, dtype=torch.float32) if cfg.topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class MLP(nn.Module):
    """SwiGLU MLP with transformers' names (shared experts, dense layers)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts + shared experts; same state-dict keys as transformers' DeepseekV3MoE.

    forward(hidden [..., H]) -> [..., H]. In training mode it also sets `self.aux_loss` (when
    `aux_loss_alpha > 0`; add it to the loss) and accumulates assignment counts in the `load`
    buffer for `update_expert_bias`. `self.dropped` holds the capacity path's dropped-row count.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.intermediate_size * cfg.n_shared_experts, cfg.hidden_act)
            if cfg.n_shared_experts
            else None
        )
        self.register_buffer("load", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)
        self.expert_parallel = None  # set by mtpkit.distributed.expert_parallel.apply_expert_parallel
        self.aux_loss: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = hidden.reshape(-1, hidden.shape[-1])
        scores, weights, indices = route(self.gate(x), cfg, self.gate.e_score_correction_bias)
        if self.training:
            self.load += tokens_per_expert(indices, cfg.num_experts).detach()
            if cfg.aux_loss_alpha > 0:
                batch = hidden.shape[0] if hidden.dim() == 3 else 1
                self.aux_loss = balance_loss(scores, indices, cfg, batch)
        if cfg.dispatch == "capacity":
            capacity = expert_capacity(x.shape[0], cfg)
            if self.expert_parallel is not None:
                routed, self.dropped = self.expert_parallel.capacity(
                    x, weights, indices, self.experts, capacity
                )
            else:
                routed, self.dropped = capacity_moe(
                    x, weights, indices, self.experts, cfg.num_experts, capacity
                )
        elif self.expert_parallel is not None:
            routed = self.expert_parallel.dropless(x, weights, indices, self.experts)
        else:
            routed = dropless_moe(x, weights, indices, self.experts, cfg.num_experts)
        out = routed.view(hidden.shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out


# --------------------------------------------------------------------------- loading


HF_MOE_CLASSES = ("DeepseekV3MoE", "DeepseekV2Moe")


def swap_moe(model: nn.Module, **overrides) -> int:
    """Replace every transformers DeepseekV2/V3 MoE block in `model` by `MoE` with the same weights.

    `overrides` set MoEConfig fields (e.g. dispatch="capacity"). Returns the number of blocks swapped.
    """
    cfg = MoEConfig.from_hf(model.config, **overrides)
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ in HF_MOE_CLASSES]
    for name, old in targets:
        ref = next(old.parameters())
        new = MoE(cfg).to(device=ref.device, dtype=ref.dtype)
        new.gate.float()  # router stays fp32, like transformers' _keep_in_fp32_modules_strict
        new.load_state_dict(old.state_dict())
        new.train(old.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return len(targets)


_PER_EXPERT = re.compile(r"^(.*\.)?experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_expert_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint keys (`...experts.{j}.{gate,up,down}_proj.weight`, the released
    DeepSeek layout) -> fused `...experts.gate_up_proj` [E, 2F, H] / `...experts.down_proj` [E, H, F].
    Other keys pass through; an already fused dict is returned unchanged."""
    out, per_expert = {}, {}
    for key, value in state_dict.items():
        match = _PER_EXPERT.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, j, proj = match.group(1) or "", int(match.group(2)), match.group(3)
        per_expert.setdefault(prefix, {}).setdefault(j, {})[proj] = value
    for prefix, experts in per_expert.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(len(experts[j]) != 3 for j in ids):
            raise MoEConfigError(f"{prefix}experts.*: expected gate/up/down for experts 0..{len(ids) - 1}")
        out[f"{prefix}experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[j]["gate_proj"], experts[j]["up_proj"]]) for j in ids]
        )
        out[f"{prefix}experts.down_proj"] = torch.stack([experts[j]["down_proj"] for j in ids])
    return out


def split_expert_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `fuse_expert_weights`."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for j, w in enumerate(value):
                gate, up = w.chunk(2)
                out[f"{prefix}{j}.gate_proj.weight"] = gate.clone()
                out[f"{prefix}{j}.up_proj.weight"] = up.clone()
        elif key.endswith("experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for j, w in enumerate(value):
                out[f"{prefix}{j}.down_proj.weight"] = w.clone()
        else:
            out[key] = value
    return out
