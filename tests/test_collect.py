from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, shared_prompts

from mtpkit.cli import main
from mtpkit.data.collect import CollectConfig, collect
from mtpkit.data.prompts import PromptFormatError, load_prompts
from mtpkit.data.store import MANIFEST, Store, StoreError
from mtpkit.models import load_target


def _cfg(tmp_path, name="store", **kw):
    base = dict(
        model="tiny-llama",
        prompts=["builtin"],
        out=str(tmp_path / name),
        max_new_tokens=12,
        batch_size=3,
        progress=False,
    )
    base.update(kw)
    return CollectConfig(**base)


def _same_stores(a: Store, b: Store):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x.input_ids, y.input_ids), i
        assert torch.equal(x.loss_mask, y.loss_mask), i
        # Generated samples keep the hidden states of the forwards that generated them, whose
        # float reduction order depends on which prompts shared the batch: equal to bf16 rounding.
        torch.testing.assert_close(x.hidden_states, y.hidden_states, rtol=1e-2, atol=1e-2, msg=str(i))
        assert x.source == y.source


def test_generation_samples_match_a_fresh_forward(tmp_path, tiny_llama):
    summary = collect(_cfg(tmp_path, all_turns=True, layers=[0, 2]), tiny_llama)
    st = Store(tmp_path / "store")
    prompts = load_prompts(["builtin"])
    assert summary["store_samples"] == len(st) == len(prompts)
    assert st.manifest["model"] == tiny_llama.identity() and st.layers == [0, 2]
    tok = tiny_llama.tokenizer
    for i, prompt in enumerate(prompts):
        s = st[i]
        assert s.source == prompt.source
        text = tok.decode(s.input_ids)
        assert all(turn in text for turn in prompt.turns)  # --all-turns answered every turn
        # Masked tokens are the answers: at most max_new_tokens per turn, none in the prompt header.
        n_answer = int(s.loss_mask.sum())
        assert 0 < n_answer <= 12 * len(prompt.turns)
        first = s.loss_mask.int().argmax()
        assert tok.decode(s.input_ids[:first]).endswith("<|im_start|>assistant\n")
        # Kept from the generating forwards: every row but the last (never fed back: zeros).
        fresh = tiny_llama.hidden_states(s.input_ids[None], layers=[0, 2])[0]
        assert s.hidden_states.dtype == torch.bfloat16
        torch.testing.assert_close(
            s.hidden_states[:-1].float(), fresh[:-1].to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2
        )
        assert not s.hidden_states[-1].any()
    # Greedy answers are the model's own: the first answer equals an independent greedy decode.
    s = st[0]
    start = int(s.loss_mask.int().argmax())
    with torch.no_grad():
        ref = tiny_llama.model.generate(
            s.input_ids[None, :start], max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2
        )
    n = len(ref[0]) - start
    assert torch.equal(s.input_ids[start : start + n], ref[0, start:])


def test_rerun_is_a_no_op_and_resume_matches_uninterrupted(tmp_path, tiny_llama):
    prompts = [str(shared_prompts("vicuna_bench.jsonl"))]
    full = _cfg(tmp_path, "full", prompts=prompts, max_prompts=10, shard_mb=0.001)
    collect(full, tiny_llama)
    # "Interrupted" after 4 prompts (max_samples), then the same command continues.
    part = _cfg(tmp_path, "part", prompts=prompts, max_prompts=10, shard_mb=0.001, max_samples=4)
    assert collect(part, tiny_llama)["store_samples"] == 4
    resumed = _cfg(tmp_path, "part", prompts=prompts, max_prompts=10, shard_mb=0.001)
    summary = collect(resumed, tiny_llama)
    assert summary["run_samples"] == 6
    _same_stores(Store(tmp_path / "full"), Store(tmp_path / "part"))
    manifest = (tmp_path / "part" / MANIFEST).read_bytes()
    again = collect(resumed, tiny_llama)
    assert again["run_samples"] == 0 and again["store_samples"] == 10
    assert json.loads((tmp_path / "part" / MANIFEST).read_bytes())["shards"] == json.loads(manifest)["shards"]


def test_max_samples_is_exact_while_samples_are_pending(tmp_path, tiny_llama):
    """Samples not yet committed (big shards, rare commits) count once towards max_samples."""
    cfg = _cfg(tmp_path, max_prompts=10, max_samples=5, batch_size=2, commit_every_s=3600.0)
    assert collect(cfg, tiny_llama)["store_samples"] == 5


