from __future__ import annotations

import pytest
import torch
from helpers import periodic_store, train_cfg, train_losses

from mtpkit.config import from_dict, load_config
from mtpkit.data.store import Store
from mtpkit.heads import build_head, load_head
from mtpkit.models import load_target
from mtpkit.train import trainer as trainer_mod
from mtpkit.train.checkpoint import CheckpointError
from mtpkit.train.config import TrainConfig
from mtpkit.train.data import DataError
from mtpkit.train.trainer import TrainingError, train


def test_learns_a_periodic_sequence_and_never_touches_the_target(tmp_path, tiny_llama):
    store = periodic_store(tmp_path / "store", tiny_llama)
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    cfg = train_cfg(
        tmp_path,
        store,
        max_steps=80,
        eval_every=40,
        head__num_depths=2,
        head__train_depths=3,
        optim__lr=1e-2,
        optim__warmup_steps=5,
    )
    result = train(cfg, target=tiny_llama)
    ev = result["eval"]
    for k in (1, 2, 3):  # depth 3 reuses module 0 (repeated-layer mode on top of D=2)
        assert ev[f"acc_d{k}"] > 0.95, ev
    assert ev["sim_tau_k3"] > 3.8  # three drafts accepted almost always
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    # The tiny target's random LM head has small weights, which caps how peaked its logits can
    # get; accuracy is the real test, the loss must still fall clearly.
    assert losses[-1] < losses[0] - 1.0
    for k, v in tiny_llama.model.state_dict().items():
        assert torch.equal(v, before[k]), f"target weight {k} changed"
    assert not any(p.requires_grad for p in tiny_llama.model.parameters())
    head = load_head(result["head"], tiny_llama)  # the final head is a loadable native directory
    assert head.cfg.num_depths == 2 and head.cfg.train_depths == 3
    assert (tmp_path / "run" / "config.yaml").read_text().count("num_depths: 2") == 1
    assert any((tmp_path / "run" / "tb").iterdir())


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, tiny_llama, monkeypatch):
    store = periodic_store(tmp_path / "store", tiny_llama)
    train(train_cfg(tmp_path, store, "full", max_steps=12, save_every=4), target=tiny_llama)

    real_save = trainer_mod.save_checkpoint

    def crash_after_step_8(run, step, *args, **kwargs):
        real_save(run, step, *args, **kwargs)
        if step == 8:
            raise KeyboardInterrupt  # as if killed right after the step-8 checkpoint

    monkeypatch.setattr(trainer_mod, "save_checkpoint", crash_after_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(train_cfg(tmp_path, store, "killed", max_steps=12, save_every=4), target=tiny_llama)
    monkeypatch.undo()
    # Records past the resumed checkpoint are dropped and rewritten.
    with pytest.raises(TrainingError, match="not empty; pass --resume"):
        train(train_cfg(tmp_path, store, "killed", max_steps=12, save_every=4), target=tiny_llama)
    train(train_cfg(tmp_path, store, "killed", max_steps=12, save_every=4), resume=True, target=tiny_llama)
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "killed")
    a = load_head(tmp_path / "full" / "head", tiny_llama).state_dict()
    b = load_head(tmp_path / "killed" / "head", tiny_llama).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accum_bf16_and_distillation_run(tmp_path, tiny_llama):
    store = periodic_store(tmp_path / "store", tiny_llama)
    for name, kw in [
        ("accum", {"optim__grad_accum": 2}),
        ("bf16", {"precision": "bf16"}),
        ("kl", {"loss__kind": "kl"}),
        ("tv", {"loss__kind": "tv", "loss__depth_decay": 0.5}),
    ]:
        result = train(train_cfg(tmp_path, store, name, max_steps=4, **kw), target=tiny_llama)
        assert result["step"] == 4 and all(v == v for v in result["eval"].values()), name


