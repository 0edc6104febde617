"""Batched speculative decoding (mtpkit.decode.batched) against the batch-1 engine, row by row:
greedy rows equal plain greedy decoding and accept exactly what the batch-1 speculative engine
accepts at every step; sampling rows follow the target's distribution."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import (
    assert_follows,
    collect_store,
    hot_target_drafts,
    second_token_marginal,
    shared_prompts,
    train_tiny_head,
)

from mtpkit.data import chat
from mtpkit.data.prompts import Prompt
from mtpkit.decode.batched import BatchedSpeculativeDecoder
from mtpkit.decode.engine import DecodeError, SpeculativeDecoder
from mtpkit.heads import build_head
from mtpkit.models import load_target

HEADS = {
    "mtp": {"num_depths": 2, "train_depths": 3},
    "eagle3": {"draft_vocab_size": 200, "ttt_steps": 3},
    "medusa": {"num_heads": 3},
    "diffusion": {"block_length": 3, "denoising_steps": 2, "max_anchors": 256},
}
MAX_NEW = 32
TEXTS = [
    "Tell me about the sea, please.",
    "Hi",
    "Write a short poem about autumn leaves falling in a quiet park at dusk.",
    "What is 2 + 2?",
    "Explain how a bicycle stays upright while moving, in simple words for a child.",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """Every family trained briefly on tiny-llama's own greedy answers, so drafts get accepted."""
    root = tmp_path_factory.mktemp("batched")
    store = root / "store"
    collect_store(
        tiny_llama,
        store,
        [str(shared_prompts("vicuna_bench.jsonl"))],
        layers=[0, 1, 2],
        max_new_tokens=32,
        max_prompts=40,
    )
    return {name: train_tiny_head(tiny_llama, store, root / name, name, f) for name, f in HEADS.items()}


@pytest.fixture(scope="module")
def prompts(tiny_llama):
    return [chat.start(tiny_llama.tokenizer, Prompt((t,), None, "test")).ids for t in TEXTS]


@pytest.fixture(scope="module")
def eos(tiny_llama, prompts):
    """An EOS id the plain greedy answers contain at different places, so rows of one batch end
    at different steps (the random tiny model's real EOS never comes: every row would run to
    max_new_tokens together)."""
    answers = [SpeculativeDecoder(tiny_llama).generate(p, MAX_NEW, eos_ids=[]).tokens for p in prompts]

    def spread(t):
        return len({a.index(t) if t in a else MAX_NEW for a in answers})

    return [max(Counter(t for a in answers for t in a[1:]), key=spread)]


@pytest.fixture(scope="module")
def plain(tiny_llama, prompts, eos):
    return [SpeculativeDecoder(tiny_llama).generate(p, MAX_NEW, eos_ids=eos).tokens for p in prompts]


def _subset(n: int) -> list[int]:
    """Prompt indices of a batch of n: 1 → [0], 3 → [0, 2, 4], 5 → [0, 2, 4, 1, 3]."""
    return [(2 * i) % len(TEXTS) for i in range(n)]


def _accepted(result) -> list[int]:
    return [s.accepted for s in result.steps]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name", list(HEADS))
def test_greedy_rows_equal_batch1_plain_and_batch1_speculative(
    trained, tiny_llama, prompts, eos, plain, name, k
):
    """Per row: the tokens of plain greedy decoding, and the accepted count of every step equal
    to the batch-1 speculative engine's (so τ per row is the batch-1 τ)."""
    head = trained[name]
    single = [SpeculativeDecoder(tiny_llama, head, k=k).generate(p, MAX_NEW, eos_ids=eos) for p in prompts]
    assert [r.tokens for r in single] == plain
    decoder = BatchedSpeculativeDecoder(tiny_llama, head, k=k)
    for b in (1, 3, 5):
        idx = _subset(b)
        results = decoder.generate_batch([prompts[i] for i in idx], MAX_NEW, eos_ids=eos)
        assert [r.tokens for r in results] == [plain[i] for i in idx], b
        assert [_accepted(r) for r in results] == [_accepted(single[i]) for i in idx], b
        assert all(s.drafted == k for r in results for s in r.steps)
    # The 5-row batch was ragged: rows ended at different steps and accepted different counts
    # in the same step; and the head was accepted at all.
    assert len({len(r.tokens) for r in results}) > 1
    assert any(len({r.steps[i].accepted for r in results if len(r.steps) > i}) > 1 for i in range(MAX_NEW))
    assert sum(s.accepted for r in results for s in r.steps) > 0
    # bf16 drafting (the eval default) changes drafts at most, never the output.
    bf16 = BatchedSpeculativeDecoder(tiny_llama, head, k=k, draft_dtype=torch.bfloat16)
    assert [r.tokens for r in bf16.generate_batch(prompts, MAX_NEW, eos_ids=eos)] == plain


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-deepseek_v3"])
def test_k0_is_plain_batched_decoding(name):
    """No head: one token per row per step through the same loop, equal to batch-1 plain greedy
    (GQA, Qwen2's biases, MLA + MoE), with prompts of different lengths and rows that end at
    different steps (an EOS taken from one row's answer)."""
    target = load_target(name)
    ps = [[5, 9, 14, 20, 27, 33, 41], [1, 60, 61], [7] * 12, [3], [8, 9, 10, 11, 12]]
    eos = [SpeculativeDecoder(target).generate(ps[0], 24, eos_ids=[]).tokens[5]]
    want = [SpeculativeDecoder(target).generate(p, 24, eos_ids=eos).tokens for p in ps]
    got = BatchedSpeculativeDecoder(target, None, k=0).generate_batch(ps, 24, eos_ids=eos)
    assert [r.tokens for r in got] == want
    assert len({len(w) for w in want}) > 1 and all(r.steps == [] for r in got)


