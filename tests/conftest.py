from __future__ import annotations

from pathlib import Path

import pytest

from mtpkit.models import load_target

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PROMPTS_DIR = SHARED_DATA / "prompts"


def shared_prompts(name: str) -> Path:
    path = PROMPTS_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not available (../shared/data is beside the checkout in CI)")
    return path


def saved_tiny_llama(root: Path, **fields):
    """A random tiny Llama (TINY_CONFIGS fields overridden by `fields`) saved as an HF directory
    under root/target, loaded back as a Target: what the exporters and engines read from disk."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mtpkit.models.tiny import TINY_CONFIGS, tiny_tokenizer

    config = dict(TINY_CONFIGS["llama"], **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    model.save_pretrained(root / "target")
    tiny_tokenizer().save_pretrained(root / "target")
    return load_target(str(root / "target"))


@pytest.fixture(scope="session")
def tiny_llama():
    return load_target("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model; the first load in a fresh cache converts the GGUF (~18 s)."""
    return load_target("smollm2-135m-instruct")


def decode_with_draft_trace(monkeypatch, target, head, k: int, ids: list[int], max_new_tokens: int):
    """Speculative greedy decoding that also records (verified ids, drafts) at every step, so a
    test can recompute each draft from scratch."""
    from mtpkit.decode.engine import SpeculativeDecoder

    trace = []
    real = SpeculativeDecoder._draft

    def record(self, seq):
        drafts, probs = real(self, seq)
        trace.append((list(seq), list(drafts)))
        return drafts, probs

    monkeypatch.setattr(SpeculativeDecoder, "_draft", record)
    return SpeculativeDecoder(target, head, k=k).generate(ids, max_new_tokens), trace
