"""Replay (one batched greedy pass + one teacher-forced head pass) gives exactly the per-step
accepted counts of the real speculative engine, for every head family, K and drafting dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_prompts, train_tiny_head

from mtpkit.data import chat
from mtpkit.data.collect import CollectConfig, collect
from mtpkit.data.prompts import load_prompts
from mtpkit.decode.engine import DecodeError, SpeculativeDecoder
from mtpkit.decode.replay import greedy_generate, leading_runs, replay, walk
from mtpkit.models import load_target

# (target, head type, head fields, largest K the test drafts)
HEADS = {
    "mtp1": ("tiny-deepseek_v3", "mtp", {"num_depths": 1, "train_depths": 3}, 5),
    "mtp3": ("tiny-deepseek_v3", "mtp", {"num_depths": 3}, 5),
    "eagle3": ("tiny-llama", "eagle3", {"draft_vocab_size": 200, "ttt_steps": 3}, 5),
    "medusa": ("tiny-llama", "medusa", {"num_heads": 5}, 5),
    "diffusion": (
        "tiny-llama",
        "diffusion",
        {"block_length": 5, "denoising_steps": 2, "max_anchors": 256},
        5,
    ),
}
MAX_NEW = 40


@pytest.fixture(scope="module")
def targets(tiny_llama):
    return {"tiny-llama": tiny_llama, "tiny-deepseek_v3": load_target("tiny-deepseek_v3")}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("replay")


@pytest.fixture(scope="module")
def trained(root, targets):
    """Each family trained briefly on its target's own greedy answers, so drafts get accepted."""
    for name, target in targets.items():
        collect(
            CollectConfig(
                model=name,
                prompts=[str(shared_prompts("vicuna_bench.jsonl"))],
                out=str(root / name),
                layers=sorted({0, target.num_layers // 2, target.num_layers}),  # EAGLE-3's tiny defaults
                max_new_tokens=32,
                max_prompts=40,
                progress=False,
            ),
            target,
        )
    return {
        name: train_tiny_head(targets[tname], root / tname, root / f"run-{name}", head_type, fields)
        for name, (tname, head_type, fields, _) in HEADS.items()
    }


def _prompts(target, n=4):
    prompts = load_prompts([shared_prompts("vicuna_bench.jsonl")])[40 : 40 + n]  # not trained on
    return [chat.start(target.tokenizer, p).ids for p in prompts]


def test_walk_steps_through_accepted_runs():
    # 2 accepted at anchor 4 → next anchor 7 (two drafts + bonus); 0 at 7 → 8; 5 at 8, capped at K.
    runs = [0] * 4 + [2, 9, 9, 0, 5, 0, 0, 0, 0, 0, 1, 1]
    assert walk(runs, 4, 15, 3) == [2, 0, 3, 0, 0, 1]  # anchors 4, 7, 8, 12, 13, 14
    assert walk(runs, 4, 15, 1) == [1, 1, 1, 0, 0, 0, 0, 1]  # anchors 4, 6, 8, 10..14
    assert walk(runs, 4, 5, 3) == [2]  # the output ends inside the step's accepted run
    hits = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert leading_runs(hits).tolist() == [2, 1, 0, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(HEADS))
def test_replay_equals_the_engine_step_by_step(trained, targets, name, dtype):
    target_name, _, _, k_max = HEADS[name]
    target, head = targets[target_name], trained[name]
    prompts = _prompts(target)
    ks = list(range(1, k_max + 1))
    got = replay(target, head, prompts, ks, MAX_NEW, draft_dtype=dtype, batch_size=4)
    plain = SpeculativeDecoder(target)
    accepted = 0
    for i, ids in enumerate(prompts):
        base = plain.generate(ids, MAX_NEW).tokens
        assert got.sequences[i].tokens == base  # replay scores the target's own greedy output
        for k in ks:
            res = SpeculativeDecoder(target, head, k=k, draft_dtype=dtype).generate(ids, MAX_NEW)
            assert res.tokens == base
            assert got.steps[k][i] == [s.accepted for s in res.steps], (i, k)
            accepted += sum(s.accepted for s in res.steps)
    # Most prompts keep their batched sequence (a batch-1 rerun only near a top-2 logit tie).
    assert got.batch1_reruns < len(prompts) and got.batch1_changed == 0
    assert accepted > 0, "a trained head is accepted sometimes: otherwise the comparison is vacuous"
    stats = got.stats[3]
    assert stats.steps == sum(len(s) for s in got.steps[3])
    assert stats.tau == pytest.approx(1 + stats.accepted / stats.steps)


def test_batched_generation_keeps_features_and_the_continuation(targets):
    target = targets["tiny-llama"]
    prompts = _prompts(target, 6)
    seqs = dict(greedy_generate(target, prompts, 24, [0, 2], extra=3, batch_size=6, tie_margin=0))
    plain = SpeculativeDecoder(target)
    for i, ids in enumerate(prompts):
        s = seqs[i]
        assert s.tokens == plain.generate(ids, 24).tokens
        longer = plain.generate(ids, len(s.tokens) + 3, eos_ids=[]).tokens  # EOS ignored past the end
        assert s.extended == longer[: len(s.tokens) + 3]
        fresh = target.hidden_states(torch.tensor([ids + s.tokens[:-1]]), None, [0, 2])[0]
        torch.testing.assert_close(s.features, fresh, rtol=1e-4, atol=1e-4)
    # A margin no run can clear: every prompt is regenerated at batch 1 (and reported as such).
    alone = dict(greedy_generate(target, prompts, 24, extra=3, batch_size=6, tie_margin=float("inf")))
    assert all(s.batch1 and not s.changed for s in alone.values())


def test_replay_refuses_what_the_engine_refuses(trained, targets):
    target = targets["tiny-llama"]
    with pytest.raises(DecodeError, match="with 5 heads drafts at most"):
        replay(target, trained["medusa"], _prompts(target, 1), [6], 8)
    with pytest.raises(DecodeError, match="exceeds the target's context"):
        replay(target, trained["eagle3"], [[5] * 1020], [2], 8)
    with pytest.raises(DecodeError, match="must be >= 1"):
        replay(target, trained["eagle3"], [[5]], [0], 8)



def test_training_simulated_tau_walks_answer_spans_like_the_engine():
    from mtpkit.train.losses import shifted_labels
    from mtpkit.train.trainer import simulated_tau

    torch.manual_seed(0)
    T, K = 40, 3
    loss_mask = torch.zeros(2, T, dtype=torch.bool)
    loss_mask[0, 10:30] = True  # one answer t_10..t_29
    loss_mask[1, 5:15] = loss_mask[1, 22:38] = True  # two turns
    ids = torch.zeros(2, T, dtype=torch.long)
    stats = []
    for k in range(1, K + 1):
        _, valid = shifted_labels(ids, loss_mask, k)
        stats.append({"hits": valid & (torch.rand(2, T) < 0.7), "valid": valid})
    # The engine, step by step: N verified tokens of a span t_a..t_{e−1}; drafts at anchor N−2.
    expected = {}
    for k in range(1, K + 1):
        acc = steps = 0
        for b, (a, e) in [(0, (10, 30)), (1, (5, 15)), (1, (22, 38))]:
            N = a + 1
            while e > N and N - 2 + k + 1 < e:  # every draft of the step has a label
                n = 0
                while n < k and stats[n]["hits"][b, N - 2]:
                    n += 1
                acc, steps, N = acc + n + 1, steps + 1, N + n + 1
        expected[k] = (float(acc), steps)
    assert simulated_tau(stats, K) == expected
    assert all(v[1] > 0 for v in expected.values())
