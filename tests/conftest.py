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


def train_tiny_head(target, store, out, head_type: str = "mtp", fields: dict | None = None):
    """A head trained briefly (60 steps) on a tiny target's store: enough to be accepted often."""
    from mtpkit.config import from_dict
    from mtpkit.heads import load_head
    from mtpkit.train.config import TrainConfig
    from mtpkit.train.trainer import train

    cfg = from_dict(
        TrainConfig,
        {
            "out": str(out),
            "head_type": head_type,
            "head": fields or {},
            "data": {"store": str(store), "token_budget": 1024},
            "max_steps": 60,
            "eval_every": 60,
            "save_every": 60,
            "progress": False,
            "optim": {"lr": 3e-3, "warmup_steps": 5},
        },
    )
    return load_head(train(cfg, target=target)["head"], target)


def collect_store(target, out, prompts: list[str], **fields):
    """A store of the target's own greedy answers (collect's defaults, no progress bar)."""
    from mtpkit.data.collect import CollectConfig, collect

    cfg = CollectConfig(model=target.name, prompts=prompts, out=str(out), progress=False, **fields)
    return collect(cfg, target)
