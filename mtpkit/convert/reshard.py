"""HF ⇄ Megatron per-rank ⇄ Megatron per-rank, one tensor at a time.

Every conversion is "a source that yields full HF tensors by name" → "a writer". Sources:
`HFSource` (memory-mapped safetensors views) and `MegatronSource` (memory-mapped rank files, each
HF tensor gathered from its rank pieces on demand), optionally wrapped by a LoRA merge. Writers:
an HF directory (flushed shard by shard) or one rank file at a time. Peak memory is one output
shard / rank file plus the tensors it is cut from; everything is written under a temporary
directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mtpkit.convert.dcp import DCPSource, is_dcp, write_dcp
from mtpkit.convert.hf import HFReader, HFWriter, copy_non_weights, owned
from mtpkit.convert.layout import (
    ConvertError,
    GroupedExperts,
    Layout,
    ModelShape,
    Plan,
    build_plan,
    model_shape,
)
from mtpkit.convert.megatron import (
    HF_META,
    META,
    TRACKER,
    iter_dir_name,
    load_rank,
    rank_dir_name,
    rank_dirs,
    read_iteration,
    save_rank,
)
from mtpkit.io import OutputExistsError, atomic_dir

log = logging.getLogger(__name__)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh directory that becomes `out` only if the block finishes."""
    out = Path(out)
    message = f"{out} already exists (pass --overwrite to replace it)"
    if out.exists() and not overwrite:
        raise ConvertError(message)
    try:
        with atomic_dir(out, replace=overwrite, exists_message=message) as tmp:
            yield tmp
    except OutputExistsError as exc:
        raise ConvertError(str(exc)) from None


# ---- sources ---------------------------------------------------------------------------------------


class HFSource:
    def __init__(self, path: str | Path, mtp_num_layers: int | None = None):
        self.reader = HFReader(path)
        self.path = self.reader.path
        self.config = self.reader.config
        self.shape = model_shape(self.config, str(self.path / "config.json"))
        names = set(self.reader.names())
        present = 0
        while f"model.layers.{self.shape.num_layers + present}.eh_proj.weight" in names:
            present += 1
        if mtp_num_layers is not None and mtp_num_layers > present:
            raise ConvertError(
                f"--mtp-num-layers {mtp_num_layers}: {self.path} holds {present} MTP layer(s) "
                f"(model.layers.{self.shape.num_layers}+ with eh_proj)"
            )
        self.mtp_present = present
        self.mtp_num_layers = present if mtp_num_layers is None else mtp_num_layers

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def check(self, plan: Plan, ignore: Callable[[str], bool] = lambda n: False) -> None:
        """Every tensor the plan needs is present, nothing unknown is silently dropped."""
        names = {n for n in self.reader.names() if not ignore(n)}
        wanted = plan.hf_names()
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ConvertError(
                f"{self.path}: missing {len(missing)} tensor(s) the layout needs, e.g. {missing[:3]}"
            )
        first_dropped = self.shape.num_layers + plan.layout.mtp_num_layers
        extra = sorted(set(names) - set(wanted))
        dropped = [n for n in extra if (m := _LAYER.match(n)) and int(m.group(1)) >= first_dropped]
        if dropped:
            log.info(
                "dropping %d tensors of MTP layers >= %d (--mtp-num-layers)", len(dropped), first_dropped
            )
        unknown = [n for n in extra if n not in dropped]
        fp8 = [n for n in unknown if n.endswith("weight_scale_inv")]
        if fp8:
            raise ConvertError(
                f"{self.path}: FP8 block-quantized weights ({fp8[0]}, ...); dequantize to bf16 first "
                "(DeepSeek's inference/fp8_cast_bf16.py), as Megatron and MindSpeed-LLM also require"
            )
        if unknown:
            raise ConvertError(
                f"{self.path}: {len(unknown)} tensor(s) this mapping of {self.shape.model_type} does not know, "
                f"e.g. {unknown[:3]}; refusing to drop them silently"
            )
        for alias, target in plan.aliases.items():
            if not torch.equal(self.get(alias), self.get(target)):
                raise ConvertError(
                    f"{self.path}: {alias} differs from {target}; Megatron shares one copy, so the conversion "
                    "would not be lossless"
                )


