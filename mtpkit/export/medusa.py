"""Medusa heads in vLLM ≤ 0.32's MedusaModel layout (`vllm-medusa`; the class was removed in 0.33).

    config.json   model_type "medusa", architectures ["MedusaModel"], hidden_size, vocab_size,
                  num_heads, num_hidden_layers (residual layers per head), truncated_vocab_size,
                  medusa_fc_bias, original_lm_head, logit_scale
    weights       blocks.{h}.layers.{l}.weight / .bias, lm_heads.{h}.weight

Head h (0-based) predicts the token h + 2 positions after the last verified one, from the
target's final post-norm hidden state, through x + SiLU(Linear(x)) blocks. A head trained with
the target's own LM head (`own_lm_head: false`) gets a copy of it in every `lm_heads.{h}` and
`original_lm_head: false`, which is exact whatever vLLM does with that flag.

Written against the documented key names of the head family (mtpkit/heads/medusa.py keeps
vLLM's names); tested on synthetic state dicts.
"""

from __future__ import annotations

import json
import re

from safetensors.torch import save_file

from mtpkit.export.checkpoint import SINGLE
from mtpkit.export.source import ExportError, HeadSource

_KEY = re.compile(r"^(blocks\.\d+\.layers\.\d+\.(weight|bias)|lm_heads\.\d+\.weight)$")


def check_medusa_export(src: HeadSource, fmt: str, k: int) -> None:
    unknown = sorted(key for key in src.state if not _KEY.match(key))
    if unknown:
        raise ExportError(f"{fmt}: head tensors {unknown} have no place in vLLM's MedusaModel")
    heads = src.head_config.get("num_heads", 0)
    if k > heads:
        raise ExportError(f"{fmt}: -k {k} needs {k} Medusa heads; this one has {heads}")


def medusa_tensors(src: HeadSource) -> dict:
    tensors = {key: t.contiguous() for key, t in src.state.items()}
    heads = src.head_config["num_heads"]
    if not any(key.startswith("lm_heads.") for key in tensors):  # trained on the target's LM head
        lm_head = src.target_tensor("lm_head.weight")
        tensors.update({f"lm_heads.{h}.weight": lm_head.clone() for h in range(heads)})
    return tensors


def medusa_config(src: HeadSource) -> dict:
    cfg = src.head_config
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": src.config.hidden_size,
        "vocab_size": src.config.vocab_size,
        "truncated_vocab_size": src.config.vocab_size,
        "num_heads": cfg["num_heads"],
        "num_hidden_layers": cfg.get("num_layers", 1),
        "medusa_fc_bias": any(key.endswith(".bias") for key in src.state),
        "original_lm_head": False,
        "logit_scale": 1.0,
    }


def write_vllm_medusa(src: HeadSource, out, k: int) -> None:
    save_file(medusa_tensors(src), str(out / SINGLE), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(medusa_config(src), indent=2) + "\n")
    src.tokenizer.save_pretrained(out)
