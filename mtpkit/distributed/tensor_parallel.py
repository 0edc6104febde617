"""Tensor parallelism for the frozen target: per-family Colwise/Rowwise plans for its decoder layers.

Megatron's split: q/k/v and gate/up projections are sharded by output features (ColwiseParallel,
each rank holds whole attention heads / a slice of the MLP), o_proj and down_proj by input
features (RowwiseParallel, whose outputs are all-reduced). Every decoder layer thus returns
the full hidden state on every tp rank, and nothing outside the layers changes: the embedding,
final norm and LM head stay whole, because the head shares them with the target and reads the
LM head's weight directly in its chunked loss. The head's training is unchanged by the split.

Plans come from mtpkit's table (`LAYER_PLANS`, keyed by transformers' model_type) or else from
the family's own `base_model_tp_plan` when it uses only colwise/rowwise entries.

`load_parallel_target` never holds the whole model: it builds it on the meta device, splits it,
allocates only this rank's shards and reads just those slices from the safetensors files
(torch.distributed.checkpoint's HuggingFaceStorageReader).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from mtpkit.distributed.mesh import DistributedError, Parallel

log = logging.getLogger(__name__)

_ATTENTION = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise"}
_ATTENTION["self_attn.o_proj"] = "rowwise"
_MLP = {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}
_STYLES: dict[str, Callable[[], ParallelStyle]] = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def dense_plan(config, tp: int) -> dict[str, str]:
    """Llama-style layer (GQA attention + gated MLP): shard what divides evenly by `tp`.

    Attention is split by whole heads, so it stays replicated (with a warning) when the query or
    key/value head count is not a multiple of tp — SmolLM2-135M has 9 and 3 heads.
    """
    plan: dict[str, str] = {}
    heads, kv = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    if heads % tp == 0 and kv % tp == 0:
        plan.update(_ATTENTION)
    else:
        log.warning("tp=%d does not divide %d query / %d kv heads: attention stays replicated", tp, heads, kv)
    if config.intermediate_size % tp == 0:
        plan.update(_MLP)
    else:
        log.warning(
            "tp=%d does not divide intermediate_size=%d: MLP stays replicated", tp, config.intermediate_size
        )
    return plan


# model_type -> plan builder (other modules, e.g. MoE families, add their own entries here).
LAYER_PLANS: dict[str, Callable[[object, int], dict[str, str]]] = {
    "llama": dense_plan,
    "qwen2": dense_plan,
    "mistral": dense_plan,
}


def hf_layer_plan(config) -> dict[str, str] | None:
    """transformers' `base_model_tp_plan` restricted to decoder layers, if it is plain colwise/rowwise."""
    plan = getattr(config, "base_model_tp_plan", None) or {}
    layer = {k.removeprefix("layers.*."): v for k, v in plan.items() if k.startswith("layers.*.")}
    if not layer or any(v not in _STYLES for v in layer.values()):
        return None
    return layer


def layer_plan(config, tp: int) -> dict[str, str]:
    """The plan for one decoder layer of `config`'s family: submodule name -> colwise | rowwise."""
    if config.model_type in LAYER_PLANS:
        return LAYER_PLANS[config.model_type](config, tp)
    plan = hf_layer_plan(config)
    if plan is None:
        raise DistributedError(
            f"no tensor-parallel plan for model_type {config.model_type!r} (mtpkit has "
            f"{sorted(LAYER_PLANS)}; transformers' tp_plan is missing or uses styles other than "
            "colwise/rowwise): run with distributed.tp=1"
        )
    return plan


def _split_layers(model, par: Parallel) -> None:
    plan = layer_plan(model.config, par.tp)
    styles = {name: _STYLES[style]() for name, style in plan.items()}
    layers = model.get_decoder().layers
    for layer in layers:
        parallelize_module(layer, par.mesh["tp"], styles)
    if par.is_main:
        log.info("target: %d decoder layers split tp=%d (%s)", len(layers), par.tp, sorted(plan))


def parallelize_target(target, par: Parallel):
    """Move a loaded target to this rank's device and split its decoder layers over the tp ranks."""
    target.identity()  # fingerprint the whole weights once, before they are split
    target.model.to(par.device)
    if par.tp > 1:
        _split_layers(target.model, par)
    return target


def _weights_dir(spec: str) -> Path | None:
    """The safetensors HF directory a spec loads from, or None (tiny targets, .bin weights)."""
    from mtpkit.models.loader import resolve_target

    path = resolve_target(spec).hf_dir()
    if path is not None and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    return None


class _Gathered:
    """The model as `weights_fingerprint` reads it: full tensors, gathered one at a time."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def state_dict(self):
        return self

    def items(self):
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def load_parallel_target(spec: str, par: Parallel):
    """The frozen target for this rank: only its shards when tp > 1 and the weights are safetensors.

    Same model, identity and outputs as `parallelize_target(load_target(spec), par)`, without
    ever holding the whole model in one process.
    """
    from mtpkit.models import Target, load_target

    path = _weights_dir(str(spec)) if par.tp > 1 else None
    if path is None:
        return parallelize_target(load_target(spec), par)
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _split_layers(model, par)
    model.to_empty(device=par.device)
    stored: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            stored.update(f.keys())
    state = model.state_dict()
    tied = {k for k in state if k not in stored}
    if tied - {"lm_head.weight"} or (tied and not config.tie_word_embeddings):
        raise DistributedError(f"{path}: weights missing from the safetensors files: {sorted(tied)}")
    reader = dcp.HuggingFaceStorageReader(str(path))
    dcp.load({k: v for k, v in state.items() if k in stored}, storage_reader=reader)
    model.tie_weights()
    backbone = model.get_decoder()  # rotary tables are computed, not stored: rebuild them
    backbone.rotary_emb = type(backbone.rotary_emb)(config=config).to(par.device)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    identity = Target(model=_Gathered(model), tokenizer=tokenizer, name=str(spec)).identity()
    return Target(model=model, tokenizer=tokenizer, name=str(spec), _identity=identity)