@dataclass
class ShardedInfo:
    """What a Megatron checkpoint directory holds, resolved from metadata, flags and the files."""

    root: Path
    iteration: int | str
    ranks: dict[tuple[int, int, int], Path]
    layout: Layout
    config: dict
    hf_meta: Path | None


def inspect_sharded(
    root: str | Path,
    overrides: dict | None = None,
    hf_config: str | Path | None = None,
    iteration: int | None = None,
    allow_pickle: bool = False,
    first_k_dense: int | None = None,
) -> ShardedInfo:
    """Read the layout of a per-rank checkpoint: mtpkit's metadata if present, else flags + inference."""
    root = Path(root)
    if not root.is_dir():
        raise ConvertError(f"{root} does not exist")
    meta = json.loads((root / META).read_text()) if (root / META).is_file() else {}
    iteration, iter_path = read_iteration(root, iteration)
    if meta and iteration != meta.get("iteration", iteration):
        log.info("reading iteration %s (the conversion wrote %s)", iteration, meta["iteration"])
    if hf_config is not None:
        cfg_path = Path(hf_config) / "config.json" if Path(hf_config).is_dir() else Path(hf_config)
        if not cfg_path.is_file():
            raise ConvertError(f"--hf-config {hf_config}: no config.json there")
        config, hf_meta = json.loads(cfg_path.read_text()), cfg_path.parent
    elif "hf_config" in meta:
        config, hf_meta = meta["hf_config"], root / HF_META if (root / HF_META).is_dir() else None
    else:
        raise ConvertError(
            f"{root}: no {META} (not written by mtpkit); pass --hf-config with the model's config.json"
        )
    if first_k_dense is not None:
        config = dict(config, first_k_dense_replace=first_k_dense)
    shape = model_shape(config, "hf config")
    found = rank_dirs(iter_path)
    fields = dict(meta.get("layout", {}))
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    sizes = {len(k) for k in found}
    if len(sizes) != 1:
        raise ConvertError(f"{iter_path}: mixed mp_rank_* directory name patterns")
    n = sizes.pop()
    tps = 1 + max(k[0] for k in found)
    fields.setdefault("tp", tps)
    if n == 3:
        fields.setdefault("pp", 1 + max(k[1] for k in found))
        fields.setdefault("ep", 1 + max(k[2] for k in found))
    elif n == 2 and "pp" not in fields and "ep" not in fields:
        # mp_rank_TT_XXX is a pipeline stage or an expert rank; EP ranks hold the same tensor names.
        x = 1 + max(k[1] for k in found)
        same = x > 1 and set(load_rank(found[(0, 0)], allow_pickle)[0]) == set(
            load_rank(found[(0, 1)], allow_pickle)[0]
        )
        fields["ep" if same else "pp"] = x
    fields.setdefault("pp", 1)
    fields.setdefault("ep", 1)
    tp, pp, ep = fields["tp"], fields["pp"], fields["ep"]
    ranks = {}
    for s in range(pp):
        for e in range(ep):
            for t in range(tp):
                name = rank_dir_name(t, s, e, pp, ep)
                if not (iter_path / name).is_dir():
                    raise ConvertError(
                        f"{iter_path / name} is missing (layout tp={tp} pp={pp} ep={ep}); found "
                        f"{len(found)} rank directories"
                    )
                ranks[(t, s, e)] = iter_path / name
    if len(found) != len(ranks):
        raise ConvertError(
            f"{iter_path}: {len(found)} rank directories, but tp={tp} pp={pp} ep={ep} means {len(ranks)}"
        )
    if not meta:  # infer what the names tell: grouped GEMM, MTP layers, layers per stage
        last = load_rank(ranks[(0, pp - 1, 0)], allow_pickle)[0]
        fields.setdefault("moe_grouped_gemm", any(k.endswith(".experts.weight1") for k in last))
        fields.setdefault(
            "mtp_num_layers", len({k.split(".")[2] for k in last if k.startswith("mtp.layers.")})
        )
        if pp > 1 and not fields.get("noop_layers") and "num_layer_list" not in fields:
            counts = []
            for s in range(pp):
                keys = load_rank(ranks[(0, s, 0)], allow_pickle)[0]
                counts.append(len({k.split(".")[2] for k in keys if k.startswith("decoder.layers.")}))
            if counts != [shape.num_layers // pp] * pp:
                fields["num_layer_list"] = counts
    layout = Layout(**fields)
    layout.validate(shape, flag="--source-")
    return ShardedInfo(root, iteration, ranks, layout, config, hf_meta)


class MegatronSource:
    """Full HF tensors gathered from memory-mapped rank files, one tensor at a time."""

    def __init__(self, info: ShardedInfo, allow_pickle: bool = False):
        self.info = info
        self.config = info.config
        self.shape = model_shape(info.config)
        self.plan = build_plan(self.shape, info.layout)
        self._index = self.plan.index()
        self._allow_pickle = allow_pickle
        self._files: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}
        self.mtp_num_layers = info.layout.mtp_num_layers
        self.hf_meta, self.iteration = info.hf_meta, info.iteration

    def _rank(self, tp: int, stage: int, ep: int) -> dict[str, torch.Tensor]:
        if (tp, stage, ep) not in self._files:
            model, rest = load_rank(self.info.ranks[(tp, stage, ep)], self._allow_pickle)
            it = rest.get("iteration")
            want = 0 if self.info.iteration == "release" else self.info.iteration
            if it is not None and it != want:
                raise ConvertError(
                    f"{self.info.ranks[(tp, stage, ep)]}: holds iteration {it}, but {iter_dir_name(self.info.iteration)} "
                    "was requested; the checkpoint mixes iterations"
                )
            self._files[(tp, stage, ep)] = model
        return self._files[(tp, stage, ep)]

    def check(self) -> None:
        """Every rank file holds exactly the tensors the layout puts there."""
        lay = self.info.layout
        for (t, s, e), path in self.info.ranks.items():
            have, want = set(self._rank(t, s, e)), self.plan.keys(s, t, e)
            if have != want:
                missing, extra = sorted(want - have), sorted(have - want)
                raise ConvertError(
                    f"{path}: does not match the layout tp={lay.tp} pp={lay.pp} ep={lay.ep} "
                    f"num_layer_list={lay.num_layer_list} noop_layers={lay.noop_layers} "
                    f"mtp_num_layers={lay.mtp_num_layers} grouped_gemm={lay.moe_grouped_gemm}: "
                    f"missing {missing[:3]}, unexpected {extra[:3]}"
                )

    def get(self, name: str) -> torch.Tensor:
        if name in self.plan.aliases:
            name = self.plan.aliases[name]
        try:
            stage, p = self._index[name]
        except KeyError:
            raise ConvertError(f"{self.info.root}: no tensor maps to {name}") from None

        def piece(t: int, e: int) -> torch.Tensor:
            return self._rank(t, stage, e)[p.key]

        if isinstance(p, GroupedExperts):
            return p.gather_expert(name, piece)
        ep = p.ep_owner or 0
        return p.gather(name, [piece(t, ep) for t in p.holders(self.info.layout.tp)])


