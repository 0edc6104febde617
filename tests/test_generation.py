"""Continuous-batching generation (mtpkit.data.generation) against batch-1 greedy decoding."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mtpkit.data import chat
from mtpkit.data.collect import CollectConfig, collect, generate_answers
from mtpkit.data.generation import Job, generate_continuous
from mtpkit.data.prompts import load_prompts
from mtpkit.data.store import Store
from mtpkit.models import load_target


def _prompts(target, n=12):
    return [chat.start(target.tokenizer, p).ids for p in load_prompts(["builtin"])[:n]]


def _batch1_greedy(target, prompt, max_new_tokens, eos):
    with torch.no_grad():
        out = target.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture
def frequent_eos(tiny_llama, monkeypatch):
    """EOS ids the random tiny model emits often, so answers end at different lengths and slots
    must be refilled mid-batch (with its real EOS every answer runs to max_new_tokens)."""
    answers = [_batch1_greedy(tiny_llama, p, 20, [2]) for p in _prompts(tiny_llama)]

    def spread(t):  # distinct answer lengths if t ended answers
        return len({a.index(t) if t in a else 20 for a in answers})

    eos = [max(Counter(t for a in answers for t in a), key=spread)]
    monkeypatch.setattr(tiny_llama.model.generation_config, "eos_token_id", eos)
    return eos


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_matches_batch1_generate(tiny_llama, frequent_eos, batch_size):
    prompts = _prompts(tiny_llama)
    steps = []
    jobs = [Job(p) for p in prompts]
    generate_continuous(tiny_llama, jobs, 20, batch_size, on_tokens=steps.append)
    want = [_batch1_greedy(tiny_llama, p, 20, tiny_llama.eos_token_ids) for p in prompts]
    assert [j.answer for j in jobs] == want
    lengths = [len(a) for a in want]
    assert len(set(lengths)) > 2, "the EOS choice should give answers of different lengths"
    assert sum(steps) == sum(lengths)  # every generated token reported once
    if batch_size > 1:
        # A padded batch runs until its longest answer; refilling slots takes fewer forwards.
        padded = sum(max(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))
        assert len(steps) < padded + len(prompts)  # decode steps + prefills < padded decode steps alone


def test_sampling_depends_on_the_prompt_seed_not_the_batch(tiny_llama):
    prompts = _prompts(tiny_llama, 7)
    a = generate_answers(tiny_llama, prompts, 10, temperature=1.0, top_p=0.9, batch_size=2, seed=5)
    b = generate_answers(tiny_llama, prompts, 10, temperature=1.0, top_p=0.9, batch_size=7, seed=5)
    c = generate_answers(tiny_llama, prompts, 10, temperature=1.0, top_p=0.9, batch_size=7, seed=6)
    greedy = generate_answers(tiny_llama, prompts, 10)
    assert a == b and a != c and a != greedy


def test_multi_turn_follow_ups_are_queued(tmp_path, tiny_llama):
    """--all-turns: each later turn re-enters the queue; the store equals a batch-1 run's."""

    path = tmp_path / "turns.jsonl"
    turns = [["hi", "more"], ["a b c", "d", "e f"], ["one"], ["x y", "z"], ["long " * 9, "short"]]
    path.write_text("".join(json.dumps({"turns": t}) + "\n" for t in turns))

    def run(name, batch_size):
        cfg = CollectConfig(
            model="tiny-llama",
            prompts=[str(path)],
            out=str(tmp_path / name),
            all_turns=True,
            max_new_tokens=8,
            batch_size=batch_size,
            max_prompts=6,
            progress=False,
        )
        collect(cfg, tiny_llama)
        return [s.input_ids.tolist() for s in Store(tmp_path / name)]

    one, many = run("one", 1), run("many", 4)
    assert one == many
    tok = tiny_llama.tokenizer
    for ids, t in zip(many, turns, strict=True):
        assert tok.decode(ids).count("<|im_start|>assistant") == len(t)  # every turn answered


def test_bfloat16_target_end_to_end(tmp_path):
    cfg = CollectConfig(
        model="tiny-llama",
        prompts=["builtin"],
        out=str(tmp_path / "bf16"),
        model_dtype="bfloat16",
        max_new_tokens=6,
        batch_size=4,
        max_prompts=5,
        progress=False,
    )
    summary = collect(cfg)
    st = Store(tmp_path / "bf16")
    assert summary["store_samples"] == 5 and st.dtype == torch.bfloat16
    target = load_target("tiny-llama", dtype="bfloat16")
    s = st[0]
    start = int(s.loss_mask.int().argmax())
    want = _batch1_greedy(target, s.input_ids[:start].tolist(), 6, target.eos_token_ids)
    assert s.input_ids[start:].tolist() == want
    # The generating forwards' states (a bf16 target's reduction order differs between a 1-row
    # decode step and a full teacher-forced forward): within bf16 precision, the last row zeros.
    fresh = target.hidden_states(s.input_ids[None])[0]
    torch.testing.assert_close(s.hidden_states[:-1].float(), fresh[:-1].float(), rtol=2e-2, atol=2e-2)
    assert not s.hidden_states[-1].any()


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-deepseek_v3"])
def test_greedy_matches_batch1_on_other_families(family):
    """The slot cache holds whatever key/value shapes a family's attention hands it (GQA, MLA)."""
    target = load_target(family)
    prompts = _prompts(target, 5)
    jobs = [Job(p) for p in prompts]
    generate_continuous(target, jobs, 10, 2)
    assert [j.answer for j in jobs] == [_batch1_greedy(target, p, 10, target.eos_token_ids) for p in prompts]
