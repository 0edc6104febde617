"""SERVE.md: the exact command lines that serve an exported head, speculative flags filled in."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mtpkit.export.source import HeadSource

_TRANSFORMERS_MTP_LAYER = 61  # DeepseekV3's _keys_to_ignore_on_load_unexpected names layer 61 only


def _spec_config(**fields) -> str:
    return shlex.quote(json.dumps(fields))


def _target(src: HeadSource) -> str:
    path = src.model_dir
    return shlex.quote(str(path.resolve())) if path is not None else src.target_spec


def _vllm(target: str, **spec) -> str:
    return f"vllm serve {target} \\\n  --speculative-config {_spec_config(**spec)}"


def _sglang(target: str, k: int, algorithm: str, draft: str | None, topk: int = 1) -> str:
    draft_flag = f" \\\n  --speculative-draft-model-path {draft}" if draft else ""
    return (
        f"python -m sglang.launch_server --model-path {target} \\\n"
        f"  --speculative-algorithm {algorithm}{draft_flag} \\\n"
        f"  --speculative-num-steps {k} --speculative-eagle-topk {topk} --speculative-num-draft-tokens {k + 1}"
    )


def _block(lang: str, text: str) -> str:
    return f"```{lang}\n{text}\n```\n"


def serve_markdown(fmt: str, out: Path, src: HeadSource, k: int) -> str:
    out_q = shlex.quote(str(out.resolve()))
    cfg = src.head_config
    lines = [
        f"# Serving {out.name} ({fmt})\n",
        f"A `{src.head_type}` head exported by `mtpkit export --format {fmt}` for the target "
        f"`{src.target_spec}` ({src.model_type}, {src.num_layers} layers). Head config: "
        f"`{json.dumps(cfg)}`. Draft tokens per step: {k} (`mtpkit export -k` changes it).\n",
    ]
    target = _target(src)
    if src.model_dir is None and fmt in ("vllm-mtp", "sglang-nextn"):
        lines.append(
            f"`{src.target_spec}` is an in-memory test target; `mtpkit export --format transformers` writes "
            "it as a checkpoint directory to pass as the target below.\n"
        )
    if fmt == "vllm-mtp":
        lines += [
            "## vLLM (≥ 0.10; checked against 0.33 `deepseek_mtp.py`)\n",
            _block("bash", _vllm(target, method="mtp", model=str(out.resolve()), num_speculative_tokens=k)),
            "vLLM replaces the draft's embedding and LM head with the target's; the MTP layers are "
            "used cyclically when num_speculative_tokens exceeds num_nextn_predict_layers.\n",
        ]
    elif fmt == "sglang-nextn":
        lines += [
            "## SGLang (0.5.x, `deepseek_nextn.py`)\n",
            _block("bash", _sglang(target, k, "NEXTN", out_q)),
            "NEXTN chains the single MTP layer for each of the --speculative-num-steps; "
            "--speculative-num-draft-tokens is steps + 1 with topk 1.\n",
        ]
    elif fmt == "transformers":
        layers = src.num_layers
        lines += [
            "## transformers (≥ 5.24: `generate(use_mtp=True)`)\n",
            _block(
                "python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({str(out.resolve())!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({str(out.resolve())!r})\n"
                + (
                    ""
                    if layers == _TRANSFORMERS_MTP_LAYER
                    else "# transformers 5.24 looks for DeepSeek-V3 MTP weights at model.layers.61 only;\n"
                    f"# this target has {layers} layers, so point it at the exported layers:\n"
                    "model._keys_to_ignore_on_load_unexpected = {"
                    + ", ".join(f'r"model\\.layers\\.{layers + d}\\."' for d in range(cfg["num_depths"]))
                    + "}\n"
                )
                + 'inputs = tokenizer("Hello", return_tensors="pt")\n'
                "ids = model.generate(**inputs, use_mtp=True, do_sample=False, max_new_tokens=64)",
            ),
            f"transformers drafts one token per MTP layer ({cfg['num_depths']} per step here).\n",
            "## vLLM / SGLang: the directory is a target with built-in MTP\n",
            _block("bash", _vllm(out_q, method="mtp", num_speculative_tokens=k)),
        ]
        if cfg["num_depths"] == 1:
            lines.append(_block("bash", _sglang(out_q, k, "NEXTN", None)))
    elif fmt in ("vllm-eagle3", "speculators"):
        lines += [
            "## vLLM (0.33 `llama_eagle3.py`"
            + (", speculators config" if fmt == "speculators" else "")
            + ")\n",
            _block(
                "bash", _vllm(target, method="eagle3", model=str(out.resolve()), num_speculative_tokens=k)
            ),
            "Aux layers (vLLM numbering): "
            f"`{cfg['layers']}`; draft vocabulary {src.state['lm_head.weight'].shape[0]} tokens (d2t).\n",
        ]
    elif fmt == "sglang-eagle3":
        lines += [
            "## SGLang (0.5.x `llama_eagle3.py`)\n",
            _block("bash", _sglang(target, k, "EAGLE3", out_q)),
            f"Aux layers (SGLang numbering, one less than vLLM's): `{[i - 1 for i in cfg['layers']]}`.\n",
        ]
    elif fmt == "vllm-medusa":
        lines += [
            "## vLLM (≤ 0.32; MedusaModel was removed in 0.33)\n",
            _block(
                "bash", _vllm(target, method="medusa", model=str(out.resolve()), num_speculative_tokens=k)
            ),
        ]
    elif fmt == "native":
        lines += [
            "## mtpkit\n",
            _block("bash", f"mtpkit eval --head {out_q} --prompts PROMPTS.jsonl -k {k}"),
            "Fine-tune further with `mtpkit train init_from=" + str(out.resolve()) + " ...`.\n",
        ]
    return "\n".join(lines)
