"""`mtpkit export` / `mtpkit import-mtp`: heads in the formats serving engines load, and back.

`export_head(head, fmt, out)` reads a native head (or a run directory), refuses any head/format
pair the format cannot represent exactly (with what would work instead), writes the format into
a temporary directory with SERVE.md (exact engine command lines) and `mtpkit_export.json`
(provenance, read back by import), and renames it into place: `out` appears complete or not at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtpkit.config import Checked, checked
from mtpkit.export.eagle3 import (
    check_eagle3_export,
    write_sglang_eagle3,
    write_speculators,
    write_vllm_eagle3,
)
from mtpkit.export.medusa import check_medusa_export, write_vllm_medusa
from mtpkit.export.mtp import check_mtp_export, write_draft_dir, write_full_checkpoint
from mtpkit.export.native import write_native
from mtpkit.export.serve import serve_markdown
from mtpkit.export.source import PROVENANCE, ExportError, HeadSource, atomic_dir, open_head
from mtpkit.heads import FAMILIES, HeadError, default_k, head_family


@dataclass
class ExportConfig(Checked):
    """`mtpkit export`: what `export_head` is called with."""

    head: str  # a head directory, or a training run directory
    format: str
    out: str
    model: str | None = None  # default: the target recorded in the head
    k: int | None = checked(None, ge=1)  # draft tokens per step in SERVE.md; None: the trained depths


@dataclass(frozen=True)
class Format:
    write: Callable[[HeadSource, Path, int], None]  # (head, temporary out dir, draft tokens per step)
    check: Callable[[HeadSource, str, int], None] | None = None
    engines: str = ""


# The writers; which head family each format represents is declared by the family itself
# (`HeadFamily.export_formats` in mtpkit.heads). `native` represents every family.
NATIVE = "native"
FORMATS: dict[str, Format] = {
    "vllm-mtp": Format(write_draft_dir, check_mtp_export, "vLLM --speculative-config method=mtp"),
    "sglang-nextn": Format(write_draft_dir, check_mtp_export, "SGLang --speculative-algorithm NEXTN"),
    "transformers": Format(
        write_full_checkpoint, check_mtp_export, "transformers generate(use_mtp=True); vLLM/SGLang target"
    ),
    "vllm-eagle3": Format(write_vllm_eagle3, check_eagle3_export, "vLLM method=eagle3"),
    "sglang-eagle3": Format(write_sglang_eagle3, check_eagle3_export, "SGLang EAGLE3"),
    "speculators": Format(write_speculators, check_eagle3_export, "vllm-project/speculators"),
    "vllm-medusa": Format(write_vllm_medusa, check_medusa_export, "vLLM <= 0.32 method=medusa"),
    NATIVE: Format(write_native, None, "mtpkit eval / train --init-from"),
}
for _family in FAMILIES.values():
    _unknown = sorted(set(_family.export_formats) - set(FORMATS))
    if _unknown:
        raise ImportError(f"head family {_family.name!r} declares export formats with no writer: {_unknown}")


def formats_for(head_type: str) -> list[str]:
    return [*head_family(head_type).export_formats, NATIVE]


def check_export(src: HeadSource, fmt: str, k: int) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; available: {', '.join(FORMATS)}")
    try:
        supported = formats_for(src.head_type)
    except HeadError as exc:
        raise ExportError(f"{src.path}: {exc}") from exc
    if fmt not in supported:
        raise ExportError(
            f"{fmt} cannot represent a {src.head_type!r} head exactly; formats for it: {', '.join(supported)}"
        )
    writer = FORMATS[fmt]
    if writer.check:
        writer.check(src, fmt, k)


def export_head(
    head: str | os.PathLike, fmt: str, out: str | os.PathLike, model: str | None = None, k=None
) -> Path:
    """Export a native head (or run directory) to `fmt` in `out`; returns `out`."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ExportError(f"-k (draft tokens per step) must be an integer >= 1, got {k!r}")
    src = open_head(head, model)
    cfg = src.head_config
    if k is None:
        try:
            k = default_k(src.head_type, cfg)
        except HeadError as exc:
            raise ExportError(f"{src.path}: {exc}") from exc
    check_export(src, fmt, k)

    def write(tmp: Path) -> None:
        FORMATS[fmt].write(src, tmp, k)
        (tmp / "SERVE.md").write_text(serve_markdown(fmt, Path(out), src, k))
        provenance = {
            "format": fmt,
            "head": str(src.path.resolve()),
            "head_type": src.head_type,
            "head_config": cfg,
            "target": src.meta.get("target", {}),
            "num_speculative_tokens": k,
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")

    return atomic_dir(Path(out), write)


__all__ = ["FORMATS", "ExportConfig", "ExportError", "export_head", "formats_for", "open_head"]