# ---- writers ---------------------------------------------------------------------------------------


def _megatron_args(shape: ModelShape, layout: Layout, dtype: torch.dtype) -> dict:
    """The Namespace Megatron tools read back; only what describes the weights."""
    return dict(
        num_layers=shape.num_layers + len(layout.noop_layers or []),
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        group_query_attention=shape.kv_heads != shape.heads,
        kv_channels=shape.head_dim,
        padded_vocab_size=shape.vocab,
        add_qkv_bias=shape.qkv_bias,
        untie_embeddings_and_output_weights=not shape.tied,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        num_layer_list=",".join(map(str, layout.num_layer_list)) if layout.num_layer_list else None,
        noop_layers=",".join(map(str, layout.noop_layers)) if layout.noop_layers else None,
        num_experts=shape.n_experts or None,
        moe_ffn_hidden_size=shape.moe_intermediate or None,
        first_k_dense_replace=shape.first_k_dense if shape.n_experts else None,
        moe_grouped_gemm=layout.moe_grouped_gemm,
        moe_tp_extend_ep=layout.moe_tp_extend_ep,
        mtp_num_layers=layout.mtp_num_layers or None,
        q_lora_rank=shape.q_lora_rank,
        kv_lora_rank=shape.kv_lora_rank or None,
        params_dtype=dtype,
    )