@pytest.mark.parametrize(
    "name, family, fields",
    [
        ("tiny-llama", "mtp", {"num_depths": 1}),
        ("tiny-llama", "mtp", {"num_depths": 2}),
        ("tiny-deepseek_v3", "mtp", {"num_depths": 1}),
        ("tiny-deepseek_v3", "mtp", {"num_depths": 2}),
        ("tiny-llama", "eagle3", {"layers": [0, 1, 2]}),
        ("tiny-qwen2", "eagle3", {"layers": [0, 1, 2]}),
        ("tiny-llama", "medusa", {"num_heads": 3}),
        ("tiny-llama", "diffusion", {"block_length": 4, "denoising_steps": 2}),
    ],
)
def test_batch_drafters_draft_what_the_batch1_drafters_draft(name, family, fields):
    """Every family's BatchDrafter (MTP on Llama and DeepSeek-V3 blocks) against one Drafter per
    row through scripted steps: ragged accepted counts (0..K, drawn at random), prompts of
    different lengths, rows leaving the batch — every row's drafts equal at every step."""
    target = load_target(name)
    torch.manual_seed(0)
    head = build_head(target, family, fields)
    k, g = 3, torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (30, 21, 40, 26)]
    feats = [target.hidden_states(torch.tensor([s]), None, head.feature_layers)[0] for s in seqs]
    plens = [4, 9, 2, 6]

    def greedy(logits):
        return int(logits.argmax(-1)), None

    single = [head.make_drafter(k, torch.float32, greedy) for _ in seqs]
    batch = head.make_batch_drafter(k, torch.float32, [greedy] * len(seqs))
    for d, f, p in zip(single, feats, plens, strict=True):
        d.start(f[:p])
    batch.start([f[:p] for f, p in zip(feats, plens, strict=True)], max(map(len, seqs)))
    rows, N, steps = list(range(len(seqs))), [p + 1 for p in plens], 0
    while rows:
        ids = [seqs[r][: N[r]] for r in rows]
        assert batch.draft(ids) == [single[r].draft(x) for r, x in zip(rows, ids, strict=True)]
        accepted = torch.randint(0, k + 1, (len(rows),), generator=g).tolist()
        verified = [feats[r][N[r] - 1 : N[r] + a] for r, a in zip(rows, accepted, strict=True)]
        for r, f in zip(rows, verified, strict=True):
            single[r].commit(f)
        batch.commit(verified)
        for r, a in zip(rows, accepted, strict=True):
            N[r] += a + 1
        keep = [i for i, r in enumerate(rows) if N[r] + k + 1 < len(seqs[r])]
        if len(keep) < len(rows) and keep:
            batch.select(keep)
        rows, steps = [rows[i] for i in keep], steps + 1
    assert steps >= 8


@pytest.mark.parametrize("name", list(HEADS))
def test_sampled_rows_depend_on_their_seed_not_on_the_batch(trained, tiny_llama, prompts, name):
    """A sampling row draws the same random numbers as the batch-1 engine with its seed (drafts
    and acceptance alike), so it produces the same tokens whatever rows share its batch."""
    head = trained[name]
    kw = dict(k=2, temperature=0.8, top_p=0.9)
    seeds = [11, 12, 13, 14, 15]
    single = [
        SpeculativeDecoder(tiny_llama, head, seed=s, **kw).generate(p, 20)
        for p, s in zip(prompts, seeds, strict=True)
    ]
    batched = BatchedSpeculativeDecoder(tiny_llama, head, **kw).generate_batch(prompts, 20, seeds=seeds)
    assert [r.tokens for r in batched] == [r.tokens for r in single]
    assert [_accepted(r) for r in batched] == [_accepted(r) for r in single]
    pair = BatchedSpeculativeDecoder(tiny_llama, head, **kw).generate_batch(prompts[3:], 20, seeds=seeds[3:])
    assert [r.tokens for r in pair] == [r.tokens for r in single[3:]]
    assert len({tuple(r.tokens) for r in batched}) == 5


