"""Small pieces every head family shares: attention masks for the target's attention classes,
a frozen-module holder, and the `.weight` / `.bias` view the losses take."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinearView:
    """What `lm_loss` needs of an LM head: a weight [V, H] and an optional bias [V]; `full`, for
    a view of some rows of a larger head (a reduced vocabulary), is that whole head, whose
    softmax gives the rows' unrenormalised probabilities (the LK losses' acceptance needs them)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    full: LinearView | None = None


def attention_mask(allowed: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """An explicit mask [B, 1, Q, K] from `allowed` (bool, True = attend) in the form the target's
    attention implementation takes: boolean for SDPA, additive (0 / dtype min) for eager."""
    if allowed.dim() == 2:
        allowed = allowed[None, None]
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def causal_allowed(q_len: int, past: int, device=None) -> torch.Tensor:
    """[Q, past + Q]: query row r (absolute position past + r) sees keys 0..past + r."""
    rows = torch.arange(q_len, device=device)[:, None] + past
    return torch.arange(past + q_len, device=device)[None, :] <= rows


def init_from_target(module: torch.nn.Module, target) -> None:
    """Initialise every submodule as the target family's fresh layers are initialised."""
    for sub in module.modules():
        target.model._init_weights(sub)


RESIDUAL_WRITES = ("o_proj", "down_proj")  # what a decoder layer adds to its residual stream


@torch.no_grad()
def zero_residual_writes(layer: torch.nn.Module) -> None:
    """Zero a decoder layer's attention `o_proj` and every MLP / expert `down_proj`, so the layer
    starts as the identity (as Medusa's blocks and zero-init residual branches do): the first
    gradients reach those projections, and through them the rest of the layer."""
    found = set()
    for name, p in layer.named_parameters():
        hit = set(name.split(".")) & set(RESIDUAL_WRITES)
        if hit:
            found |= hit
            p.zero_()
    if found != set(RESIDUAL_WRITES):
        raise ValueError(
            f"head.init: passthrough needs a decoder layer with {' and '.join(RESIDUAL_WRITES)} "
            f"projections; {type(layer).__name__} has {sorted(found) or 'neither'}"
        )


@torch.no_grad()
def passthrough_gain(norm: torch.nn.Module, final_norm: torch.nn.Module) -> None:
    """A norm whose input is already the target's final-normed state (its per-channel gains are
    in it) gets one uniform gain, the RMS of the final norm's: the LM head then reads that
    state's direction exactly, at about its scale."""
    norm.weight.fill_(float(final_norm.weight.float().pow(2).mean().sqrt()))


def truncate(cache, keep: int, layer_idx: int = 0) -> None:
    """Roll a `DynamicCache` back to its first `keep` positions (transformers 5: crop(−n) drops n)."""
    extra = int(cache.get_seq_length(layer_idx)) - keep  # a tensor for static caches
    if extra > 0:
        cache.crop(-extra)


class LastRowState:
    """Drafters that condition only on the target's last processed row (h_{N−2})."""

    def start(self, features: torch.Tensor) -> None:
        self.last = features[-1, 0].to(self.dtype)

    commit = start


class LastRowsState:
    """Batch drafters that condition only on each row's last processed row (h_{N−2})."""

    def start(self, features: list[torch.Tensor], width: int) -> None:
        self.commit(features)

    def commit(self, features: list[torch.Tensor]) -> None:
        self.last = torch.stack([f[-1, 0] for f in features]).to(self.dtype)

    def select(self, rows: list[int]) -> None:
        self.last = self.last[torch.tensor(rows, device=self.last.device)]
        self.picks = [self.picks[b] for b in rows]