def test_max_minutes_stops_at_a_round_boundary_and_the_rerun_continues(tmp_path, tiny_llama, monkeypatch):
    import mtpkit.data.collect as collect_mod

    clock = iter(range(0, 10**6, 40))  # every reading of the clock: 40 s later
    real = collect_mod.time.perf_counter
    monkeypatch.setattr(collect_mod.time, "perf_counter", lambda: next(clock))
    cfg = _cfg(tmp_path, max_prompts=9, round_prompts=3, max_minutes=1.5)
    first = collect(cfg, tiny_llama)
    monkeypatch.setattr(collect_mod.time, "perf_counter", real)
    assert 0 < first["items_consumed"] < first["items_total"] and first["items_consumed"] % 3 == 0  # rounds
    again = collect(_cfg(tmp_path, max_prompts=9, round_prompts=3), tiny_llama)  # same job, no budget
    whole = collect(_cfg(tmp_path, "whole", max_prompts=9, round_prompts=3), tiny_llama)
    assert again["items_consumed"] == whole["items_consumed"] == whole["items_total"]
    assert again["store_samples"] == whole["store_samples"] > first["store_samples"]
    _same_stores(Store(tmp_path / "store"), Store(tmp_path / "whole"))


def test_other_prompts_append_as_a_new_job(tmp_path, tiny_llama):
    collect(_cfg(tmp_path, max_prompts=2), tiny_llama)
    path = tmp_path / "more.jsonl"
    path.write_text('{"question": "one?"}\n{"question": "two?"}\n')
    summary = collect(_cfg(tmp_path, prompts=[str(path)]), tiny_llama)
    assert summary["store_samples"] == 4 and len(Store(tmp_path / "store").manifest["jobs"]) == 2
    assert Store(tmp_path / "store")[3].source == f"{path}:2"


def test_sampling_is_seeded_and_shuffle_reorders(tmp_path, tiny_llama):
    kw = dict(temperature=1.0, top_p=0.9, shuffle=True, seed=7, max_prompts=5)
    collect(_cfg(tmp_path, "a", **kw), tiny_llama)
    collect(_cfg(tmp_path, "b", **kw), tiny_llama)
    _same_stores(Store(tmp_path / "a"), Store(tmp_path / "b"))
    collect(_cfg(tmp_path, "c", **dict(kw, seed=8)), tiny_llama)
    a, c = Store(tmp_path / "a"), Store(tmp_path / "c")
    assert [a[i].source for i in range(5)] != [c[i].source for i in range(5)]
    builtin_order = [p.source for p in load_prompts(["builtin"])][:5]
    assert [a[i].source for i in range(5)] != builtin_order


def test_corpus_mode_windows(tmp_path, tiny_llama):
    text = "abcdefghij" * 5  # 50 bytes -> 50 tokens with the byte-level tiny tokenizer, + EOS
    path = tmp_path / "doc.txt"
    path.write_text(text)
    collect(_cfg(tmp_path, prompts=[str(path)], mode="corpus", sample_size=20, stride=15), tiny_llama)
    st = Store(tmp_path / "store")
    ids = tiny_llama.tokenizer(text)["input_ids"] + [2]
    expected = [ids[0:20], ids[15:35], ids[30:50], ids[45:51]]
    assert [st[i].input_ids.tolist() for i in range(len(st))] == expected
    assert all(bool(st[i].loss_mask.all()) for i in range(len(st)))
    assert [st[i].source for i in range(len(st))] == [f"{path}@{k}" for k in (0, 15, 30, 45)]


def test_refuses_to_mix_models_and_bad_input_writes_nothing(tmp_path, tiny_llama):
    collect(_cfg(tmp_path, max_prompts=2), tiny_llama)
    before = (tmp_path / "store" / MANIFEST).read_bytes()
    with pytest.raises(StoreError, match="refusing to append"):
        collect(_cfg(tmp_path, model="tiny-qwen2", max_prompts=2))
    with pytest.raises(StoreError, match="refusing to append.*weights_hash"):
        collect(_cfg(tmp_path, max_prompts=2), load_target("tiny-llama", seed=1))
    with pytest.raises(StoreError, match="layers"):
        collect(_cfg(tmp_path, max_prompts=2, layers=[1]), tiny_llama)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"turns": [\n')
    with pytest.raises(PromptFormatError, match=f"{bad}:2: malformed JSON"):
        collect(_cfg(tmp_path, prompts=[str(bad)]), tiny_llama)
    with pytest.raises(PromptFormatError):
        collect(_cfg(tmp_path, "fresh", prompts=[str(bad)]), tiny_llama)
    assert not (tmp_path / "fresh").exists()
    assert (tmp_path / "store" / MANIFEST).read_bytes() == before
    assert (
        collect(_cfg(tmp_path, "skip", prompts=[str(bad)], skip_bad=True), tiny_llama)["store_samples"] == 1
    )


def test_long_prompts_are_skipped_and_counted(tmp_path, tiny_llama):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x" * 300}) + "\n" + json.dumps({"prompt": "short"}) + "\n")
    summary = collect(_cfg(tmp_path, prompts=[str(path)], max_length=200), tiny_llama)
    assert summary["skipped"] == 1 and summary["store_samples"] == 1


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, tiny_llama):
    prompts = str(shared_prompts("vicuna_bench.jsonl"))
    args = [
        "collect",
        "--model",
        "tiny-llama",
        "--prompts",
        prompts,
        "--max-new-tokens",
        "16",
        "--batch-size",
        "2",
        "--max-prompts",
        "40",
        "--shard-mb",
        "0.001",
        "--no-progress",
    ]
    victim = tmp_path / "victim"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtpkit.cli", *args, "--out", str(victim)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300  # generous: a loaded machine can take minutes to import torch
    try:
        while time.time() < deadline:  # wait until a few shards are committed, then kill -9
            manifest = victim / MANIFEST
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "collect finished before it could be killed"
    partial = len(Store(victim))
    assert 0 < partial < 40
    assert main([*args, "--out", str(victim)]) == 0
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    _same_stores(Store(victim), Store(tmp_path / "clean"))
    Store(victim).verify()