def test_sampled_batched_decoding_matches_the_target_distribution(monkeypatch):
    """The batched path's first speculative token (t2) follows the target's marginal
    Σ_t1 p(t1 | prompt) p(t2 | prompt, t1) under temperature 0.7 and top-p 0.9, for two prompts of
    different lengths decoded in the same batches (one seed per row). Drafts come from the
    target itself at temperature 1.5, so acceptance and residual resampling both happen."""
    target = load_target("tiny-llama")
    with torch.no_grad():
        target.lm_head.weight.mul_(30)  # a peaked target, so the test has statistical power
    torch.manual_seed(0)
    head = build_head(target, "mtp", {"num_depths": 1, "train_depths": 2})
    temperature, top_p = 0.7, 0.9
    texts = [[5, 9], [1, 60, 61, 62, 63, 64, 65]]
    marginals = [second_token_marginal(target, ids, temperature, top_p) for ids in texts]

    class HotTarget:
        """A drafter proposing from the target at temperature 1.5, with a generator of its own."""

        def __init__(self, head, k, dtype, pick, greedy=True):
            self.k, self.g = k, torch.Generator().manual_seed(int(torch.randint(2**31, ())))

        def start(self, features):
            pass

        commit = start

        def draft(self, seq):
            return hot_target_drafts(target, seq, self.k, self.g)

    monkeypatch.setattr(
        type(head), "make_drafter", lambda self, k, dtype, pick, greedy=True: HotTarget(self, k, dtype, pick)
    )
    monkeypatch.setattr(type(head), "make_batch_drafter", lambda *args, **kw: None)  # one per row
    runs, batch = 1500, 50
    counts = [Counter(), Counter()]
    accepted = Counter()
    decoder = BatchedSpeculativeDecoder(target, head, k=2, temperature=temperature, top_p=top_p, seed=3)
    for _ in range(2 * runs // batch):
        rows = [texts[b % 2] for b in range(batch)]
        for b, out in enumerate(decoder.generate_batch(rows, 4, eos_ids=[])):
            counts[b % 2][out.tokens[1]] += 1
            accepted[out.steps[0].accepted] += 1
    assert len(accepted) == 3  # rows of the same step accepted 0, 1 and 2 drafts
    for count, marginal in zip(counts, marginals, strict=True):
        assert_follows(count, marginal, runs)


def test_bad_batches(tiny_llama):
    decoder = BatchedSpeculativeDecoder(tiny_llama, None, k=0)
    assert decoder.generate_batch([], 5) == []
    with pytest.raises(DecodeError, match="empty prompt"):
        decoder.generate_batch([[5, 6], []], 5)
    with pytest.raises(DecodeError, match="exceeds the target's context"):
        decoder.generate_batch([[5, 6], [5] * 1020], 10)
    with pytest.raises(DecodeError, match="2 seeds for 1 prompts"):
        decoder.generate_batch([[5, 6]], 5, seeds=[1, 2])
    # a row that ends at its first token leaves at the prefill; the others go on
    first = SpeculativeDecoder(tiny_llama).generate([5, 6, 7], 1).tokens[0]
    out = decoder.generate_batch([[5, 6, 7], [9, 10]], 6, eos_ids=[first])
    assert out[0].tokens == [first]
    assert out[1].tokens == SpeculativeDecoder(tiny_llama).generate([9, 10], 6, eos_ids=[first]).tokens


def test_rl_rollouts_go_through_the_batched_path_losslessly(trained, tiny_llama, prompts):
    """`mtpkit rl` rollouts (batched, speculative with the head when enable_rollout is on) under
    greedy settings equal batch-1 plain greedy decoding; sampled rollouts do not depend on the
    rollout batch size."""
    from mtpkit.joint.rl import RolloutConfig, generate_rollouts

    head = trained["mtp"]
    cfg = RolloutConfig(enable_rollout=True, temperature=0.0, k=3, max_new_tokens=20, batch_size=2)
    spec, acc, _ = generate_rollouts(tiny_llama, head, prompts, cfg, seed=0)
    want = [SpeculativeDecoder(tiny_llama).generate(p, 20).tokens for p in prompts]
    assert [c.ids for c in spec] == want and [c.prompt_ids for c in spec] == prompts
    assert acc.steps > 0 and acc.accepted > 0
    plain, none, _ = generate_rollouts(tiny_llama, None, prompts, cfg, seed=0)
    assert [c.ids for c in plain] == want and none.steps == 0
    sampled = RolloutConfig(enable_rollout=True, temperature=1.0, k=2, max_new_tokens=12, batch_size=5)
    a, _, _ = generate_rollouts(tiny_llama, head, prompts, sampled, seed=7)
    sampled.batch_size = 2
    b, _, _ = generate_rollouts(tiny_llama, head, prompts, sampled, seed=7)
    c, _, _ = generate_rollouts(tiny_llama, head, prompts, sampled, seed=8)
    assert [x.ids for x in a] == [x.ids for x in b] != [x.ids for x in c]
