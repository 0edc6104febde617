"""`mtpkit convert`: HF ⇄ Megatron per-rank layouts, re-sharding, LoRA merges, bad input.

Round trips prove reversibility; the per-rank forward tests prove the split *semantics*: a layer
computed rank by rank from the shards, the way Megatron computes it, equals the full HF layer.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from mtpkit.cli import main
from mtpkit.convert.hf import HFReader
from mtpkit.convert.layout import ConvertError, Layout, Param
from mtpkit.convert.lora import LoraAdapter
from mtpkit.convert.megatron import META, TRACKER, load_rank
from mtpkit.convert.reshard import hf_to_hf, hf_to_sharded, sharded_to_hf, sharded_to_sharded
from mtpkit.models.tiny import TINY_CONFIGS, build_tiny

H = 64


def _save_with_mtp(model, path) -> None:
    """The tiny DeepSeek-V3 plus one MTP layer (model.layers.3.*) laid out as DeepSeek's HF release."""
    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    L = model.config.num_hidden_layers
    for k in [k for k in sd if k.startswith(f"model.layers.{L - 1}.")]:
        sd[k.replace(f"layers.{L - 1}.", f"layers.{L}.")] = sd[k] + torch.randn(sd[k].shape, generator=g)
    for name, shape in [("enorm", [H]), ("hnorm", [H]), ("eh_proj", [H, 2 * H]), ("shared_head.norm", [H])]:
        sd[f"model.layers.{L}.{name}.weight"] = torch.randn(shape, generator=g)
    sd[f"model.layers.{L}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    sd[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam in ("llama", "qwen2", "deepseek_v3"):
        model, tok = build_tiny(fam)
        path = root / fam
        model.save_pretrained(path)
        tok.save_pretrained(path)
        if fam == "deepseek_v3":
            _save_with_mtp(model, path)
        out[fam] = path
    # DeepSeek-V3.2: V3 plus the sparse-attention indexer in every layer (MTP layer included)
    fields = dict(TINY_CONFIGS["deepseek_v3"], index_n_heads=4, index_head_dim=16)
    fields.pop("model_type")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        v32 = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v32", **fields))
    v32.save_pretrained(root / "deepseek_v32")
    _save_with_mtp(v32, root / "deepseek_v32")
    out["deepseek_v32"] = root / "deepseek_v32"
    tied = root / "llama-tied"  # tie_word_embeddings: no lm_head; the last PP stage keeps a copy
    shutil.copytree(out["llama"], tied)
    sd = load_file(str(tied / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(tied / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    out["llama-tied"] = tied
    return out


def assert_same_hf(a, b) -> None:
    ra, rb = HFReader(a), HFReader(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for n in ra.names():
        x, y = ra.get(n), rb.get(n)
        assert x.dtype == y.dtype and torch.equal(x, y), n


def rank_files(root):
    return {
        p.parent.name: load_rank(p.parent)[0]
        for p in sorted(root.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    }


def assert_same_ranks(a, b) -> None:
    fa, fb = rank_files(a), rank_files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert sorted(fa[name]) == sorted(fb[name]), name
        for k in fa[name]:
            assert torch.equal(fa[name][k], fb[name][k]), (name, k)


# ---- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", ["llama", "qwen2", "llama-tied"])
def test_roundtrip_dense_bit_exact(hf_dirs, tmp_path, fam):
    for tp, pp in itertools.product([1, 2], [1, 2]):
        sh, back = tmp_path / f"sh{tp}{pp}", tmp_path / f"back{tp}{pp}"
        hf_to_sharded(hf_dirs[fam], sh, Layout(tp=tp, pp=pp))
        sharded_to_hf(sh, back)
        assert_same_hf(hf_dirs[fam], back)
    # the config and tokenizer travel with the weights
    assert json.loads((back / "config.json").read_text())["model_type"] == fam.split("-")[0]
    assert (back / "tokenizer.json").is_file()
    if fam == "llama-tied":
        last = load_rank(tmp_path / "sh22" / "iter_0000001" / "mp_rank_01_001")[0]
        emb = HFReader(hf_dirs[fam]).get("model.embed_tokens.weight")
        assert torch.equal(last["output_layer.weight"], emb.chunk(2, 0)[1])
    with pytest.raises(ConvertError, match="--tp 4 does not divide num_key_value_heads=2"):
        hf_to_sharded(hf_dirs[fam], tmp_path / "bad", Layout(tp=4))


def test_roundtrip_deepseek_all_layouts_bit_exact(hf_dirs, tmp_path):
    """Every tp ∈ {1,2,4} × pp ∈ {1,2} × ep ∈ {1,2,4} × (local | grouped GEMM), MTP layer included."""
    src = hf_dirs["deepseek_v3"]
    for n, (tp, pp, ep, grouped) in enumerate(itertools.product([1, 2, 4], [1, 2], [1, 2, 4], [False, True])):
        stages = (
            dict(num_layer_list=[1, 2]) if pp == 2 and tp != 2 else dict(noop_layers=[0] if pp == 2 else None)
        )
        lay = Layout(tp=tp, pp=pp, ep=ep, moe_grouped_gemm=grouped, mtp_num_layers=-1, **stages)
        sh, back = tmp_path / f"sh{n}", tmp_path / f"back{n}"
        hf_to_sharded(src, sh, lay)
        last = max((sh / "iter_0000001").iterdir())  # highest tp, pp, ep: the last stage holds the MTP layer
        assert any(k.startswith("mtp.layers.0.transformer_layer.") for k in load_rank(last)[0])
        sharded_to_hf(sh, back)
        assert_same_hf(src, back)
        shutil.rmtree(sh)
        shutil.rmtree(back)
    # moe-tp-extend-ep: the 8 experts are split over tp*ep = 8 ranks
    for grouped in (False, True):
        lay = Layout(tp=2, ep=4, moe_tp_extend_ep=True, moe_grouped_gemm=grouped, mtp_num_layers=-1)
        hf_to_sharded(src, tmp_path / f"x{grouped}", lay)
        sharded_to_hf(tmp_path / f"x{grouped}", tmp_path / f"xb{grouped}")
        assert_same_hf(src, tmp_path / f"xb{grouped}")


def test_mtp_layer_names_and_shared_embedding(hf_dirs, tmp_path):
    src = hf_dirs["deepseek_v3"]
    hf_to_sharded(src, tmp_path / "s", Layout(tp=2, pp=2, ep=2, num_layer_list=[2, 1], mtp_num_layers=1))
    files = rank_files(tmp_path / "s")
    assert sorted(files) == [
        f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)
    ]
    last, first = files["mp_rank_01_001_000"], files["mp_rank_01_000_000"]
    emb = HFReader(src).get("model.embed_tokens.weight")
    # PP > 1: the last stage holds its own vocab-parallel copy of the embedding for the MTP layer
    assert torch.equal(last["embedding.word_embeddings.weight"], emb.chunk(2, 0)[1])
    assert torch.equal(first["embedding.word_embeddings.weight"], emb.chunk(2, 0)[1])
    eh = HFReader(src).get("model.layers.3.eh_proj.weight")
    assert torch.equal(last["mtp.layers.0.eh_proj.weight"], eh.chunk(2, 0)[1])
    assert "mtp.layers.0.final_layernorm.weight" in last and "decoder.final_layernorm.weight" in last
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in last  # 8 experts / ep 2
    # dropping the MTP layer is explicit, and the written config says so
    sharded_to_hf(tmp_path / "s", tmp_path / "nomtp", mtp_num_layers=0)
    assert "model.layers.3.eh_proj.weight" not in HFReader(tmp_path / "nomtp").names()
    assert json.loads((tmp_path / "nomtp" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_sharded_to_sharded_equals_direct(hf_dirs, tmp_path):
    src = hf_dirs["deepseek_v3"]
    big = Layout(tp=4, pp=2, ep=2, num_layer_list=[1, 2], moe_grouped_gemm=True, mtp_num_layers=-1)
    hf_to_sharded(src, tmp_path / "big", big)
    for name, target in {
        "tp1": Layout(mtp_num_layers=-1),  # TP 4 -> 1, EP 2 -> 1, PP 2 -> 1 (extract-the-MTP-layer case)
        "tp2pp2": Layout(tp=2, pp=2, ep=4, noop_layers=[3], mtp_num_layers=-1),
        "extend": Layout(tp=2, ep=2, moe_tp_extend_ep=True, moe_grouped_gemm=True, mtp_num_layers=-1),
    }.items():
        sharded_to_sharded(tmp_path / "big", tmp_path / f"re-{name}", target)
        hf_to_sharded(src, tmp_path / f"direct-{name}", target)
        assert_same_ranks(tmp_path / f"re-{name}", tmp_path / f"direct-{name}")
    for fam in ("llama", "qwen2"):
        hf_to_sharded(hf_dirs[fam], tmp_path / f"{fam}2", Layout(tp=2, pp=2))
        sharded_to_sharded(tmp_path / f"{fam}2", tmp_path / f"{fam}1", Layout())
        hf_to_sharded(hf_dirs[fam], tmp_path / f"{fam}d", Layout())
        assert_same_ranks(tmp_path / f"{fam}1", tmp_path / f"{fam}d")


def test_deepseek_v32_tp16_style_reshard_to_tp1_then_mtp_to_hf(hf_dirs, tmp_path):
    """The DeepSeek-V3.2 MTP fine-tuning flow: a TP-sharded training checkpoint re-sharded to TP=1, then
    the MTP layer read out; the indexer travels replicated."""
    src = hf_dirs["deepseek_v32"]
    hf_to_sharded(src, tmp_path / "tp4", Layout(tp=4, pp=2, ep=2, noop_layers=[3], mtp_num_layers=-1))
    shard = load_rank(tmp_path / "tp4" / "iter_0000001" / "mp_rank_03_001_001")[0]
    wq_b = HFReader(src).get("model.layers.3.self_attn.indexer.wq_b.weight")
    assert torch.equal(
        shard["mtp.layers.0.transformer_layer.self_attention.core_attention.indexer.linear_wq_b.weight"], wq_b
    )
    sharded_to_sharded(tmp_path / "tp4", tmp_path / "tp1", Layout(mtp_num_layers=-1))
    hf_to_sharded(src, tmp_path / "direct", Layout(mtp_num_layers=-1))
    assert_same_ranks(tmp_path / "tp1", tmp_path / "direct")
    sharded_to_hf(tmp_path / "tp1", tmp_path / "back")
    assert_same_hf(src, tmp_path / "back")


def test_foreign_checkpoint_layout_inferred_and_mindspeed_names_read(hf_dirs, tmp_path):
    """No mtpkit metadata: tp/pp/ep from the directory names, stage sizes, grouped GEMM and MTP from keys."""
    src = hf_dirs["deepseek_v3"]
    hf_to_sharded(
        src,
        tmp_path / "s",
        Layout(tp=2, pp=2, ep=2, num_layer_list=[2, 1], moe_grouped_gemm=True, mtp_num_layers=1),
    )
    (tmp_path / "s" / META).unlink()
    shutil.rmtree(tmp_path / "s" / "hf_meta")
    for f in (tmp_path / "s").glob(
        "iter_*/mp_rank_??_001_???/model_optim_rng.pt"
    ):  # MindSpeed's older MTP names
        ckpt = torch.load(f, weights_only=False)
        m = ckpt["model"]
        m["mtp.final_layernorms.0.weight"] = m.pop("mtp.layers.0.final_layernorm.weight")
        m["final_layernorm.weight"] = m.pop("decoder.final_layernorm.weight")
        torch.save(ckpt, f)
    with pytest.raises(ConvertError, match="pass --hf-config"):
        sharded_to_hf(tmp_path / "s", tmp_path / "b")
    sharded_to_hf(tmp_path / "s", tmp_path / "b", hf_config=src)
    assert_same_hf(src, tmp_path / "b")
    # Megatron-LM's Transformer-Engine spec names the pre-norms after the linear they are fused into
    hf_to_sharded(hf_dirs["llama"], tmp_path / "te", Layout(tp=2, pp=2))
    (tmp_path / "te" / META).unlink()
    for f in (tmp_path / "te").glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        ckpt = torch.load(f, weights_only=False)
        ckpt["model"] = {
            k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight").replace(
                "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"
            ): v
            for k, v in ckpt["model"].items()
        }
        torch.save(ckpt, f)
    sharded_to_hf(tmp_path / "te", tmp_path / "te-back", hf_config=hf_dirs["llama"])
    assert_same_hf(hf_dirs["llama"], tmp_path / "te-back")


def test_dcp_roundtrip_and_to_megatron(hf_dirs, tmp_path):
    src = hf_dirs["deepseek_v3"]
    hf_to_sharded(src, tmp_path / "d", Layout(mtp_num_layers=-1), fmt="dcp")
    sharded_to_hf(tmp_path / "d", tmp_path / "b")
    assert_same_hf(src, tmp_path / "b")
    lay = Layout(tp=2, ep=2, mtp_num_layers=-1)
    sharded_to_sharded(tmp_path / "d", tmp_path / "m", lay)
    hf_to_sharded(src, tmp_path / "direct", lay)
    assert_same_ranks(tmp_path / "m", tmp_path / "direct")


# ---- split semantics -------------------------------------------------------------------------------


def test_split_rules_on_tensors_that_encode_their_origin():
    # q rows 100.., k rows 200.., v rows 300..; 4 heads in 2 groups, head_dim 1, TP 2.
    q, k, v = (
        torch.arange(n, dtype=torch.float32)[:, None] + base for n, base in [(4, 100), (2, 200), (2, 300)]
    )
    p = Param("qkv", ("q", "k", "v"), "qkv", sizes=(2, 4, 2))
    get = {"q": q, "k": k, "v": v}.__getitem__
    ranks = [p.shard(r, 2, get).flatten().tolist() for r in range(2)]
    assert ranks == [[100, 101, 200, 300], [102, 103, 201, 301]]  # per group: its queries, its key, its value
    gu = Param("fc1", ("g", "u"), "gate_up")
    g, u = torch.arange(4.0)[:, None] + 10, torch.arange(4.0)[:, None] + 20
    get = {"g": g, "u": u}.__getitem__
    assert [gu.shard(r, 2, get).flatten().tolist() for r in range(2)] == [[10, 11, 20, 21], [12, 13, 22, 23]]
    row = Param("o", ("o",), "row")
    o = torch.arange(8.0).view(2, 4)
    assert row.shard(1, 2, {"o": o}.__getitem__).tolist() == [[2, 3], [6, 7]]


def _per_rank_attention(module_cls, config, weights: dict, x, pos_emb):
    attn = module_cls(config, layer_idx=0)
    attn.load_state_dict(weights)
    return attn(x, position_embeddings=pos_emb, attention_mask=None)[0]


def test_llama_layer_from_tp_shards_equals_full_layer(hf_dirs, tmp_path):
    """Megatron's per-rank computation (local unfusing of linear_qkv, swiglu chunking of fc1, row-parallel
    partial sums) on the written shards reproduces the HF layer."""
    model, _ = build_tiny("qwen2")
    layer = model.model.layers[1]
    tp = 2
    hf_to_sharded(hf_dirs["qwen2"], tmp_path / "s", Layout(tp=tp))
    shards = [load_rank(tmp_path / "s" / "iter_0000001" / f"mp_rank_{r:02d}")[0] for r in range(tp)]
    x = torch.randn(1, 7, H)
    pos = model.model.rotary_emb(x, torch.arange(7)[None])
    cfg = copy.deepcopy(model.config)
    d, G = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads // tp
    qpg = cfg.num_attention_heads // cfg.num_key_value_heads
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = cfg.num_attention_heads // tp, G, d
    attn_sum, mlp_sum = 0, 0
    for sd in shards:
        a = "decoder.layers.1.self_attention."
        qkv = sd[a + "linear_qkv.weight"].view(G, qpg + 2, d, H)
        bias = sd[a + "linear_qkv.bias"].view(G, qpg + 2, d)
        w = {
            "q_proj.weight": qkv[:, :qpg].reshape(-1, H),
            "k_proj.weight": qkv[:, qpg].reshape(-1, H),
            "v_proj.weight": qkv[:, qpg + 1].reshape(-1, H),
            "q_proj.bias": bias[:, :qpg].reshape(-1),
            "k_proj.bias": bias[:, qpg].reshape(-1),
            "v_proj.bias": bias[:, qpg + 1].reshape(-1),
            "o_proj.weight": sd[a + "linear_proj.weight"],
        }
        attn_sum = attn_sum + _per_rank_attention(type(layer.self_attn), cfg, w, x, pos)
        h = x @ sd["decoder.layers.1.mlp.linear_fc1.weight"].T
        gate, up = h.chunk(2, -1)
        mlp_sum = mlp_sum + (F.silu(gate) * up) @ sd["decoder.layers.1.mlp.linear_fc2.weight"].T
    with torch.no_grad():
        full_attn = layer.self_attn(x, position_embeddings=pos, attention_mask=None)[0]
        torch.testing.assert_close(attn_sum, full_attn, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mlp_sum, layer.mlp(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extend", [False, True])
def test_deepseek_layer_from_shards_equals_full_layer(hf_dirs, tmp_path, extend):
    """MLA attention (replicated linear_qkv, column-split q_b/kv_b, row-split o_proj), shared experts and
    grouped-GEMM routed experts computed per (tp, ep) rank equal the HF computation."""
    model, _ = build_tiny("deepseek_v3")
    layer = model.model.layers[1]
    tp, ep = 2, 2
    E = model.config.n_routed_experts
    hf_to_sharded(
        hf_dirs["deepseek_v3"],
        tmp_path / "s",
        Layout(tp=tp, ep=ep, moe_grouped_gemm=True, moe_tp_extend_ep=extend),
    )
    shard = {
        (t, e): load_rank(tmp_path / "s" / "iter_0000001" / f"mp_rank_{t:02d}_{e:03d}")[0]
        for t in range(tp)
        for e in range(ep)
    }
    x = torch.randn(1, 5, H)
    pos = model.model.rotary_emb(x, torch.arange(5)[None])
    cfg = copy.deepcopy(model.config)
    cfg.num_attention_heads //= tp
    cfg.num_key_value_heads = cfg.num_attention_heads
    m = "decoder.layers.1."
    attn_sum, shared_sum = 0, 0
    for t in range(tp):
        sd = shard[(t, 0)]
        q_a, kv_a = sd[m + "self_attention.linear_qkv.weight"].split([cfg.q_lora_rank, cfg.kv_lora_rank + 8])
        w = {
            "q_a_proj.weight": q_a,
            "kv_a_proj_with_mqa.weight": kv_a,
            "q_a_layernorm.weight": sd[m + "self_attention.q_layernorm.weight"],
            "kv_a_layernorm.weight": sd[m + "self_attention.k_layernorm.weight"],
            "q_b_proj.weight": sd[m + "self_attention.linear_qb.weight"],
            "kv_b_proj.weight": sd[m + "self_attention.linear_kvb.weight"],
            "o_proj.weight": sd[m + "self_attention.linear_proj.weight"],
        }
        attn_sum = attn_sum + _per_rank_attention(type(layer.self_attn), cfg, w, x, pos)
        gate, up = (x @ sd[m + "mlp.shared_experts.linear_fc1.weight"].T).chunk(2, -1)
        shared_sum = shared_sum + (F.silu(gate) * up) @ sd[m + "mlp.shared_experts.linear_fc2.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(
            attn_sum,
            layer.self_attn(x, position_embeddings=pos, attention_mask=None)[0],
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(shared_sum, layer.mlp.shared_experts(x), atol=1e-5, rtol=1e-5)
    # routed experts as Megatron's GroupedMLP computes them: weight1.view(E_local, H, -1)[j], ...
    hf = HFReader(hf_dirs["deepseek_v3"])
    for e in range(E):
        pre = f"model.layers.1.mlp.experts.{e}."
        g, u, dn = (hf.get(pre + n + ".weight") for n in ("gate_proj", "up_proj", "down_proj"))
        ref = (F.silu(x @ g.T) * (x @ u.T)) @ dn.T
        if extend:  # expert e lives whole on global rank e // (E / (tp*ep)) = ep_rank * tp + tp_rank
            n_local = E // (tp * ep)
            owners = [((e // n_local) % tp, (e // n_local) // tp)]
        else:  # expert e lives on EP rank e // (E / ep), its width split over every TP rank
            n_local = E // ep
            owners = [(t, e // n_local) for t in range(tp)]
        out = 0
        for t, r in owners:
            w1 = shard[(t, r)][m + "mlp.experts.weight1"].view(n_local, H, -1)[e % n_local]
            w2 = shard[(t, r)][m + "mlp.experts.weight2"].view(n_local, -1, H)[e % n_local]
            gate, up = (x @ w1).chunk(2, -1)
            out = out + (F.silu(gate) * up) @ w2
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- LoRA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_llama(hf_dirs, tmp_path_factory):
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lora")
    base, _ = build_tiny("llama")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj", "embed_tokens"],
        init_lora_weights=False,  # random A and B, so the merge is not a no-op
        rank_pattern={"down_proj": 2},
    )
    torch.manual_seed(3)
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(root / "adapter")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        logits = pm(ids).logits
        merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return root / "adapter", merged, ids, logits


def test_lora_merge_equals_peft_merge_and_unload(hf_dirs, peft_llama, tmp_path):
    adapter_dir, merged, _, _ = peft_llama
    adapter = LoraAdapter.from_peft_dir(adapter_dir)
    hf_to_hf(hf_dirs["llama"], tmp_path / "m", lora=adapter)
    r = HFReader(tmp_path / "m")
    for name in r.names():
        assert torch.equal(r.get(name), merged[name]), name
    changed = [n for n in r.names() if not torch.equal(r.get(n), HFReader(hf_dirs["llama"]).get(n))]
    assert len(changed) == 2 * 4 + 1  # q, v, gate, down in 2 layers + the embedding
    # the same merge applied to sharded weights (gathered, merged, re-split), then back to HF
    hf_to_sharded(hf_dirs["llama"], tmp_path / "s", Layout(tp=2, pp=2))
    sharded_to_hf(tmp_path / "s", tmp_path / "m2", lora=adapter)
    assert_same_hf(tmp_path / "m", tmp_path / "m2")


def test_adapter_export_from_combined_checkpoint_is_read_by_peft(hf_dirs, peft_llama, tmp_path):
    peft = pytest.importorskip("peft")
    adapter_dir, merged, ids, logits = peft_llama
    combined = tmp_path / "combined"
    shutil.copytree(hf_dirs["llama"], combined)
    sd = load_file(str(combined / "model.safetensors"))
    for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        sd[k.removeprefix("base_model.model.")] = v  # base + LoRA tensors side by side
    save_file(sd, str(combined / "model.safetensors"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (
        main(["convert", "export-adapter", str(combined), str(tmp_path / "a"), "--lora-r", "4"]) == 2
    )  # no alpha
    shutil.copy(adapter_dir / "adapter_config.json", combined)
    assert main(["convert", "export-adapter", str(combined), str(tmp_path / "a")]) == 0
    base, _ = build_tiny("llama")
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, logits, atol=0, rtol=0)
    assert (
        json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"]
        == cfg["rank_pattern"]
    )
    # merge-lora finds the LoRA tensors inside the checkpoint by itself
    assert main(["convert", "merge-lora", str(combined), str(tmp_path / "m")]) == 0
    r = HFReader(tmp_path / "m")
    assert all(torch.equal(r.get(n), merged[n]) for n in r.names())


def test_qlora_nf4_base_is_dequantized_before_merge(hf_dirs, peft_llama, tmp_path, monkeypatch):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    adapter_dir, _, _, _ = peft_llama
    q = tmp_path / "nf4"
    shutil.copytree(hf_dirs["llama"], q)
    sd, deq = load_file(str(q / "model.safetensors")), {}
    for k in [k for k in sd if k.endswith("_proj.weight")]:  # as transformers saves a 4-bit model
        packed, state = bnbf.quantize_4bit(sd[k], quant_type="nf4", blocksize=64)
        sd[k] = packed
        sd.update({f"{k}.{n}": v for n, v in state.as_dict(packed=True).items()})
        deq[k] = bnbf.dequantize_4bit(packed, state)
    save_file(sd, str(q / "model.safetensors"))
    adapter = LoraAdapter.from_peft_dir(adapter_dir)
    hf_to_hf(q, tmp_path / "m", lora=adapter)
    name = "model.layers.0.self_attn.q_proj.weight"
    want = deq[name] + adapter.delta("model.layers.0.self_attn.q_proj")
    assert torch.equal(HFReader(tmp_path / "m").get(name), want)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes.functional", None)
    with pytest.raises(ConvertError, match="bitsandbytes 4-bit .QLoRA. weight; install bitsandbytes"):
        hf_to_hf(q, tmp_path / "m2", lora=adapter)
    assert not (tmp_path / "m2").exists()


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_layouts_fail_before_writing(hf_dirs, tmp_path):
    ds, out = hf_dirs["deepseek_v3"], tmp_path / "out"
    cases = [
        (
            Layout(pp=2, num_layer_list=[1, 1]),
            "num-layer-list 1,1 sums to 2 but the model has 3 decoder layers",
        ),
        (Layout(pp=2), "--pp 2 does not divide the layer count 3"),
        (Layout(pp=2, num_layer_list=[1, 2], noop_layers=[3]), "mutually exclusive"),
        (Layout(tp=3), "--tp 3 does not divide the vocabulary size 320"),
        (Layout(ep=3), "--ep 3 does not divide n_routed_experts=8"),
        (Layout(tp=4, ep=4, moe_tp_extend_ep=True), r"--ep 4 x --tp 4 \(moe-tp-extend-ep\) does not divide"),
        (Layout(mtp_num_layers=2), "holds 1 MTP layer"),
    ]
    for layout, msg in cases:
        with pytest.raises(ConvertError, match=msg):
            hf_to_sharded(ds, out, layout)
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(ConvertError, match="--tp 8 does not divide num_attention_heads=4"):
        hf_to_sharded(hf_dirs["llama"], out, Layout(tp=8))
    with pytest.raises(ConvertError, match="first-k-dense-replace 2: .* says 1"):
        hf_to_sharded(ds, out, Layout(), first_k_dense=2)
    fp8 = tmp_path / "fp8"  # DeepSeek's FP8 release: block scales beside the weights
    shutil.copytree(ds, fp8)
    save_file(
        {"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1)},
        str(fp8 / "scales.safetensors"),
    )
    with pytest.raises(ConvertError, match="FP8 block-quantized weights .* dequantize to bf16 first"):
        hf_to_sharded(fp8, out, Layout())
    assert not out.exists()


def test_bad_sharded_inputs(hf_dirs, tmp_path):
    hf_to_sharded(hf_dirs["llama"], tmp_path / "s", Layout(tp=2, pp=2))
    hf_to_sharded(hf_dirs["llama"], tmp_path / "s", Layout(tp=2, pp=2), overwrite=True)
    with pytest.raises(ConvertError, match="already exists"):
        hf_to_sharded(hf_dirs["llama"], tmp_path / "s", Layout())
    s2 = tmp_path / "missing"
    shutil.copytree(tmp_path / "s", s2)
    shutil.rmtree(s2 / "iter_0000001" / "mp_rank_01_001")
    with pytest.raises(ConvertError, match=r"mp_rank_01_001 is missing \(layout tp=2 pp=2 ep=1\)"):
        sharded_to_hf(s2, tmp_path / "o")
    s3 = tmp_path / "iter"
    shutil.copytree(tmp_path / "s", s3)
    (s3 / TRACKER).write_text("7\n")
    with pytest.raises(ConvertError, match=r"iter_0000007 does not exist .*found: \['iter_0000001'\]"):
        sharded_to_hf(s3, tmp_path / "o")
    f = s3 / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt"
    ckpt = torch.load(f, weights_only=False)
    ckpt["iteration"] = 5
    torch.save(ckpt, f)
    with pytest.raises(ConvertError, match="holds iteration 5, but iter_0000001 was requested"):
        sharded_to_hf(s3, tmp_path / "o", iteration=1)
    with pytest.raises(
        ConvertError, match=r"mp_rank_00_000: does not match the layout .* num_layer_list=\[2, 0\]"
    ):
        sharded_to_hf(tmp_path / "s", tmp_path / "o", {"num_layer_list": [2, 0]})
    with pytest.raises(ConvertError, match="4 rank directories, but tp=1 pp=2 ep=1 means 2"):
        sharded_to_hf(tmp_path / "s", tmp_path / "o", {"tp": 1})
    assert not (tmp_path / "o").exists()


def test_cli_roundtrip_and_errors(hf_dirs, tmp_path, capsys):
    src = str(hf_dirs["deepseek_v3"])
    sh, back = str(tmp_path / "sh"), str(tmp_path / "back")
    args = ["--tp", "2", "--pp", "2", "--ep", "2", "--noop-layers", "0", "--moe-grouped-gemm"]
    assert main(["convert", "hf-to-sharded", src, sh, *args]) == 0
    assert main(["convert", "sharded-to-hf", sh, back, "--max-shard-size", "300KB"]) == 0
    assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1
    assert_same_hf(src, back)
    ids = torch.randint(0, 300, (1, 11))
    with torch.no_grad():  # logits parity of the model transformers loads from the converted directory
        want = build_tiny("deepseek_v3")[0](ids).logits
        got = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)
    assert main(["convert", "sharded-to-sharded", sh, str(tmp_path / "tp1"), "--iteration", "500"]) == 0
    assert (tmp_path / "tp1" / "iter_0000500" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert (tmp_path / "tp1" / TRACKER).read_text().strip() == "500"
    capsys.readouterr()
    assert (
        main(["convert", "hf-to-sharded", src, str(tmp_path / "x"), "--pp", "2", "--num-layer-list", "2,2"])
        == 2
    )
    assert "num-layer-list 2,2 sums to 4 but the model has 3 decoder layers" in capsys.readouterr().err
