"""Megatron-core's legacy per-rank checkpoint layout ("--ckpt-format torch"):

    root/latest_checkpointed_iteration.txt          "1" (or "release")
    root/iter_0000001/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt

The pp part is present when PP > 1 and the ep part when EP > 1. Each file is a torch.save'd dict
{"model": state_dict, "checkpoint_version": 3.0, "iteration": N, "args": Namespace}. mtpkit adds
`mtpkit_convert.json` (layout + HF config) and `hf_meta/` (tokenizer etc.) beside the tracker file;
Megatron ignores both, and reading a checkpoint without them works from flags and the rank files.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch

from mtpkit.convert.layout import ConvertError

TRACKER = "latest_checkpointed_iteration.txt"
META = "mtpkit_convert.json"
HF_META = "hf_meta"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")

# Other spellings of the same tensors in MindSpeed-LLM releases, read as the names mtpkit writes.
_ALIASES = [
    (re.compile(r"^mtp_layers\.(\d+)\."), r"mtp.layers.\1."),
    (re.compile(r"^mtp\.final_layernorms\.(\d+)\.weight$"), r"mtp.layers.\1.final_layernorm.weight"),
    (re.compile(r"^final_layernorm\.weight$"), "decoder.final_layernorm.weight"),
    (re.compile(r"\.self_attention\.kv_layernorm\.weight$"), ".self_attention.k_layernorm.weight"),
    # Megatron-LM's Transformer-Engine layer spec fuses the pre-norms into the next linear
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_weight$"), ".input_layernorm.weight"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_weight$"), ".pre_mlp_layernorm.weight"),
]


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    return f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "") + (f"_{ep:03d}" if ep_size > 1 else "")


def read_iteration(root: Path, iteration: int | None) -> tuple[int | str, Path]:
    """The iteration to read (the tracker's unless given) and its directory, checked to exist."""
    tracker = root / TRACKER
    if iteration is None:
        if not tracker.is_file():
            raise ConvertError(f"{root}: no {TRACKER}; is this a Megatron checkpoint? (or pass --iteration)")
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise ConvertError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
        iteration = text if text == "release" else int(text)
    path = root / iter_dir_name(iteration)
    if not path.is_dir():
        found = sorted(p.name for p in root.glob("iter_*")) + (
            ["release"] if (root / "release").is_dir() else []
        )
        raise ConvertError(
            f"{path} does not exist (iteration {iteration} from {TRACKER if tracker.is_file() else '--iteration'}); "
            f"found: {found or 'no iteration directories'}"
        )
    return iteration, path


def rank_dirs(iter_path: Path) -> dict[tuple[int, ...], Path]:
    """mp_rank_* directories by their numbers: (tp,), (tp, x) or (tp, pp, ep)."""
    out = {}
    for d in iter_path.iterdir():
        m = _RANK_DIR.match(d.name)
        if m and d.is_dir():
            out[tuple(int(g) for g in m.groups() if g is not None)] = d
    if not out:
        raise ConvertError(f"{iter_path}: no mp_rank_* directories")
    return out


def load_rank(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict with canonical names, the rest of the file), memory-mapped."""
    f = path / RANK_FILE
    if not f.is_file():
        raise ConvertError(f"{f} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ckpt = torch.load(f, map_location="cpu", mmap=True, weights_only=not allow_pickle)
            except RuntimeError as exc:  # files from before torch's zip format cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                ckpt = torch.load(f, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        raise ConvertError(
            f"{f}: holds Python objects beyond tensors ({str(exc).splitlines()[0]}); if you trust the file, "
            "pass --allow-pickle"
        ) from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise ConvertError(f"{f}: cannot be read ({exc})") from exc
    if "model" not in ckpt:
        vpp = sorted(k for k in ckpt if re.fullmatch(r"model\d+", str(k)))
        if vpp:
            raise ConvertError(f"{f}: virtual-pipeline checkpoints ({', '.join(vpp)}) are not supported")
        raise ConvertError(f"{f}: no 'model' entry (keys: {sorted(map(str, ckpt))})")
    model = {}
    for k, v in ckpt.pop("model").items():
        if k.endswith("._extra_state") or v is None:
            continue
        for pattern, repl in _ALIASES:
            k = pattern.sub(repl, k)
        model[k] = v
    return model, ckpt


def save_rank(path: Path, model: dict[str, torch.Tensor], iteration: int | str, args: dict) -> None:
    path.mkdir(parents=True)
    ckpt = {
        "model": model,
        "checkpoint_version": 3.0,
        "iteration": 0 if iteration == "release" else iteration,
        "args": argparse.Namespace(**args),
    }
    torch.save(ckpt, path / RANK_FILE)
