"""Helpers shared by the test modules (fixtures stay in conftest.py; tests import these)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mtpkit.config import from_dict
from mtpkit.data.store import Sample, Store
from mtpkit.models.tiny import TINY_CONFIGS
from mtpkit.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PROMPTS_DIR = SHARED_DATA / "prompts"


def shared_prompts(name: str) -> Path:
    path = PROMPTS_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not available (../shared/data is beside the checkout in CI)")
    return path


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


PERIOD = [5, 9, 14, 20, 27, 33, 41]


def periodic_store(path, target, n=24, length=40, seed=0, layers=None, prompt_len=3):
    """Samples cycling through PERIOD from a random phase: t_{i+1} is a function of t_i, so a
    head must predict every depth exactly. Hidden states are the target's real ones."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        phase = int(torch.randint(0, len(PERIOD), (1,), generator=g))
        ids = torch.tensor([PERIOD[(phase + t) % len(PERIOD)] for t in range(length)])
        mask = torch.ones(length, dtype=torch.bool)
        mask[:prompt_len] = False
        hidden = target.hidden_states(ids[None], None, layers)[0].to(torch.bfloat16)
        samples.append(Sample(ids, mask, hidden, f"periodic:{i}"))
    with Store.open_for_append(path, target.identity(), layers or [target.num_layers], "bfloat16") as st:
        st.commit(samples, "synthetic", {"consumed": n})
    return path


def train_cfg(tmp_path, store, name="run", **kw):
    data = {
        "out": str(tmp_path / name),
        "data": {"store": str(store), "token_budget": 256, "eval_fraction": 0.2},
        "head": {"num_depths": 1, "train_depths": 2},
        "max_steps": 10,
        "eval_every": 5,
        "save_every": 5,
        "log_every": 1,
        "progress": False,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }
    for key, value in kw.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    return from_dict(TrainConfig, data)


def train_losses(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if r["split"] == "train"]


def sharpen_router(model, seed=0):
    """Spread router logits and biases (HF init makes every score ~0.5, i.e. near-ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)  # some biased scores < 0
    return model


def tiny_v3(**changes):
    fields = dict(TINY_CONFIGS["deepseek_v3"], **changes)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    return sharpen_router(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()


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
    from mtpkit.models import load_target

    return load_target(str(root / "target"))


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


def collect_tiny(out, target, **fields):
    """`collect` of the builtin prompts into `out` with tiny-model defaults (fields override)."""
    from mtpkit.data.collect import CollectConfig, collect

    base = dict(model="tiny-llama", prompts=["builtin"], out=str(out), max_new_tokens=8, progress=False)
    return collect(CollectConfig(**{**base, **fields}), target)


def second_token_marginal(target, ids: list[int], temperature: float, top_p: float) -> torch.Tensor:
    """The target's marginal of the second sampled token, Σ_t1 p(t1 | ids) p(t2 | ids, t1), under
    the engine's temperature / top-p processing (what a sampled decode's `tokens[1]` follows)."""
    from mtpkit.decode.engine import _process

    with torch.no_grad():
        p1 = _process(target.model(torch.tensor([ids])).logits[0, -1], temperature, top_p).double()
        support = p1.nonzero().flatten().tolist()
        batch = torch.tensor([[*ids, t1] for t1 in support])
        p2 = _process(target.model(batch).logits[:, -1], temperature, top_p).double()
    return (p1[support, None] * p2).sum(0)


def assert_follows(counts, marginal: torch.Tensor, runs: int) -> None:
    """Chi-square: `counts` (token → count over `runs` samples) follow `marginal`, tokens with
    an expected count under 5 pooled into one bin; nothing outside the support is drawn."""
    from scipy.stats import chisquare

    assert all(counts[t] == 0 for t in counts if marginal[t] == 0)  # nothing outside top-p
    bins = [t for t in range(len(marginal)) if marginal[t] * runs >= 5]
    observed = [counts[t] for t in bins] + [runs - sum(counts[t] for t in bins)]
    expected = [float(marginal[t]) * runs for t in bins] + [runs * (1 - float(marginal[bins].sum()))]
    if expected[-1] < 1e-6:
        observed, expected = observed[:-1], expected[:-1]
    expected = [e * sum(observed) / sum(expected) for e in expected]  # exact totals for scipy
    assert len(bins) >= 3
    assert chisquare(observed, expected).pvalue > 1e-3


def hot_target_drafts(target, seq: list[int], k: int, generator) -> tuple[list[int], list[torch.Tensor]]:
    """K drafts sampled from the target itself at temperature 1.5 (a proposal that overlaps the
    target, so rejection sampling both accepts and resamples), with their probabilities."""
    from mtpkit.decode.engine import _process

    drafts, probs = [], []
    for _ in range(k):
        with torch.no_grad():
            q = _process(target.model(torch.tensor([seq + drafts])).logits[0, -1], 1.5, 1.0)
        drafts.append(int(torch.multinomial(q, 1, generator=generator)))
        probs.append(q)
    return drafts, probs
