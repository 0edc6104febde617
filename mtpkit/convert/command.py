"""`mtpkit convert <direction> SRC OUT [flags]`: argument parsing for reshard.py (torch is imported lazily)."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mtpkit.config import FieldError, check_fields, checked, config_from_args

_DIRECTIONS = {
    "hf-to-sharded": "HF directory → Megatron per-rank checkpoint (or DCP with --format dcp)",
    "sharded-to-hf": "Megatron per-rank or DCP checkpoint → HF directory",
    "sharded-to-sharded": "re-shard a Megatron per-rank checkpoint (e.g. TP=16 → TP=1)",
    "merge-lora": "HF directory + LoRA adapter → merged HF directory",
    "export-adapter": "peft dir or a checkpoint holding base + LoRA tensors → adapter-only peft dir",
}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MB, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


@dataclass
class ConvertConfig:
    """Every flag of `mtpkit convert` (a direction reads the ones it has); --config may set them too."""

    src: str
    out: str
    overwrite: bool = False
    lora: str | None = None
    lora_r: int | None = checked(None, ge=1)
    lora_alpha: float | None = checked(None, gt=0)
    tp: int = checked(1, ge=1)
    pp: int = checked(1, ge=1)
    ep: int = checked(1, ge=1)
    num_layer_list: list[int] | None = checked(None, ge=0)
    noop_layers: list[int] | None = checked(None, ge=0)
    moe_grouped_gemm: bool = False
    moe_tp_extend_ep: bool = False
    iteration: int | None = checked(None, ge=0)
    format: str = checked("megatron", choices=("megatron", "dcp"))
    hf_config: str | None = None
    source_tp: int | None = checked(None, ge=1)
    source_pp: int | None = checked(None, ge=1)
    source_ep: int | None = checked(None, ge=1)
    source_num_layer_list: list[int] | None = checked(None, ge=0)
    source_noop_layers: list[int] | None = checked(None, ge=0)
    source_moe_tp_extend_ep: bool | None = None
    source_iteration: int | None = checked(None, ge=0)
    allow_pickle: bool = False
    max_shard_size: int | str = 5 * 2**30  # bytes, or a size such as 5GB
    mtp_num_layers: int = checked(-1, ge=-1, meaning="-1 = all the source holds")
    first_k_dense_replace: int | None = checked(None, ge=0)

    def __post_init__(self):
        if isinstance(self.max_shard_size, str):
            try:
                self.max_shard_size = _size(self.max_shard_size)
            except argparse.ArgumentTypeError as exc:
                raise FieldError("max_shard_size", f"max_shard_size: {exc}") from None
        if self.max_shard_size < 1:
            raise FieldError("max_shard_size", f"max_shard_size must be > 0, got {self.max_shard_size}")
        check_fields(self)


def _target_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target layout (MindSpeed-LLM option names)")
    g.add_argument("--tp", type=int, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=int, help="pipeline-parallel size (default 1)")
    g.add_argument("--ep", type=int, help="expert-parallel size (default 1)")
    g.add_argument("--num-layer-list", type=_ints, help="decoder layers per PP stage, e.g. 16,15,15,15")
    g.add_argument(
        "--noop-layers", type=_ints, help="Megatron layer indices without weights (XOR --num-layer-list)"
    )
    g.add_argument("--moe-grouped-gemm", action="store_true", help="experts fused per rank (weight1/weight2)")
    g.add_argument(
        "--moe-tp-extend-ep", action="store_true", help="TP ranks split the expert count, not experts"
    )
    g.add_argument(
        "--iteration", type=int, help="iteration of the written checkpoint (default: 1, or the source's)"
    )
    g.add_argument("--format", choices=["megatron", "dcp"], help="default megatron")


def _source_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source checkpoint (read from mtpkit_convert.json when present, else inferred)")
    g.add_argument(
        "--hf-config", help="HF dir (config.json, tokenizer) of a checkpoint not written by mtpkit"
    )
    for name in ("tp", "pp", "ep"):
        g.add_argument(
            f"--source-{name}", type=int, help=f"source {name.upper()} size (default: from rank dirs)"
        )
    g.add_argument("--source-num-layer-list", type=_ints)
    g.add_argument("--source-noop-layers", type=_ints)
    g.add_argument("--source-moe-tp-extend-ep", action="store_true")
    g.add_argument("--source-iteration", type=int, help="read this iteration (default: the tracker file's)")
    g.add_argument(
        "--allow-pickle", action="store_true", help="rank files hold trusted non-tensor Python objects"
    )


def _common(p: argparse.ArgumentParser, lora: bool = True) -> None:
    p.add_argument("--config", help="YAML file with any of the flags' fields (flags override it)")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("out", help="output directory (written to a temporary sibling, renamed when complete)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    if lora:
        p.add_argument("--lora", help="peft adapter dir to merge (W += alpha/r · B·A) while converting")
    p.add_argument(
        "--lora-r", type=int, help="LoRA rank, for a checkpoint holding LoRA tensors without config"
    )
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha, same")


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints: HF ⇄ Megatron TP/PP/EP ranks, LoRA merge",
        description="Convert checkpoints between Hugging Face directories and Megatron-core per-rank layouts "
        "(TP/PP/EP, MTP layers, grouped GEMM), re-shard, merge or export LoRA adapters. See docs/convert.md.",
    )
    directions = p.add_subparsers(dest="direction", required=True)
    for name, help_text in _DIRECTIONS.items():
        # Flags not given stay unset, so the dataclass defaults and --config decide (ConvertConfig).
        d = directions.add_parser(
            name, help=help_text, description=help_text, argument_default=argparse.SUPPRESS
        )
        _common(d, lora=name != "export-adapter")
        if name in ("hf-to-sharded", "sharded-to-sharded"):
            _target_flags(d)
        if name in ("sharded-to-hf", "sharded-to-sharded"):
            _source_flags(d)
        if name in ("sharded-to-hf", "merge-lora"):
            d.add_argument("--max-shard-size", type=_size, help="per safetensors file (default 5GB)")
        if name != "export-adapter":
            d.add_argument(
                "--mtp-num-layers",
                type=int,
                help="MTP layers to keep (default -1: all the source holds)",
            )
            d.add_argument(
                "--first-k-dense-replace", type=int, help="leading dense layers (default: config.json)"
            )
    p.set_defaults(func=run_convert)


def _adapter(cfg: ConvertConfig, direction: str):
    from mtpkit.convert.lora import LoraAdapter

    if cfg.lora:
        return LoraAdapter.from_peft_dir(cfg.lora)
    if direction in ("hf-to-sharded", "merge-lora"):
        from mtpkit.convert.hf import HFReader

        return LoraAdapter.from_combined(HFReader(cfg.src), cfg.lora_r, cfg.lora_alpha)
    return None


def run_convert(args: argparse.Namespace) -> int:
    from mtpkit.convert import reshard
    from mtpkit.convert.layout import ConvertError, Layout
    from mtpkit.convert.lora import LoraAdapter

    t0 = time.perf_counter()
    d = args.direction
    cfg = config_from_args(ConvertConfig, args)
    if d == "export-adapter":
        from mtpkit.convert.hf import HFReader

        src = Path(cfg.src)
        adapter = (
            LoraAdapter.from_peft_dir(src)
            if (src / "adapter_config.json").is_file() and not (src / "config.json").is_file()
            else LoraAdapter.from_combined(HFReader(src), cfg.lora_r, cfg.lora_alpha)
        )
        if adapter is None:
            raise ConvertError(f"{src}: holds no LoRA tensors (*.lora_A.weight / *.lora_B.weight)")
        with reshard.staged_output(Path(cfg.out), cfg.overwrite) as tmp:
            adapter.save_peft(tmp, base_model=str(src))
        print(f"wrote a peft adapter with {len(adapter.a)} LoRA modules to {cfg.out}")
        return 0
    adapter = _adapter(cfg, d)
    if d in ("hf-to-sharded", "sharded-to-sharded"):
        if cfg.num_layer_list is not None and cfg.noop_layers:
            raise ConvertError("--num-layer-list and --noop-layers are mutually exclusive")
        layout = Layout(
            tp=cfg.tp,
            pp=cfg.pp,
            ep=cfg.ep,
            num_layer_list=cfg.num_layer_list,
            noop_layers=cfg.noop_layers,
            mtp_num_layers=cfg.mtp_num_layers,
            moe_grouped_gemm=cfg.moe_grouped_gemm,
            moe_tp_extend_ep=cfg.moe_tp_extend_ep,
        )
    source = {}
    if d in ("sharded-to-hf", "sharded-to-sharded"):
        source = dict(
            source_overrides={
                "tp": cfg.source_tp,
                "pp": cfg.source_pp,
                "ep": cfg.source_ep,
                "num_layer_list": cfg.source_num_layer_list,
                "noop_layers": cfg.source_noop_layers,
                "moe_tp_extend_ep": cfg.source_moe_tp_extend_ep,
            },
            hf_config=cfg.hf_config,
            iteration=cfg.source_iteration,
            allow_pickle=cfg.allow_pickle,
        )
    kw = dict(overwrite=cfg.overwrite, lora=adapter)
    if d == "hf-to-sharded":
        r = reshard.hf_to_sharded(
            cfg.src,
            cfg.out,
            layout,
            cfg.iteration or 1,
            first_k_dense=cfg.first_k_dense_replace,
            fmt=cfg.format,
            **kw,
        )
    elif d == "sharded-to-sharded":
        r = reshard.sharded_to_sharded(
            cfg.src,
            cfg.out,
            layout,
            first_k_dense=cfg.first_k_dense_replace,
            fmt=cfg.format,
            out_iteration=cfg.iteration,
            **source,
            **kw,
        )
    elif d == "sharded-to-hf":
        r = reshard.sharded_to_hf(
            cfg.src,
            cfg.out,
            mtp_num_layers=cfg.mtp_num_layers,
            max_shard_bytes=cfg.max_shard_size,
            first_k_dense=cfg.first_k_dense_replace,
            **source,
            **kw,
        )
    else:  # merge-lora
        if adapter is None:
            raise ConvertError(f"merge-lora: pass --lora, or a SRC holding LoRA tensors ({cfg.src} has none)")
        r = reshard.hf_to_hf(cfg.src, cfg.out, mtp_num_layers=cfg.mtp_num_layers, **kw)
    dt = time.perf_counter() - t0
    print(f"wrote {r.out}: {r.tensors} HF tensors, {r.bytes / 2**20:.1f} MiB in {dt:.1f} s")
    return 0
