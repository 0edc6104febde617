"""What goes where: model shapes from an HF config, the parallel layout, and the split rule of every tensor.

A `Plan` lists, per pipeline stage, the Megatron-core tensors (names as MindSpeed-LLM / Megatron-core
write them) and for each one the Hugging Face tensors it is built from and how it is split over
tensor-parallel (TP) and expert-parallel (EP) ranks:

    rep      replicated on every rank (norms, router, MLA's fused q_a/kv_a down-projection)
    col      split along dim 0 (column parallel: q_b/kv_b, embedding and LM head along the vocabulary)
    row      split along dim 1 (row parallel: o_proj, down_proj)
    qkv      GQA q/k/v fused per query group, [G, (q_per_group + 2) * d, H], groups split over TP
    gate_up  per TP rank cat(gate_chunk_i, up_chunk_i) (Megatron's swiglu chunks fc1's output in two)
    cat      several tensors concatenated along dim 0 and replicated (MLA linear_qkv)

Routed experts are either one tensor pair per local expert (`local_experts.{j}.linear_fc{1,2}`) or,
with grouped GEMM, `experts.weight1` [H, E_local * 2F] and `experts.weight2` [E_local * F, H] per
rank. With `moe_tp_extend_ep` the TP ranks split the expert count instead of the expert weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtpkit.errors import MtpkitError


class ConvertError(MtpkitError, ValueError):
    """A conversion that cannot proceed; raised before anything is written."""


LLAMA_TYPES = {"llama", "mistral", "qwen2"}
DEEPSEEK_TYPES = {"deepseek_v2", "deepseek_v3", "deepseek_v32"}


@dataclass(frozen=True)
class ModelShape:
    """The shapes that decide names and splits, read from a Hugging Face config.json."""

    model_type: str
    num_layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    # DeepSeek (MLA + MoE)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    n_experts: int = 0
    n_shared_experts: int = 0
    moe_intermediate: int = 0
    first_k_dense: int = 0
    router_bias: bool = False
    indexer: bool = False  # DeepSeek-V3.2 sparse-attention indexer
    mtp_layers: int = 0  # num_nextn_predict_layers in the config

    @property
    def deepseek(self) -> bool:
        return self.model_type in DEEPSEEK_TYPES


def model_shape(config: dict, where: str = "config.json") -> ModelShape:
    mt = config.get("model_type")
    if mt not in LLAMA_TYPES | DEEPSEEK_TYPES:
        raise ConvertError(
            f"{where}: model_type {mt!r} is not supported; supported: {sorted(LLAMA_TYPES | DEEPSEEK_TYPES)}"
        )
    heads = config["num_attention_heads"]
    common = dict(
        model_type=mt,
        num_layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        vocab=config["vocab_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
    )
    if mt in LLAMA_TYPES:
        if config.get("mlp_bias"):
            raise ConvertError(f"{where}: mlp_bias=true is not supported")
        bias = mt == "qwen2" or bool(config.get("attention_bias"))
        return ModelShape(**common, qkv_bias=bias, o_bias=bias and mt != "qwen2")
    if config.get("attention_bias"):
        raise ConvertError(f"{where}: attention_bias=true is not supported for MLA models")
    if config.get("moe_layer_freq", 1) != 1:
        raise ConvertError(f"{where}: moe_layer_freq={config['moe_layer_freq']} is not supported (only 1)")
    return ModelShape(
        **common,
        q_lora_rank=config.get("q_lora_rank"),
        kv_lora_rank=config["kv_lora_rank"],
        qk_rope_dim=config["qk_rope_head_dim"],
        n_experts=config.get("n_routed_experts") or 0,
        n_shared_experts=config.get("n_shared_experts") or 0,
        moe_intermediate=config.get("moe_intermediate_size") or 0,
        first_k_dense=config.get("first_k_dense_replace", 0) if config.get("n_routed_experts") else 10**9,
        router_bias=mt in ("deepseek_v3", "deepseek_v32"),
        indexer=mt == "deepseek_v32",
        mtp_layers=config.get("num_nextn_predict_layers") or 0,
    )


@dataclass
class Layout:
    """A parallel layout, with MindSpeed-LLM's option names."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    num_layer_list: list[int] | None = None
    noop_layers: list[int] | None = None
    mtp_num_layers: int = 0
    moe_grouped_gemm: bool = False
    moe_tp_extend_ep: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def validate(self, shape: ModelShape, flag: str = "--") -> None:
        """Every check that can fail, before anything is read or written. `flag` prefixes flag names."""

        def fail(msg: str):
            raise ConvertError(msg)

        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                fail(f"{flag}{name} must be >= 1")
        tp, L = self.tp, shape.num_layers
        if shape.vocab % tp:
            fail(f"{flag}tp {tp} does not divide the vocabulary size {shape.vocab} (vocab_size)")
        if shape.heads % tp:
            fail(f"{flag}tp {tp} does not divide num_attention_heads={shape.heads}")
        if not shape.deepseek and shape.kv_heads % tp:
            fail(f"{flag}tp {tp} does not divide num_key_value_heads={shape.kv_heads} (query groups)")
        if shape.intermediate % tp:
            fail(f"{flag}tp {tp} does not divide intermediate_size={shape.intermediate}")
        if shape.n_experts:
            ranks = self.ep * (tp if self.moe_tp_extend_ep else 1)
            what = f"{flag}ep {self.ep}" + (
                f" x {flag}tp {tp} (moe-tp-extend-ep)" if self.moe_tp_extend_ep else ""
            )
            if shape.n_experts % ranks:
                fail(f"{what} does not divide n_routed_experts={shape.n_experts}")
            if (not self.moe_tp_extend_ep and shape.moe_intermediate % tp) or (
                shape.moe_intermediate * shape.n_shared_experts
            ) % tp:
                fail(
                    f"{flag}tp {tp} does not divide the expert width moe_intermediate_size={shape.moe_intermediate}"
                )
        elif self.ep != 1:
            fail(f"{flag}ep {self.ep}: the model has no routed experts")
        if self.moe_tp_extend_ep and not shape.n_experts:
            fail(f"{flag}moe-tp-extend-ep: the model has no routed experts")
        if self.mtp_num_layers < 0 or self.mtp_num_layers > shape.mtp_layers:
            fail(
                f"{flag}mtp-num-layers {self.mtp_num_layers}: the model has {shape.mtp_layers} MTP layer(s) "
                "(num_nextn_predict_layers)"
            )
        if self.num_layer_list is not None and self.noop_layers:
            fail(f"{flag}num-layer-list and {flag}noop-layers are mutually exclusive")
        if self.num_layer_list is not None:
            if len(self.num_layer_list) != self.pp:
                fail(f"{flag}num-layer-list has {len(self.num_layer_list)} entries but {flag}pp is {self.pp}")
            if sum(self.num_layer_list) != L or min(self.num_layer_list) < 0:
                fail(
                    f"{flag}num-layer-list {','.join(map(str, self.num_layer_list))} sums to "
                    f"{sum(self.num_layer_list)} but the model has {L} decoder layers (num_hidden_layers)"
                )
        else:
            total = L + len(self.noop_layers or [])
            if self.noop_layers and (
                len(set(self.noop_layers)) != len(self.noop_layers)
                or not all(0 <= n < total for n in self.noop_layers)
            ):
                fail(f"{flag}noop-layers {self.noop_layers}: indices must be distinct and in [0, {total})")
            if total % self.pp:
                extra = f" + {len(self.noop_layers)} noop" if self.noop_layers else ""
                fail(
                    f"{flag}pp {self.pp} does not divide the layer count {L}{extra}; "
                    f"use {flag}num-layer-list or {flag}noop-layers"
                )

    def stages(self, shape: ModelShape) -> list[list[tuple[int, int]]]:
        """(local index, HF layer) per stage. Noop layers keep their slot, as Megatron numbers them."""
        L = shape.num_layers
        if self.num_layer_list is not None:
            out, start = [], 0
            for n in self.num_layer_list:
                out.append([(i, start + i) for i in range(n)])
                start += n
            return out
        noop = set(self.noop_layers or [])
        per = (L + len(noop)) // self.pp
        out, hf = [], 0
        for s in range(self.pp):
            stage = []
            for k in range(per):
                if s * per + k not in noop:
                    stage.append((k, hf))
                    hf += 1
            out.append(stage)
        return out


