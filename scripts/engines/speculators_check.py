"""Runs inside the speculators side venv (speculators 0.9, transformers 5.0-5.19): never imports mtpkit.

python speculators_check.py load EXPORT_DIR INPUTS.safetensors OUT_DIR
    SpeculatorModel.from_pretrained(EXPORT_DIR) (config validation included), then writes
    OUT_DIR/report.json: the class, missing / unexpected keys against the checkpoint, the
    tensors that differ from the file, the resolved config fields; and OUT_DIR/logits.safetensors:
    the draft logits of each TTT step of `Eagle3DraftModel.forward` on INPUTS (input_ids
    [1, T], hidden_states [1, T, 3H]), captured at lm_head.
python speculators_check.py convert VLLM_EAGLE3_DIR BASE_MODEL_DIR OUT_DIR LAYER_IDS
    speculators' own Eagle3Converter on a vllm-eagle3 export (LAYER_IDS comma-separated);
    OUT_DIR/converted holds its checkpoint, OUT_DIR/report.json its config fields.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors |= load_file(str(file))
    return tensors


def _config_fields(config) -> dict:
    layer = config.transformer_layer_config
    rope = getattr(layer, "rope_parameters", None) or {}
    return {
        "draft_vocab_size": config.draft_vocab_size,
        "target_vocab_size": layer.vocab_size,
        "norm_before_residual": config.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": config.eagle_aux_hidden_state_layer_ids,
        "rope_theta": rope.get("rope_theta", getattr(layer, "rope_theta", None)),
        "num_hidden_layers": layer.num_hidden_layers,
        "hidden_size": layer.hidden_size,
        "verifier": config.speculators_config.verifier.model_dump(),
        "speculative_tokens": config.speculators_config.proposal_methods[0].speculative_tokens,
    }


def load(export_dir: Path, inputs_file: Path, out: Path) -> None:
    from speculators import SpeculatorModel, SpeculatorModelConfig

    config = SpeculatorModelConfig.from_pretrained(export_dir)  # pydantic validation of our config
    # Eager attention: flex attention's block masks need torch.compile on this CPU-only machine.
    config.transformer_layer_config._attn_implementation = "eager"
    model = SpeculatorModel.from_pretrained(export_dir, config=config).eval()
    file = _checkpoint(export_dir)
    state = model.state_dict()
    differ = sorted(k for k in file if k in state and not torch.equal(state[k].to(file[k].dtype), file[k]))
    nan_params = sorted(k for k, v in state.items() if v.is_floating_point() and torch.isnan(v).any())
    report = {
        "speculators_version": importlib.metadata.version("speculators"),
        "class": type(model).__name__,
        "missing": sorted(set(state) - set(file)),
        "unexpected": sorted(set(file) - set(state)),
        "differ": differ,
        "nan_params": nan_params,  # speculators initialises lm_head / embed_tokens to NaN
        "config": _config_fields(model.config),
    }
    inputs = load_file(str(inputs_file))
    steps = int(inputs["ttt_steps"].item())
    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, o: captured.append(o.detach().clone()))
    with torch.no_grad():
        drafts = model(
            hidden_states=inputs["hidden_states"],
            input_ids=inputs["input_ids"],
            document_ids=torch.zeros_like(inputs["input_ids"]),
            ttt_steps=steps,
        )
    hook.remove()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"logits.{s}": captured[s] for s in range(steps)}
    tensors |= {f"drafts.{s}": drafts[s] for s in range(steps)}
    save_file(tensors, str(out / "logits.safetensors"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def convert(eagle3_dir: Path, base_model: Path, out: Path, layer_ids: list[int]) -> None:
    from speculators import SpeculatorModelConfig
    from speculators.convert.eagle import Eagle3Converter

    converted = out / "converted"
    Eagle3Converter().convert(
        eagle3_dir,
        converted,
        base_model=str(base_model),
        validate=True,
        norm_before_residual=json.loads((eagle3_dir / "config.json").read_text())["norm_before_residual"],
        eagle_aux_hidden_state_layer_ids=layer_ids,
    )
    config = SpeculatorModelConfig.from_pretrained(converted)
    report = {"config": _config_fields(config), "keys": sorted(_checkpoint(converted))}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "load":
        load(Path(args[0]), Path(args[1]), Path(args[2]))
    elif mode == "convert":
        convert(Path(args[0]), Path(args[1]), Path(args[2]), [int(i) for i in args[3].split(",")])
    else:
        raise SystemExit(f"unknown mode {mode!r}: load or convert")
