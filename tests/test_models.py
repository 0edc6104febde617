from __future__ import annotations

import time

import pytest
import torch

from mtpkit.models import TargetLoadError, load_target
from mtpkit.models.loader import cache_dir, embedded_gguf_path

FAMILIES = {
    "llama": "LlamaDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "deepseek_v3": "DeepseekV3DecoderLayer",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_is_deterministic_and_exposes_the_view(family):
    a, b = load_target(f"tiny-{family}", seed=3), load_target(f"tiny-{family}", seed=3)
    other = load_target(f"tiny-{family}", seed=4)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.identity() == b.identity()
    assert a.identity()["weights_hash"] != other.identity()["weights_hash"]
    assert a.identity()["config_hash"] == other.identity()["config_hash"]

    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert a.embed_tokens is a.model.model.embed_tokens
    assert a.final_norm is a.model.model.norm
    assert a.lm_head is a.model.lm_head
    assert a.decoder_layer_cls.__name__ == FAMILIES[family]
    assert a.num_layers == len(a.model.model.layers)
    if family == "deepseek_v3":  # MLA + MoE: the MTP block must be a MoE layer
        assert type(a.model.model.layers[-1].mlp).__name__ == "DeepseekV3MoE"
        assert hasattr(a.model.model.layers[-1].self_attn, "kv_a_proj_with_mqa")


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_state_layer_ids_follow_hf_indexing(family):
    target = load_target(f"tiny-{family}")
    ids = torch.randint(3, 200, (2, 9))
    L = target.num_layers
    h = target.hidden_states(ids, layers=[0, 1, L])
    assert h.shape == (2, 9, 3, target.hidden_size)
    with torch.no_grad():
        ref = target.model(ids, output_hidden_states=True)
        out = target.model.model(ids)
    assert torch.equal(h[:, :, 0], ref.hidden_states[0])  # embeddings
    assert torch.equal(h[:, :, 1], ref.hidden_states[1])  # after decoder layer 1
    assert torch.equal(h[:, :, 2], out.last_hidden_state)  # final, post-norm
    # The final hidden state is what the LM head reads.
    torch.testing.assert_close(target.lm_head(h[:, :, 2]), ref.logits)
    with pytest.raises(ValueError, match="out of range"):
        target.hidden_states(ids, layers=[L + 1])


def test_hf_directory_sharded_and_not(tmp_path, tiny_llama):
    ids = torch.randint(3, 200, (1, 7))
    with torch.no_grad():
        ref = tiny_llama.model(ids).logits
    for name, shard in [("single", "50GB"), ("sharded", "100KB")]:
        out = tmp_path / name
        tiny_llama.model.save_pretrained(out, max_shard_size=shard)
        tiny_llama.tokenizer.save_pretrained(out)
        if name == "sharded":
            assert (out / "model.safetensors.index.json").is_file()
        loaded = load_target(out)
        with torch.no_grad():
            assert torch.equal(loaded.model(ids).logits, ref)
        assert loaded.identity()["weights_hash"] == tiny_llama.identity()["weights_hash"]
        assert loaded.identity()["tokenizer_hash"] == tiny_llama.identity()["tokenizer_hash"]
        assert loaded.tokenizer.chat_template == tiny_llama.tokenizer.chat_template


def test_bad_specs_fail_clearly_without_a_hub(tmp_path):
    with pytest.raises(TargetLoadError, match="neither a local path nor a known alias"):
        load_target("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(TargetLoadError, match="unknown tiny model"):
        load_target("tiny-gpt5")
    with pytest.raises(TargetLoadError, match="no config.json"):
        load_target(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(TargetLoadError, match="no weights"):
        load_target(tmp_path)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    with pytest.raises(TargetLoadError, match="must be a .gguf"):
        load_target(weights)


def test_corrupt_and_unsupported_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(TargetLoadError, match="not a readable GGUF"):
        load_target(junk)

    import gguf
    import numpy as np

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TargetLoadError, match="architecture 'rwkv6' is not supported"):
        load_target(path)
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-written


def test_an_old_gguf_cache_entry_gets_its_architectures(tmp_path, monkeypatch):
    """Caches written before `architectures` was recorded are completed in place on the next use,
    keeping the head-identity hash (the field is volatile for config_hash)."""
    import json

    from transformers import AutoConfig

    from mtpkit.models.loader import _gguf_cache_key, config_hash, convert_gguf

    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "old.gguf"
    gguf_file.write_bytes(b"stand-in for a converted file" * 100)
    entry = cache_dir() / "models" / f"old-{_gguf_cache_key(gguf_file)}"
    entry.mkdir(parents=True)
    AutoConfig.for_model("qwen2", num_hidden_layers=2).save_pretrained(entry)
    raw = json.loads((entry / "config.json").read_text())
    raw.pop("architectures", None)
    (entry / "config.json").write_text(json.dumps(raw))
    before = config_hash(AutoConfig.from_pretrained(entry))
    assert convert_gguf(gguf_file) == entry
    after = AutoConfig.from_pretrained(entry)
    assert after.architectures == ["Qwen2ForCausalLM"] and config_hash(after) == before
    assert not list(entry.glob("*.tmp*"))


@pytest.mark.slow
def test_embedded_alias_converts_once_then_loads_from_cache(smollm2, monkeypatch):
    assert smollm2.num_layers == 30 and smollm2.hidden_size == 576 and smollm2.vocab_size == 49152
    assert smollm2.decoder_layer_cls.__name__ == "LlamaDecoderLayer"
    assert "<|im_start|>assistant" in smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    cached = list((cache_dir() / "models").glob(embedded_gguf_path().stem + "-*/model.safetensors"))
    assert len(cached) == 1
    # Engines pick the class from `architectures` (vLLM would fall back to the model type).
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(cached[0].parent).architectures == ["LlamaForCausalLM"]

    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "second load must come from the safetensors cache"
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    start = time.perf_counter()
    again = load_target("smollm2-135m-instruct")
    assert time.perf_counter() - start < 10
    assert again.identity() == smollm2.identity()
    # A .gguf path is the same file: it shares the cache entry.
    assert load_target(embedded_gguf_path()).identity()["weights_hash"] == smollm2.identity()["weights_hash"]