# ---- split rules ---------------------------------------------------------------------------------


def _groups(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, -1, *t.shape[1:])


@dataclass
class Param:
    """One Megatron tensor built from `hf` tensors by `rule` (see the module docstring)."""

    key: str
    hf: tuple[str, ...]
    rule: str
    split_tp: bool = True  # False: every holder has the whole tensor (moe-tp-extend-ep experts)
    ep_owner: int | None = None  # routed expert: only this EP rank holds it
    tp_owner: int | None = None  # moe-tp-extend-ep: only this TP rank holds it
    sizes: tuple[int, ...] = ()  # rule "cat": rows of each part; rule "qkv": (groups, q rows, kv rows)

    def held_by(self, tp: int, ep: int) -> bool:
        return (self.ep_owner is None or self.ep_owner == ep) and (
            self.tp_owner is None or self.tp_owner == tp
        )

    def holders(self, tp_size: int) -> list[int]:
        """TP ranks whose pieces make up the whole tensor."""
        if self.tp_owner is not None:
            return [self.tp_owner]
        return list(range(tp_size)) if self.split_tp else [0]

    def shard(
        self, tp_rank: int, tp_size: int, get: Callable[[str], torch.Tensor], ep_rank: int = 0
    ) -> torch.Tensor:
        fulls = [get(n) for n in self.hf]
        n, r = (tp_size, tp_rank) if self.split_tp else (1, 0)
        rule = self.rule
        if rule == "rep":
            return fulls[0]
        if rule == "col":
            return fulls[0].chunk(n, 0)[r]
        if rule == "row":
            return fulls[0].chunk(n, 1)[r]
        if rule == "cat":
            return torch.cat(fulls, 0)
        if rule == "gate_up":
            return torch.cat([fulls[0].chunk(n, 0)[r], fulls[1].chunk(n, 0)[r]], 0)
        if rule == "qkv":
            g = self.sizes[0]
            fused = torch.cat([_groups(f, g) for f in fulls], 1)  # [G, (qpg + 2) d, ...]
            return fused.chunk(n, 0)[r].reshape(-1, *fulls[0].shape[1:])
        raise AssertionError(rule)

    def gather(self, name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The HF tensor `name` from the pieces of `holders()`, in TP order."""
        i = self.hf.index(name)
        rule = self.rule
        if rule == "rep":
            return pieces[0]
        if rule == "col":
            return torch.cat(pieces, 0)
        if rule == "row":
            return torch.cat(pieces, 1)
        if rule == "cat":
            return pieces[0].split(list(self.sizes), 0)[i]
        if rule == "gate_up":
            return torch.cat([p.chunk(2, 0)[i] for p in pieces], 0)
        if rule == "qkv":
            g, q_rows, kv_rows = self.sizes
            per = [q_rows // g, kv_rows // g, kv_rows // g]
            parts = [_groups(p, g // len(pieces)).split(per, 1)[i] for p in pieces]
            return torch.cat(parts, 0).reshape(-1, *pieces[0].shape[1:])
        raise AssertionError(rule)


@dataclass
class GroupedExperts:
    """`experts.weight1` (gate/up, which=1) or `experts.weight2` (down, which=2) of one MoE layer."""

    key: str
    hf_prefix: str  # model.layers.N.mlp.experts
    which: int
    n_experts: int
    hidden: int
    tp_extend: bool
    ep_size: int
    tp_size: int
    ep_owner: None = None
    tp_owner: None = None

    @property
    def hf(self) -> tuple[str, ...]:
        parts = ("gate_proj", "up_proj") if self.which == 1 else ("down_proj",)
        return tuple(f"{self.hf_prefix}.{e}.{p}.weight" for e in range(self.n_experts) for p in parts)

    def held_by(self, tp: int, ep: int) -> bool:
        return True

    def _local(self, tp: int, ep: int) -> range:
        n = self.n_experts // (self.ep_size * (self.tp_size if self.tp_extend else 1))
        first = (ep * self.tp_size + tp) * n if self.tp_extend else ep * n
        return range(first, first + n)

    def _owner(self, expert: int) -> tuple[list[int], int, int]:
        """(TP ranks holding pieces, EP rank, local index) of a global expert."""
        if self.tp_extend:
            n = self.n_experts // (self.ep_size * self.tp_size)
            g = expert // n
            return [g % self.tp_size], g // self.tp_size, expert % n
        n = self.n_experts // self.ep_size
        return list(range(self.tp_size)), expert // n, expert % n

    def _expert_param(self, expert: int) -> Param:
        names = tuple(n for n in self.hf if n.startswith(f"{self.hf_prefix}.{expert}."))
        return Param("", names, "gate_up" if self.which == 1 else "row", split_tp=not self.tp_extend)

    def shard(self, tp_rank: int, tp_size: int, get, ep_rank: int = 0) -> torch.Tensor:
        # Megatron's GroupedMLP reads weight1.view(E_local, H, -1) and weight2.view(E_local, -1, H).
        mats = [self._expert_param(e).shard(tp_rank, tp_size, get).t() for e in self._local(tp_rank, ep_rank)]
        stacked = torch.stack(mats)
        return stacked.reshape(self.hidden, -1) if self.which == 1 else stacked.reshape(-1, self.hidden)

    def gather_expert(self, name: str, piece: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        expert = int(name[len(self.hf_prefix) + 1 :].split(".")[0])
        tps, ep, j = self._owner(expert)
        n_local = len(self._local(0, ep))
        shape = (n_local, self.hidden, -1) if self.which == 1 else (n_local, -1, self.hidden)
        mats = [piece(t, ep).reshape(shape)[j].t() for t in tps]
        return self._expert_param(expert).gather(name, mats)


@dataclass
class Plan:
    shape: ModelShape
    layout: Layout
    stages: list[list] = field(default_factory=list)  # Param | GroupedExperts per stage
    # HF names that Megatron does not store separately (MTP layers' copies of the embedding and
    # LM head): name -> the HF tensor it must equal.
    aliases: dict[str, str] = field(default_factory=dict)

    def hf_names(self) -> list[str]:
        """Every HF tensor of the model, each once, in checkpoint order."""
        seen: dict[str, None] = {}
        for stage in self.stages:
            for p in stage:
                seen.update(dict.fromkeys(p.hf))
        seen.update(dict.fromkeys(self.aliases))
        return sorted(seen, key=_hf_order)

    def index(self) -> dict[str, tuple[int, Param | GroupedExperts]]:
        out: dict = {}
        for s, stage in enumerate(self.stages):
            for p in stage:
                for n in p.hf:
                    out.setdefault(n, (s, p))
        return out

    def keys(self, stage: int, tp: int, ep: int) -> set[str]:
        return {p.key for p in self.stages[stage] if p.held_by(tp, ep)}


def _hf_order(name: str):
    if name.startswith("model.layers."):
        rest = name[len("model.layers.") :]
        return (1, int(rest.split(".")[0]), rest)
    return (0 if "embed" in name else 2, 0, name)


def build_plan(shape: ModelShape, layout: Layout) -> Plan:
    plan = Plan(shape, layout)
    stages = layout.stages(shape)
    last = layout.pp - 1
    for s, layers in enumerate(stages):
        params: list = []
        if s == 0:
            params.append(Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "col"))
        for local, hf in layers:
            params += _layer(shape, layout, f"decoder.layers.{local}", hf)
        if s == last:
            params.append(Param("decoder.final_layernorm.weight", ("model.norm.weight",), "rep"))
            if not shape.tied:
                params.append(Param("output_layer.weight", ("lm_head.weight",), "col"))
            elif layout.pp > 1:  # the last stage keeps its own copy of a tied embedding
                params.append(Param("output_layer.weight", ("model.embed_tokens.weight",), "col"))
            if layout.mtp_num_layers and layout.pp > 1:
                params.append(
                    Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "col")
                )
            for i in range(layout.mtp_num_layers):
                params += _mtp_layer(shape, layout, i, plan.aliases)
        plan.stages.append(params)
    return plan


def _mtp_layer(shape: ModelShape, layout: Layout, i: int, aliases: dict) -> list:
    h, m = f"model.layers.{shape.num_layers + i}", f"mtp.layers.{i}"
    aliases[f"{h}.embed_tokens.weight"] = "model.embed_tokens.weight"
    aliases[f"{h}.shared_head.head.weight"] = "model.embed_tokens.weight" if shape.tied else "lm_head.weight"
    return [
        Param(f"{m}.enorm.weight", (f"{h}.enorm.weight",), "rep"),
        Param(f"{m}.hnorm.weight", (f"{h}.hnorm.weight",), "rep"),
        Param(f"{m}.eh_proj.weight", (f"{h}.eh_proj.weight",), "col"),
        *_layer(shape, layout, f"{m}.transformer_layer", shape.num_layers + i),
        Param(f"{m}.final_layernorm.weight", (f"{h}.shared_head.norm.weight",), "rep"),
    ]


def _layer(shape: ModelShape, layout: Layout, m: str, n: int) -> list:
    h = f"model.layers.{n}"
    a, sa = f"{h}.self_attn", f"{m}.self_attention"
    out = [
        Param(f"{m}.input_layernorm.weight", (f"{h}.input_layernorm.weight",), "rep"),
        Param(f"{m}.pre_mlp_layernorm.weight", (f"{h}.post_attention_layernorm.weight",), "rep"),
        Param(f"{sa}.linear_proj.weight", (f"{a}.o_proj.weight",), "row"),
    ]
    if shape.deepseek:
        kv_a_rows = shape.kv_lora_rank + shape.qk_rope_dim
        if shape.q_lora_rank:
            out += [
                Param(
                    f"{sa}.linear_qkv.weight",
                    (f"{a}.q_a_proj.weight", f"{a}.kv_a_proj_with_mqa.weight"),
                    "cat",
                    sizes=(shape.q_lora_rank, kv_a_rows),
                ),
                Param(f"{sa}.q_layernorm.weight", (f"{a}.q_a_layernorm.weight",), "rep"),
                Param(f"{sa}.linear_qb.weight", (f"{a}.q_b_proj.weight",), "col"),
            ]
        else:  # DeepSeek-V2-Lite: no query compression
            out += [
                Param(f"{sa}.linear_q_proj.weight", (f"{a}.q_proj.weight",), "col"),
                Param(f"{sa}.linear_kv_down_proj.weight", (f"{a}.kv_a_proj_with_mqa.weight",), "rep"),
            ]
        out += [
            Param(f"{sa}.k_layernorm.weight", (f"{a}.kv_a_layernorm.weight",), "rep"),
            Param(f"{sa}.linear_kvb.weight", (f"{a}.kv_b_proj.weight",), "col"),
        ]
        if shape.indexer:  # replicated over TP, names of Megatron-core's DSA (as mbridge maps them)
            ix, hx = f"{sa}.core_attention.indexer", f"{a}.indexer"
            for mg, hf in [
                ("linear_wq_b", "wq_b"),
                ("linear_wk", "wk"),
                ("linear_weights_proj", "weights_proj"),
            ]:
                out.append(Param(f"{ix}.{mg}.weight", (f"{hx}.{hf}.weight",), "rep"))
            out += [Param(f"{ix}.k_norm.{w}", (f"{hx}.k_norm.{w}",), "rep") for w in ("weight", "bias")]
    else:
        g = shape.kv_heads
        sizes = (g, shape.heads * shape.head_dim, g * shape.head_dim)
        qkv = tuple(f"{a}.{p}_proj" for p in "qkv")
        out.append(Param(f"{sa}.linear_qkv.weight", tuple(f"{x}.weight" for x in qkv), "qkv", sizes=sizes))
        if shape.qkv_bias:
            out.append(Param(f"{sa}.linear_qkv.bias", tuple(f"{x}.bias" for x in qkv), "qkv", sizes=sizes))
        if shape.o_bias:
            out.append(Param(f"{sa}.linear_proj.bias", (f"{a}.o_proj.bias",), "rep"))
    mlp, hm = f"{m}.mlp", f"{h}.mlp"
    if n < shape.first_k_dense or not shape.deepseek or not shape.n_experts:
        return out + _ffn(mlp, hm)
    out.append(Param(f"{mlp}.router.weight", (f"{hm}.gate.weight",), "rep"))
    if shape.router_bias:
        out.append(Param(f"{mlp}.router.expert_bias", (f"{hm}.gate.e_score_correction_bias",), "rep"))
    if shape.n_shared_experts:
        out += _ffn(f"{mlp}.shared_experts", f"{hm}.shared_experts")
    E, tp, ep = shape.n_experts, layout.tp, layout.ep
    if layout.moe_grouped_gemm:
        for which in (1, 2):
            key = f"{mlp}.experts.weight{which}"
            out.append(
                GroupedExperts(key, f"{hm}.experts", which, E, shape.hidden, layout.moe_tp_extend_ep, ep, tp)
            )
        return out
    n_local = E // (ep * (tp if layout.moe_tp_extend_ep else 1))
    for e in range(E):
        g, j = divmod(e, n_local)
        ep_owner, tp_owner = (g // tp, g % tp) if layout.moe_tp_extend_ep else (g, None)
        for p in _ffn(f"{mlp}.experts.local_experts.{j}", f"{hm}.experts.{e}"):
            p.ep_owner, p.tp_owner, p.split_tp = ep_owner, tp_owner, not layout.moe_tp_extend_ep
            out.append(p)
    return out


def _ffn(m: str, h: str) -> list[Param]:
    return [
        Param(f"{m}.linear_fc1.weight", (f"{h}.gate_proj.weight", f"{h}.up_proj.weight"), "gate_up"),
        Param(f"{m}.linear_fc2.weight", (f"{h}.down_proj.weight",), "row"),
    ]