def write_megatron(
    get: Callable[[str], torch.Tensor],
    plan: Plan,
    out: Path,
    iteration: int | str,
    config: dict,
    hf_meta: Path | None,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Write every rank file of `plan` under `out`; returns the bytes written."""
    lay = plan.layout
    dtype = get(plan.stages[0][0].hf[0]).dtype
    args = _megatron_args(plan.shape, lay, dtype)
    iter_path = out / iter_dir_name(iteration)
    total = 0
    for s in range(lay.pp):
        for e in range(lay.ep):
            for t in range(lay.tp):
                model = {}
                for p in plan.stages[s]:
                    if p.held_by(t, e):
                        model[p.key] = owned(p.shard(t, lay.tp, get, ep_rank=e))
                name = rank_dir_name(t, s, e, lay.pp, lay.ep)
                save_rank(iter_path / name, model, iteration, args)
                total += sum(v.numel() * v.element_size() for v in model.values())
                del model
                if progress:
                    progress(name)
    (out / TRACKER).write_text(f"{iteration}\n" if iteration == "release" else f"{int(iteration)}\n")
    meta = {"format": "megatron-legacy", "iteration": iteration, "layout": lay.to_json(), "hf_config": config}
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    if hf_meta is not None:
        (out / HF_META).mkdir()
        copy_non_weights(hf_meta, out / HF_META)
    return total


def output_config(config: dict, shape: ModelShape, mtp_num_layers: int) -> dict:
    config = dict(config)
    if shape.deepseek and config.get("num_nextn_predict_layers", 0) != mtp_num_layers:
        config["num_nextn_predict_layers"] = mtp_num_layers  # so engines do not look for dropped layers
    return config


def write_hf(
    get: Callable[[str], torch.Tensor],
    names: list[str],
    out: Path,
    config: dict,
    hf_meta: Path | None,
    max_shard_bytes: int,
) -> int:
    writer = HFWriter(out, max_shard_bytes)
    for name in names:
        writer.add(name, get(name))
    writer.close()
    if hf_meta is not None:
        copy_non_weights(hf_meta, out, skip=("config.json",))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return writer.total


# ---- the conversions -------------------------------------------------------------------------------


@dataclass
class Result:
    out: Path
    bytes: int
    tensors: int


def _check_format(fmt: str, layout: Layout) -> None:
    if fmt not in ("megatron", "dcp"):
        raise ConvertError(f"--format {fmt!r}: choose megatron or dcp")
    if fmt == "dcp" and (layout.tp, layout.pp, layout.ep) != (1, 1, 1):
        raise ConvertError(
            "--format dcp stores global tensors (any mesh loads them); --tp/--pp/--ep do not apply"
        )


def _write_sharded(fmt, get, plan: Plan, out: Path, iteration, config: dict, hf_meta, progress) -> int:
    if fmt == "dcp":
        return write_dcp(get, plan.hf_names(), out, config, hf_meta)
    return write_megatron(get, plan, out, iteration, config, hf_meta, progress)


def hf_to_sharded(
    src: str | Path,
    out: str | Path,
    layout: Layout,
    iteration: int = 1,
    overwrite: bool = False,
    lora=None,
    first_k_dense: int | None = None,
    fmt: str = "megatron",
    progress=None,
) -> Result:
    """`layout.mtp_num_layers < 0` means "every MTP layer the HF files hold"."""
    _check_format(fmt, layout)
    source = HFSource(src, None if layout.mtp_num_layers < 0 else layout.mtp_num_layers)
    have = source.config.get("first_k_dense_replace")
    if first_k_dense is not None and first_k_dense != have:
        raise ConvertError(
            f"--first-k-dense-replace {first_k_dense}: {source.path / 'config.json'} says {have}, and the HF "
            "weights (dense gate/up/down vs experts) follow the config"
        )
    layout = replace(layout, mtp_num_layers=source.mtp_num_layers)
    layout.validate(source.shape)
    plan = build_plan(source.shape, layout)
    get = source.get
    if lora is not None:
        get = lora.wrap(get, plan.hf_names())
    source.check(plan, ignore=lora.owns if lora is not None else (lambda n: False))
    config = _dequantized_config(source)
    with staged_output(Path(out), overwrite) as tmp:
        total = _write_sharded(fmt, get, plan, tmp, iteration, config, source.path, progress)
    return Result(Path(out), total, len(plan.hf_names()))


def _dequantized_config(source: HFSource) -> dict:
    config = dict(source.config)
    if source.reader.quantized:
        log.info("dequantizing %d bitsandbytes 4-bit weights", len(source.reader.quantized))
        config.pop("quantization_config", None)
    return config


def open_sharded(
    src: str | Path,
    source_overrides: dict | None = None,
    hf_config: str | Path | None = None,
    iteration: int | None = None,
    allow_pickle: bool = False,
    first_k_dense: int | None = None,
):
    """A Megatron per-rank or DCP checkpoint as a source of full HF tensors, checked against its layout."""
    if is_dcp(src):
        source = DCPSource(src, hf_config)
        if first_k_dense is not None:
            source.config = dict(source.config, first_k_dense_replace=first_k_dense)
            source.shape = model_shape(source.config)
        source.iteration = 1
        wanted = build_plan(source.shape, Layout(mtp_num_layers=source.mtp_num_layers)).hf_names()
        missing = sorted(set(wanted) - set(source.names()))
        if missing:
            raise ConvertError(f"{src}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        return source
    info = inspect_sharded(src, source_overrides, hf_config, iteration, allow_pickle, first_k_dense)
    source = MegatronSource(info, allow_pickle)
    source.check()
    return source


def _mtp_count(requested: int | None, source, src) -> int:
    if requested is None or requested < 0:
        return source.mtp_num_layers
    if requested > source.mtp_num_layers:
        raise ConvertError(f"--mtp-num-layers {requested}: {src} holds {source.mtp_num_layers} MTP layer(s)")
    return requested


def sharded_to_hf(
    src: str | Path,
    out: str | Path,
    source_overrides: dict | None = None,
    hf_config: str | Path | None = None,
    iteration: int | None = None,
    mtp_num_layers: int | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    allow_pickle: bool = False,
    lora=None,
    first_k_dense: int | None = None,
) -> Result:
    source = open_sharded(src, source_overrides, hf_config, iteration, allow_pickle, first_k_dense)
    n_mtp = _mtp_count(mtp_num_layers, source, src)
    names = build_plan(source.shape, Layout(mtp_num_layers=n_mtp)).hf_names()
    get = source.get if lora is None else lora.wrap(source.get, names)
    with staged_output(Path(out), overwrite) as tmp:
        config = output_config(source.config, source.shape, n_mtp)
        total = write_hf(get, names, tmp, config, source.hf_meta, max_shard_bytes)
    return Result(Path(out), total, len(names))


def sharded_to_sharded(
    src: str | Path,
    out: str | Path,
    layout: Layout,
    source_overrides: dict | None = None,
    hf_config: str | Path | None = None,
    iteration: int | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    lora=None,
    first_k_dense: int | None = None,
    fmt: str = "megatron",
    out_iteration: int | None = None,
    progress=None,
) -> Result:
    """Re-shard without an HF copy on disk: each target rank is cut from tensors gathered in memory.
    The output keeps the source's iteration unless `out_iteration` is given."""
    _check_format(fmt, layout)
    source = open_sharded(src, source_overrides, hf_config, iteration, allow_pickle, first_k_dense)
    layout = replace(layout, mtp_num_layers=_mtp_count(layout.mtp_num_layers, source, src))
    layout.validate(source.shape)
    plan = build_plan(source.shape, layout)
    get = source.get if lora is None else lora.wrap(source.get, plan.hf_names())
    with staged_output(Path(out), overwrite) as tmp:
        it = source.iteration if out_iteration is None else out_iteration
        total = _write_sharded(fmt, get, plan, tmp, it, source.config, source.hf_meta, progress)
    return Result(Path(out), total, len(plan.hf_names()))


def hf_to_hf(
    src: str | Path,
    out: str | Path,
    lora=None,
    mtp_num_layers: int | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Result:
    """Re-write an HF directory, merging a LoRA adapter into it (the usual way to use this)."""
    source = HFSource(src, None if mtp_num_layers is None or mtp_num_layers < 0 else mtp_num_layers)
    plan = build_plan(source.shape, Layout(mtp_num_layers=source.mtp_num_layers))
    get = source.get if lora is None else lora.wrap(source.get, plan.hf_names())
    source.check(plan, ignore=lora.owns if lora is not None else (lambda n: False))
    with staged_output(Path(out), overwrite) as tmp:
        config = output_config(_dequantized_config(source), source.shape, source.mtp_num_layers)
        total = write_hf(get, plan.hf_names(), tmp, config, source.path, max_shard_bytes)
    return Result(Path(out), total, len(plan.hf_names()))
