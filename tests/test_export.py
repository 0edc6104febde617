"""mtpkit export / import-mtp: layouts, exact round trips, refusals and bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtpkit.cli import main
from mtpkit.decode.engine import SpeculativeDecoder
from mtpkit.export import ExportError, export_head
from mtpkit.export.checkpoint import CheckpointError, dequantize_fp8_blocks
from mtpkit.export.import_mtp import import_mtp
from mtpkit.heads import build_head, load_head, save_head
from mtpkit.models import load_target

PROMPT = [5, 9, 14, 20, 27, 33, 41, 5, 9, 14, 20]


@pytest.fixture(scope="module")
def deepseek():
    return load_target("tiny-deepseek_v3")


@pytest.fixture(scope="module")
def ds_head(deepseek, tmp_path_factory):
    """A D=2 MTP head on tiny DeepSeek-V3 (MLA + MoE block), with non-trivial norms."""
    torch.manual_seed(0)
    head = build_head(deepseek, "mtp", {"num_depths": 2, "train_depths": 4})
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    path = save_head(head, tmp_path_factory.mktemp("ds") / "head", deepseek)
    return head, path


def _drafts(target, head, k=4):
    engine = SpeculativeDecoder(target, head, k=k, draft_dtype=torch.float32)
    drafts: list[list[int]] = []
    draft = engine._draft
    engine._draft = lambda ids: drafts.append(draft(ids)) or drafts[-1]
    result = engine.generate(PROMPT, 12, eos_ids=[])
    return [d[0] for d in drafts], result.tokens


def test_vllm_mtp_layout(deepseek, ds_head, tmp_path):
    head, path = ds_head
    out = export_head(path, "vllm-mtp", tmp_path / "vllm", k=4)
    config = json.loads((out / "config.json").read_text())
    L = deepseek.num_layers
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["num_hidden_layers"] == L and config["num_nextn_predict_layers"] == 2
    assert config["hidden_size"] == 64 and config["n_routed_experts"] == 8  # the full decoder config
    tensors = load_file(str(out / "model.safetensors"))
    assert {int(k.split(".")[2]) for k in tensors} == {L, L + 1}
    embed, lm_head = deepseek.embed_tokens.weight, deepseek.lm_head.weight
    for d in (0, 1):
        p = f"model.layers.{L + d}."
        assert torch.equal(tensors[p + "embed_tokens.weight"], embed)
        assert torch.equal(tensors[p + "shared_head.head.weight"], lm_head)
        assert torch.equal(tensors[p + "eh_proj.weight"], head.layers[d].eh_proj.weight)
        fused = head.layers[d].block.mlp.experts
        for e in range(8):  # transformers' fused experts, written per expert as checkpoints hold them
            gate_up = torch.cat(
                [
                    tensors[f"{p}mlp.experts.{e}.gate_proj.weight"],
                    tensors[f"{p}mlp.experts.{e}.up_proj.weight"],
                ]
            )
            assert torch.equal(gate_up, fused.gate_up_proj[e])
            assert torch.equal(tensors[f"{p}mlp.experts.{e}.down_proj.weight"], fused.down_proj[e])
    serve = (out / "SERVE.md").read_text()
    assert '"method": "mtp"' in serve and '"num_speculative_tokens": 4' in serve
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("fmt", ["vllm-mtp", "transformers", "native"])
def test_export_import_round_trip_is_exact(deepseek, ds_head, tmp_path, fmt):
    head, path = ds_head
    out = export_head(path, fmt, tmp_path / fmt, k=4)
    if fmt == "native":
        back = load_head(out, deepseek)
    else:
        summary = import_mtp(out, tmp_path / "imported")
        assert summary["mtp_layers"] == 2
        back = load_head(tmp_path / "imported", deepseek)
        assert back.cfg == head.cfg  # train_depths / zero_first_embedding come back from the export
    before, after = head.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _drafts(deepseek, back) == _drafts(deepseek, head)


def test_full_checkpoint_keeps_the_target_bit_exact(deepseek, ds_head, tmp_path):
    _, path = ds_head
    out = export_head(path, "transformers", tmp_path / "hf")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not (out / "model.safetensors").exists()  # the index must be what transformers reads
    reloaded = load_target(str(out))
    ref = deepseek.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in reloaded.model.state_dict().items())
    assert sum(f == "model-mtp.safetensors" for f in index.values()) == len(
        load_file(str(out / "model-mtp.safetensors"))
    )
    # Re-exporting on top of this checkpoint replaces its MTP layers instead of duplicating them.
    again = export_head(path, "transformers", tmp_path / "hf2", model=str(out))
    index2 = json.loads((again / "model.safetensors.index.json").read_text())["weight_map"]
    assert index2 == index
    base_keys = load_file(str(again / "model-base.safetensors"))
    assert not [k for k in base_keys if k.startswith(f"model.layers.{deepseek.num_layers}.")]


def test_refusals_explain_what_works(deepseek, ds_head, tiny_llama, tmp_path):
    llama_head = save_head(build_head(tiny_llama, "mtp", {"num_depths": 1}), tmp_path / "llama", tiny_llama)
    with pytest.raises(
        ExportError, match=r"'llama' model.*no Llama/Qwen2 MTP class.*--format native.*EAGLE-3"
    ):
        export_head(llama_head, "vllm-mtp", tmp_path / "x")
    with pytest.raises(ExportError, match="transformers.*'llama' model"):
        export_head(llama_head, "transformers", tmp_path / "x")
    _, path = ds_head
    with pytest.raises(ExportError, match=r"NEXTN loads exactly one MTP layer.*num_depths=2.*vllm-mtp"):
        export_head(path, "sglang-nextn", tmp_path / "x")
    with pytest.raises(ExportError, match=r"multiple of the number of MTP layers \(2\).*-k 2 or 4"):
        export_head(path, "vllm-mtp", tmp_path / "x", k=3)
    with pytest.raises(ExportError, match="unknown format 'vllm'"):
        export_head(path, "vllm", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_head(path, "native", tmp_path / "full")
    assert not (tmp_path / "x").exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    # A Llama MTP head still exports natively and measures with mtpkit.
    assert load_head(export_head(llama_head, "native", tmp_path / "n"), tiny_llama) is not None


def test_sglang_nextn_is_the_vllm_layout_for_one_layer(deepseek, tmp_path):
    path = save_head(
        build_head(deepseek, "mtp", {"num_depths": 1, "train_depths": 3}), tmp_path / "h", deepseek
    )
    sg = export_head(path, "sglang-nextn", tmp_path / "sg")
    vl = export_head(path, "vllm-mtp", tmp_path / "vl")
    a, b = load_file(str(sg / "model.safetensors")), load_file(str(vl / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    serve = (sg / "SERVE.md").read_text()
    assert "--speculative-algorithm NEXTN" in serve and "--speculative-num-steps 3" in serve
    assert "--speculative-eagle-topk 1 --speculative-num-draft-tokens 4" in serve


def test_import_refuses_bad_checkpoints(deepseek, tiny_llama, ds_head, tmp_path):
    plain = tmp_path / "plain"
    tiny_llama.model.save_pretrained(plain)
    tiny_llama.tokenizer.save_pretrained(plain)
    with pytest.raises(
        ExportError,
        match=r"no MTP layers — looked for tensors model\.layers\.N\.\* with N >= num_hidden_layers \(2\)",
    ):
        import_mtp(plain, tmp_path / "o")
    _, path = ds_head
    out = export_head(path, "transformers", tmp_path / "hf")
    shard = out / "model-mtp.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])  # cut short
    with pytest.raises(CheckpointError, match="model-mtp.safetensors"):
        import_mtp(out, tmp_path / "o")
    shard.unlink()
    with pytest.raises(CheckpointError, match="model-mtp.safetensors: shard listed in .* is missing"):
        import_mtp(out, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_fp8_block_dequantisation(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(200, 300)
    scale = torch.rand(2, 3) + 0.5  # one factor per 128 x 128 block, edge blocks partial
    expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    fp8 = (weight / expanded).to(torch.float8_e4m3fn)
    want = (fp8.float() * expanded).to(torch.bfloat16)
    assert torch.equal(dequantize_fp8_blocks(fp8, scale), want)
    assert (want.float() - weight).abs().max() < 0.1 * weight.abs().max()  # and it is the weight back
    with pytest.raises(CheckpointError, match=r"does not fit a 200x300 weight.*\(2, 3\)"):
        dequantize_fp8_blocks(fp8, scale[:1])
    # Through import: an FP8 MTP layer (layer 1 of a 1-layer model) comes out in bf16.
    ckpt = tmp_path / "fp8"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps({"num_hidden_layers": 1, "quantization_config": {"fmt": "e4m3"}})
    )
    save_file(
        {
            "model.layers.0.eh_proj.weight": torch.zeros(2, 2),
            "model.layers.1.eh_proj.weight": fp8,
            "model.layers.1.eh_proj.weight_scale_inv": scale,
            "model.layers.1.enorm.weight": torch.ones(4, dtype=torch.bfloat16),
        },
        str(ckpt / "model.safetensors"),
    )
    summary = import_mtp(ckpt, tmp_path / "raw", extract_only=True)
    assert summary["tensors"] == 2 and summary["mtp_layers"] == 1
    raw = load_file(str(tmp_path / "raw" / "model.safetensors"))
    assert set(raw) == {"model.layers.1.eh_proj.weight", "model.layers.1.enorm.weight"}
    assert torch.equal(raw["model.layers.1.eh_proj.weight"], want)
    assert "quantization_config" not in json.loads((tmp_path / "raw" / "config.json").read_text())


def test_cli_export_import_and_init_from(deepseek, ds_head, tmp_path, capsys):
    _, path = ds_head
    assert (
        main(
            [
                "export",
                "--head",
                str(path.parent),
                "--format",
                "vllm-mtp",
                "--out",
                str(tmp_path / "v"),
                "-k",
                "4",
            ]
        )
        == 0
    )
    assert main(["import-mtp", "--model", str(tmp_path / "v"), "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["target"] == "tiny-deepseek_v3"
    assert (
        main(["export", "--head", str(path), "--format", "sglang-nextn", "--out", str(tmp_path / "s")]) == 2
    )
    assert "NEXTN loads exactly one MTP layer" in capsys.readouterr().err
    # The imported head is what `mtpkit train --init-from` starts from.
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefg " * 100)
    argv = [
        "train",
        "--out",
        str(tmp_path / "ft"),
        "--init-from",
        str(tmp_path / "run"),
        "model=tiny-deepseek_v3",
    ]
    argv += [f"data.online.prompts=[{corpus}]", "data.online.mode=corpus", "data.online.sample_size=24"]
    argv += ["max_steps=1", "eval_every=1", "save_every=1", "progress=false", "optim.lr=0"]
    assert main(argv) == 0
    tuned = load_head(tmp_path / "ft" / "head", deepseek).state_dict()
    start = load_head(tmp_path / "run", deepseek).state_dict()
    assert all(torch.equal(tuned[k], start[k]) for k in start)  # lr 0: the imported weights, untouched