def test_deepseek_v3_target_trains(tmp_path):
    target = load_target("tiny-deepseek_v3")
    store = periodic_store(tmp_path / "store", target, n=8, length=20)
    result = train(train_cfg(tmp_path, store, head__init="last_layer", max_steps=3), target=target)
    assert result["step"] == 3 and result["eval"]["loss_d1"] < 100


def test_online_corpus_mode(tmp_path, tiny_llama):
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(["abcdefg"] * 200))
    cfg = from_dict(
        TrainConfig,
        {
            "out": str(tmp_path / "run"),
            "max_steps": 6,
            "eval_every": 3,
            "save_every": 3,
            "progress": False,
            "data": {
                "online": {
                    "prompts": [str(corpus)],
                    "mode": "corpus",
                    "sample_size": 32,
                    "batch_size": 4,
                    "eval_samples": 4,
                }
            },
        },
    )
    result = train(cfg, target=tiny_llama)
    assert result["step"] == 6 and result["tokens_seen"] > 0 and "acc_d1" in result["eval"]


def test_batches_without_loss_tokens_leave_the_head_unchanged(tmp_path, tiny_llama):
    """max_seq_len cutting every answer away (long prompts do this) gives zero gradient, not a crash."""
    store = periodic_store(tmp_path / "store", tiny_llama, n=8, prompt_len=20)
    cfg = train_cfg(tmp_path, store, max_steps=2, data__max_seq_len=16, eval_every=2, save_every=2)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in build_head(tiny_llama, "mtp", cfg.head).state_dict().items()}
    result = train(cfg, target=tiny_llama)
    after = load_head(result["head"], tiny_llama).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_inputs(tmp_path, tiny_llama, monkeypatch):
    store = periodic_store(tmp_path / "store", tiny_llama, n=4)
    with pytest.raises(TrainingError, match="collected from 'tiny-llama', not 'tiny-qwen2'.*config_hash"):
        train(train_cfg(tmp_path, store), target=load_target("tiny-qwen2"))
    empty = tmp_path / "empty"
    Store.open_for_append(empty, tiny_llama.identity(), [tiny_llama.num_layers], "bfloat16").close()
    with pytest.raises(DataError, match="holds no samples"):
        train(train_cfg(tmp_path, empty, "e"), target=tiny_llama)
    layers = tmp_path / "layers"
    Store.open_for_append(layers, tiny_llama.identity(), [1], "bfloat16").close()
    with pytest.raises(TrainingError, match="need the final hidden state"):
        train(train_cfg(tmp_path, layers, "l"), target=tiny_llama)

    # NaN loss: stop with the step number, keep the last good checkpoint.
    real = trainer_mod.batch_loss
    calls = {"n": 0}

    def nan_at_step_7(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += torch.is_grad_enabled()  # training steps only, not eval
        return (loss * float("nan") if calls["n"] == 7 else loss), stats

    monkeypatch.setattr(trainer_mod, "batch_loss", nan_at_step_7)
    with pytest.raises(TrainingError, match=r"step 7: loss is nan.*step-000005"):
        train(train_cfg(tmp_path, store, "nan"), target=tiny_llama)
    monkeypatch.undo()
    ckpt = tmp_path / "nan" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-000005"

    # A corrupt checkpoint on resume: clear error, nothing overwritten.
    (ckpt / "step-000005" / "trainer.pt").write_bytes(b"garbage")
    snapshot = sorted((p.name, p.stat().st_size) for p in ckpt.rglob("*"))
    with pytest.raises(CheckpointError, match="step-000005: corrupt or incomplete checkpoint"):
        train(train_cfg(tmp_path, store, "nan"), resume=True, target=tiny_llama)
    assert sorted((p.name, p.stat().st_size) for p in ckpt.rglob("*")) == snapshot


def test_yaml_config_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: runs/x\nhead:\n  num_depths: 2\noptim:\n  lr: 0.01\n")
    cfg = load_config(
        TrainConfig, path, ["optim.lr=3e-4", "head.train_depths=4", "data.store=s", "max_steps=7"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.head == {"num_depths": 2, "train_depths": 4}
    assert cfg.data.store == "s" and cfg.max_steps == 7 and cfg.optim.warmup_steps == 20
    from mtpkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim: unknown field\(s\) \['lrr'\]"):
        load_config(TrainConfig, path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="schedule must be"):
        load_config(TrainConfig, path, ["optim.schedule=exp"])


def test_cli_train_with_head_flag_and_overrides(tmp_path, tiny_llama, capsys):
    from mtpkit.cli import main

    store = periodic_store(tmp_path / "store", tiny_llama, n=6)
    args = [
        "train",
        "--head",
        "mtp",
        f"data.store={store}",
        "max_steps=2",
        "progress=false",
        "model=tiny-llama",
    ]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "head:" in capsys.readouterr().out and (tmp_path / "run" / "head" / "model.safetensors").is_file()
    assert main([*args, "--out", str(tmp_path / "run")]) == 2  # exists: needs --resume
    assert "pass --resume" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--head",
                "eagle9",
                f"data.store={store}",
                "model=tiny-llama",
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 2
    )
    assert "unknown head type 'eagle9'" in capsys.readouterr().err


def test_online_generate_mode_holds_out_eval_prompts(tmp_path, tiny_llama):
    cfg = from_dict(
        TrainConfig,
        {
            "out": str(tmp_path / "run"),
            "max_steps": 3,
            "eval_every": 3,
            "save_every": 3,
            "progress": False,
            "data": {
                "online": {
                    "prompts": ["builtin:demo_train"],
                    "max_new_tokens": 6,
                    "batch_size": 4,
                    "eval_samples": 4,
                }
            },
        },
    )
    result = train(cfg, target=tiny_llama)
    assert result["step"] == 3 and result["tokens_seen"] > 0 and "acc_d1" in result["eval"]
    from mtpkit.train.data import OnlineSource

    source = OnlineSource(tiny_llama, cfg.data.online, 1024, seed=0)
    held_out = {p.turns for p in source.eval_items}
    assert len(held_out) == 4 and not held_out & {p.turns for p in source.items}
    batch = source.next_batch()
    assert batch.input_ids.shape[0] == 4 and batch.loss_mask.any()
    assert source.state_dict() == {"epoch": 0, "index": 4}


def test_train_logs_progress_lines_off_a_terminal(tmp_path, tiny_llama, monkeypatch, capsys):
    import mtpkit.progress

    monkeypatch.setattr(mtpkit.progress, "EVERY_S", 0.0)
    store = periodic_store(tmp_path / "store", tiny_llama, n=8)
    train(train_cfg(tmp_path, store, max_steps=4, progress=True), target=tiny_llama)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train: ")]
    assert [x.split(" ")[1] for x in lines] == ["1/4", "2/4", "3/4", "4/4", "4/4"]  # each step + close
    assert "ETA 0:00:00" in lines[-1] and "step/s" in lines[-1]


def test_training_from_a_tokens_store_matches_the_hidden_store(tmp_path, tiny_llama):
    from helpers import collect_tiny

    runs = {}
    for kind in ("hidden", "tokens"):
        collect_tiny(
            tmp_path / kind, tiny_llama, max_new_tokens=10, batch_size=4, max_prompts=16, store_kind=kind
        )
        torch.manual_seed(0)
        result = train(
            train_cfg(tmp_path, tmp_path / kind, name=f"run-{kind}", max_steps=4), target=tiny_llama
        )
        runs[kind] = (train_losses(tmp_path / f"run-{kind}"), result["tokens_seen"])
    (hidden, n_hidden), (tokens, n_tokens) = runs["hidden"], runs["tokens"]
    assert n_hidden == n_tokens > 0 and len(hidden) == len(tokens) == 4
    for (s1, l1), (s2, l2) in zip(hidden, tokens, strict=True):
        assert s1 == s2 and abs(l1 - l2) < 0.02 * l1  # bf16-stored vs recomputed fp32 hidden states
