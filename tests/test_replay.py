"""Replay (one batched greedy pass + one teacher-forced head pass) gives exactly the per-step
accepted counts of the real speculative engine, for every head family, K and drafting dtype."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import collect_store, shared_prompts, train_tiny_head

import mtpkit.decode.replay as replay_mod
from mtpkit.data import chat
from mtpkit.data.prompts import load_prompts
from mtpkit.decode.engine import DecodeError, SpeculativeDecoder
from mtpkit.decode.replay import engine_mtp_forward, greedy_generate, replay
from mtpkit.models import load_target
from mtpkit.train.metrics import leading_runs, walk

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
        collect_store(
            target,
            root / name,
            [str(shared_prompts("vicuna_bench.jsonl"))],
            layers=sorted({0, target.num_layers // 2, target.num_layers}),  # EAGLE-3's tiny defaults
            max_new_tokens=32,
            max_prompts=40,
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


@pytest.mark.parametrize("name", ["eagle3", "mtp3"])
def test_a_sequence_file_replays_any_head_without_generating(trained, targets, tmp_path, monkeypatch, name):
    target_name = HEADS[name][0]
    target, head = targets[target_name], trained[name]
    prompts = _prompts(target, 3)
    path = tmp_path / "greedy.json"
    first = replay(target, head, prompts, [1, 3], MAX_NEW, batch_size=3, sequence_file=path)
    assert path.exists()

    def no_generation(*args, **kwargs):
        raise AssertionError("the sequence file holds every prompt: nothing to generate")

    monkeypatch.setattr(replay_mod, "greedy_generate", no_generation)
    again = replay(target, head, prompts[::-1], [1, 3], MAX_NEW, sequence_file=path)  # any order, a subset
    for k in (1, 3):
        assert again.steps[k] == first.steps[k][::-1]
    assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences][::-1]
    monkeypatch.undo()
    # K = 5 needs 4 tokens past each end, the file has 2: regenerated, and the file widened.
    wider = replay(target, head, prompts, [5], MAX_NEW, sequence_file=path)
    assert wider.steps[5] == replay(target, head, prompts, [5], MAX_NEW).steps[5]
    other = "tiny-llama" if target_name != "tiny-llama" else "tiny-deepseek_v3"
    with pytest.raises(DecodeError, match="sequences of another target"):
        replay(
            targets[other],
            trained["eagle3" if other == "tiny-llama" else "mtp3"],
            prompts,
            [1],
            MAX_NEW,
            sequence_file=path,
        )
    with pytest.raises(DecodeError, match="sequences of another max_new_tokens"):
        replay(target, head, prompts, [1], MAX_NEW + 1, sequence_file=path)
    path.write_text("{not json")
    with pytest.raises(DecodeError, match="greedy.json: not a readable greedy-sequence file"):
        replay(target, head, prompts, [1], MAX_NEW, sequence_file=path)


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
    from mtpkit.train.metrics import simulated_tau

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


def test_eval_scores_every_prompt_by_replay_and_times_a_subset(trained, targets, root, tmp_path):
    from mtpkit.decode.evaluate import EvalConfig, evaluate

    prompts = tmp_path / "cats.jsonl"
    texts = [p.turns[0] for p in load_prompts([shared_prompts("vicuna_bench.jsonl")])[40:52]]
    prompts.write_text(
        "".join(json.dumps({"turns": [t], "category": "ab"[i % 2]}) + "\n" for i, t in enumerate(texts))
    )
    out = tmp_path / "r.json"
    report = evaluate(
        EvalConfig(
            head=str(root / "run-eagle3"),
            prompts=[str(prompts)],
            out=str(out),
            k=[1, 3],
            max_new_tokens=32,
            timing_prompts=3,
            batch_size=5,
            hf_baseline=False,
            progress=False,
        ),
        targets["tiny-llama"],
    )
    assert report["tau_method"] == "replay" and report["num_prompts"] == 12 and report["timing_prompts"] == 3
    timed = [r for r in report["records"] if "plain_seconds" in r]
    assert len(timed) == 3 and report["identical"] == 3
    for r in report["sweep"]:
        agree = r["replay_agreement"]
        assert agree["prompts"] == 3 and agree["steps_equal"] == agree["steps"] > 0
        assert r["tau_ci"][0] <= r["tau"] <= r["tau_ci"][1] and r["tau_ci"][0] < r["tau_ci"][1]
        assert len(r["per_position_ci"]) == r["k"]
        # τ over all prompts is the steps of every prompt's record pooled.
        steps = sum(rec[f"k{r['k']}"]["steps"] for rec in report["records"])
        assert steps == r["steps"]
        cats = r["categories"]
        assert sorted(cats) == ["a", "b"] and cats["a"]["num_prompts"] == cats["b"]["num_prompts"] == 6
        assert cats["a"]["steps"] + cats["b"]["steps"] == r["steps"]
    md = out.with_suffix(".md").read_text()
    assert f"| 3 | {report['sweep'][1]['tau']:.2f} ± " in md and "| 3 | b | 6 |" in md


def test_eval_sets_writes_one_combined_report(trained, targets, root, tmp_path):
    from mtpkit.decode.evaluate import EvalConfig, evaluate_sets

    sets = tmp_path / "sets"
    sets.mkdir()
    texts = [p.turns[0] for p in load_prompts([shared_prompts("vicuna_bench.jsonl")])[40:48]]
    for name, chunk in (("one", texts[:4]), ("two", texts[4:])):
        (sets / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in chunk))
    out = tmp_path / "protocol.json"
    cfg = EvalConfig(
        head=str(root / "run-mtp1"),
        prompts=[],
        out=str(out),
        k=[1, 2],
        max_new_tokens=16,
        timing_prompts=1,
        hf_baseline=False,
        progress=False,
    )
    combined = evaluate_sets(cfg, [str(sets)], targets["tiny-deepseek_v3"])
    assert list(combined["sets"]) == ["one", "two"] and combined["k"] == [1, 2]
    for s in combined["sets"].values():
        assert s["num_prompts"] == 4 and [r["k"] for r in s["sweep"]] == [1, 2]
        assert all(r["replay_agreement"]["step_fraction"] == 1.0 for r in s["sweep"])
    assert json.loads(out.read_text())["wall_seconds"] > 0
    assert "| one | 4 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size
    assert (tmp_path / "protocol.two.json").is_file()


def test_bad_eval_input_names_the_problem_and_leaves_no_report(trained, targets, root, tmp_path):
    from mtpkit.decode.evaluate import EvalConfig, evaluate, evaluate_sets

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hello"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "r.json"

    def cfg(head, k=(2,)):
        return EvalConfig(head=str(root / head), prompts=[str(good)], out=str(out), k=list(k), progress=False)

    with pytest.raises(DecodeError, match="semantics must be one of"):
        EvalConfig(head=str(root / "run-mtp1"), prompts=[str(good)], semantics="tgi")
    with pytest.raises(DecodeError, match="sglang has no proposer for diffusion heads"):
        evaluate(
            EvalConfig(
                head=str(root / "run-diffusion"), prompts=[str(good)], out=str(out), semantics="sglang"
            ),
            targets["tiny-llama"],
        )
    with pytest.raises(
        DecodeError, match="-k 6: a Medusa head with 5 heads drafts at most that many tokens, not 6"
    ):
        evaluate(cfg("run-medusa", (2, 6)), targets["tiny-llama"])
    with pytest.raises(DecodeError, match=f"{empty}: no prompts in the file"):
        evaluate_sets(cfg("run-eagle3"), [str(good), str(empty)], targets["tiny-llama"])
    with pytest.raises(DecodeError, match="no such file"):
        evaluate_sets(cfg("run-eagle3"), [str(tmp_path / "missing.jsonl")], targets["tiny-llama"])
    with pytest.raises(Exception, match="trained for 'tiny-llama', not 'tiny-deepseek_v3'"):
        evaluate(cfg("run-eagle3"), targets["tiny-deepseek_v3"])
    assert not list(tmp_path.glob("r*"))  # nothing written


def _engine_mtp_drafts(head, target, seq: list[int], k: int) -> list[int]:
    """vLLM's EagleProposer on an MTP head, from scratch: one pass over the verified rows fills
    the draft cache, then one row per draft at the next position reading the last output."""
    from transformers import DynamicCache

    from mtpkit.heads.common import attention_mask, causal_allowed

    N, module, cache = len(seq), head.module_for_step(0), DynamicCache()
    with torch.no_grad():
        h = target.hidden_states(torch.tensor([seq[: N - 1]]))[0, :, 0][None]
        pos = torch.arange(N - 1)[None]
        emb = head.embed_tokens(torch.tensor([seq[1:N]]))
        emb[:, 0] = 0
        mask = attention_mask(causal_allowed(N - 1, 0), head.config, h.dtype)
        out = module(h, emb, mask, head.rotary_emb(h, position_ids=pos), pos, cache)[0, -1]
        drafts: list[int] = []
        for j in range(1, k + 1):
            drafts.append(int(head.lm_head(module.shared_head.norm(out)).argmax()))
            if j < k:
                p, x = torch.tensor([[N - 2 + j]]), out[None, None]
                e = head.embed_tokens(torch.tensor([[drafts[-1]]]))
                out = module(x, e, None, head.rotary_emb(x, position_ids=p), p, cache)[0, -1]
    return drafts


@pytest.mark.parametrize("name", ["mtp1", "mtp3"])
def test_vllm_semantics_replay_equals_a_vllm_style_drafter(trained, targets, monkeypatch, name):
    target, head = targets["tiny-deepseek_v3"], trained[name]
    prompts = _prompts(target, 3)
    ks = [1, 2, 3, 4]
    ours = replay(target, head, prompts, ks, MAX_NEW, batch_size=3)
    theirs = replay(target, head, prompts, ks, MAX_NEW, batch_size=3, semantics="vllm")
    assert theirs.steps[1] == ours.steps[1]  # one draft: the same computation
    monkeypatch.setattr(
        SpeculativeDecoder,
        "_draft",
        lambda self, ids: (_engine_mtp_drafts(head, target, ids, self.k), [None] * self.k),
    )
    for k in ks:
        for i, ids in enumerate(prompts):
            steps = [s.accepted for s in SpeculativeDecoder(target, head, k=k).generate(ids, MAX_NEW).steps]
            assert theirs.steps[k][i] == steps, (k, i)
    # The engines' chain is another computation from step 2 on (positions, keys, module 0).
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        h = target.hidden_states(ids)[..., 0, :]
        a, b = head.forward_train(ids, h, 2), engine_mtp_forward(head, ids, h, 2)
    torch.testing.assert_close(a[0][:, :-1], b[0][:, :-1])  # the last row has no next token
    assert (a[1][0, :-2] - b[1][0, :-2]).abs().max() > 1e-3
    with pytest.raises(DecodeError, match="semantics must be one of"):
        replay(target, head, prompts, ks, MAX_NEW, semantics="tgi")
    with pytest.raises(DecodeError, match="sglang has no proposer for medusa heads"):
        replay(targets["tiny-llama"], trained["medusa"], prompts, ks, MAX_NEW, semantics="sglang")


@pytest.mark.slow
def test_replay_equals_the_engine_on_the_real_model(tmp_path, smollm2):
    """SmolLM2-135M with an MTP head trained for a minute: same steps as the engine, both dtypes."""
    store = tmp_path / "store"
    collect_store(smollm2, store, ["builtin:demo_train"], max_prompts=24, max_new_tokens=64, batch_size=8)
    cfg = {"num_depths": 1, "train_depths": 3}
    head = train_tiny_head(smollm2, store, tmp_path / "run", "mtp", cfg)
    prompts = [chat.start(smollm2.tokenizer, p).ids for p in load_prompts(["builtin:demo_eval"])[:4]]
    plain = SpeculativeDecoder(smollm2)
    accepted = 0
    for dtype in (torch.float32, torch.bfloat16):
        got = replay(smollm2, head, prompts, [1, 2, 3], 48, draft_dtype=dtype, batch_size=4)
        for i, ids in enumerate(prompts):
            assert got.sequences[i].tokens == plain.generate(ids, 48).tokens
            for k in (1, 2, 3):
                res = SpeculativeDecoder(smollm2, head, k=k, draft_dtype=dtype).generate(ids, 48)
                assert got.steps[k][i] == [s.accepted for s in res.steps], (dtype, i, k)
                accepted += sum(s.accepted for s in res.steps)
    assert accepted > 0
