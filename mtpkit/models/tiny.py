"""Tiny randomly initialised targets for fast tests: llama, qwen2 and deepseek_v3 (MLA + MoE).

Each is deterministic from a seed and comes with a byte-level tokenizer that carries a
ChatML chat template, so every code path (templating, loss masks, generation, hidden
states) runs on them exactly as on a real model.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# Same special-token ids as SmolLM2, so tests exercise a realistic layout (pad == eos).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 320  # 3 specials + 256 bytes, rounded up like real vocabularies

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
)

DEEPSEEK_V3_ROUTER = dict(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, model_type="llama", num_hidden_layers=2),
    "qwen2": dict(_COMMON, model_type="qwen2", num_hidden_layers=2),
    "deepseek_v3": dict(
        _COMMON,
        model_type="deepseek_v3",
        num_hidden_layers=3,
        num_key_value_heads=4,
        first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_nextn_predict_layers=1,
        # Fields released V3 configs carry and transformers' DeepseekV3Config does not define
        # (its router is always sigmoid + e_score_correction_bias): vLLM's deepseek_v2.py builds
        # the correction bias only for noaux_tc and scores with softmax by default; SGLang's
        # NextN class reads moe_layer_freq. Kept equal to what transformers computes.
        **DEEPSEEK_V3_ROUTER,
    ),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: every UTF-8 byte is one token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny(family: str, seed: int = 0):
    """Return (model, tokenizer) for a tiny config; identical weights for the same seed."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(TINY_CONFIGS)}")
    fields = dict(TINY_CONFIGS[family])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model, tiny_tokenizer()