def test_cli_config_file_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: tiny-qwen2\nprompts: [builtin]\nout: {tmp_path / 's'}\nmax_new_tokens: 4\nmax_prompts: 2\n"
    )
    report = tmp_path / "r.json"
    assert (
        main(["collect", "--config", str(cfg), "--batch-size", "2", "--no-progress", "--report", str(report)])
        == 0
    )
    assert "bytes per token" in capsys.readouterr().out
    assert json.loads(report.read_text())["store_samples"] == 2
    (tmp_path / "bad.yaml").write_text("modle: x\n")
    assert main(["collect", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown field(s) ['modle']" in capsys.readouterr().err
    assert (
        main(["collect", "--model", "nope/nope", "--prompts", "builtin", "--out", str(tmp_path / "x")]) == 2
    )
    assert "neither a local path nor a known alias" in capsys.readouterr().err
    assert main(["collect", "--model", "tiny-llama", "--out", str(tmp_path / "x")]) == 2
    assert "missing required field(s) ['prompts']" in capsys.readouterr().err


def test_float16_overflow_is_refused_but_padding_is_ignored(tmp_path, tiny_llama, monkeypatch):
    from mtpkit.data.collect import teacher_forced_hidden

    real = tiny_llama.hidden_states

    def huge_padding(ids, mask, layers):
        out = real(ids, mask, layers)
        return out.masked_fill(~mask.bool()[:, :, None, None], 1e6)  # only padded rows are out of range

    monkeypatch.setattr(tiny_llama, "hidden_states", huge_padding)
    seqs = [[5, 6, 7], [5, 6, 7, 8, 9]]
    out = teacher_forced_hidden(tiny_llama, seqs, [2], torch.float16, 1024)
    assert [len(h) for h in out] == [3, 5] and all(bool(torch.isfinite(h).all()) for h in out)
    monkeypatch.setattr(tiny_llama, "hidden_states", lambda ids, mask, layers: real(ids, mask, layers) * 1e6)
    with pytest.raises(ValueError, match="exceed the float16 range"):
        teacher_forced_hidden(tiny_llama, seqs, [2], torch.float16, 1024)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """Off a terminal tqdm stays silent; collect must still log its rate and ETA."""
    args = ["collect", "--model", "tiny-llama", "--prompts", "builtin", "--out", str(tmp_path / "s")]
    args += [
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--max-prompts",
        "6",
        "--progress-every",
        "0.000001",
    ]
    assert main(args) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("collect: ")]
    assert len(lines) >= 3  # lines during the round (every generation step), not only at its end
    assert lines[-1].startswith("collect: 6/6 prompt (100%)") and "ETA 0:00:00" in lines[-1]
    assert "gen_tok_s=" in lines[-1] and "prompt/s" in lines[-1]
    assert main([*args[:-2], "--no-progress", "--out", str(tmp_path / "t")]) == 0
    assert "collect: " not in capsys.readouterr().err


def test_round_prompts_sets_the_commit_unit(tmp_path):
    args = ["collect", "--model", "tiny-llama", "--prompts", "builtin", "--out", str(tmp_path / "s")]
    args += ["--max-new-tokens", "3", "--batch-size", "2", "--max-prompts", "7", "--shard-mb", "0.000001"]
    assert main([*args, "--round-prompts", "3", "--no-progress"]) == 0
    assert [s["num_samples"] for s in Store(tmp_path / "s").manifest["shards"]] == [3, 3, 1]
