"""Distributed training on CPU: gloo process groups of 2 (and 4) processes, tiny models only.

Workers are started with torch.multiprocessing.spawn (or torchrun for the CLI), each with one
thread: two cores are shared by every process here.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from helpers import periodic_store
from safetensors.torch import load_file
from transformers import AutoConfig

from mtpkit.config import from_dict
from mtpkit.distributed import DistributedConfig, Parallel
from mtpkit.distributed.checkpoint import main as export_main
from mtpkit.distributed.mesh import DistributedError
from mtpkit.distributed.sampler import rank_batch
from mtpkit.distributed.tensor_parallel import (
    dense_plan,
    hf_layer_plan,
    layer_plan,
    load_parallel_target,
    parallelize_target,
)
from mtpkit.models import load_target
from mtpkit.models.tiny import build_tiny
from mtpkit.train import trainer as trainer_mod
from mtpkit.train.config import TrainConfig
from mtpkit.train.data import StoreSource, plan_batches
from mtpkit.train.trainer import train

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- launching workers
def _entry(rank: int, world: int, store: str, fn, args) -> None:
    # A file rendezvous: no port to race for with other test runs on the machine. The trainer
    # joins this process group as it would join torchrun's.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        torch.distributed.destroy_process_group()
    # All checks passed (a failure raised above, which spawn reports). Skip interpreter teardown,
    # where gloo's threads sometimes abort ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, f"{tmp}/store", fn, args), nprocs=world, join=True)


class _Stop(Exception):
    pass


def _train_worker(rank: int, world: int, cfg_dict: dict, resume: bool, stop_after: int | None) -> None:
    real_save = trainer_mod.save_checkpoint

    def save_then_stop(run, step, *args, **kwargs):  # as if killed right after that checkpoint
        real_save(run, step, *args, **kwargs)
        if step == stop_after:
            raise _Stop

    trainer_mod.save_checkpoint = save_then_stop
    try:  # world 1 runs in the test process itself: undo the patch
        with contextlib.suppress(_Stop):
            train(from_dict(TrainConfig, cfg_dict), resume=resume, target=load_target(cfg_dict["model"]))
    finally:
        trainer_mod.save_checkpoint = real_save


def run_training(cfg: dict, world: int, resume: bool = False, stop_after: int | None = None) -> None:
    if world == 1:
        _train_worker(0, 1, cfg, resume, stop_after)
    else:
        spawn(_train_worker, world, cfg, resume, stop_after)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama):
    return periodic_store(tmp_path_factory.mktemp("dist") / "store", tiny_llama, n=30, length=24)


def _cfg(store, out, **kw) -> dict:
    cfg = {
        "out": str(out),
        "model": "tiny-llama",
        "data": {"store": str(store), "token_budget": 160, "eval_fraction": 0.2},
        "head": {"num_depths": 1, "train_depths": 2},
        "max_steps": 8,
        "eval_every": 4,
        "save_every": 4,
        "log_every": 1,
        "progress": False,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }
    cfg.update(kw)
    return cfg


def _records(run: Path, split: str = "train") -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == split]


def assert_same_curve(a: Path, b: Path, rel: float = 1e-4) -> None:
    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, len(ra) + 1))
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "loss_d1", "loss_d2", "acc_d1", "grad_norm", "tokens", "lr"):
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-6), (x["step"], key, x[key], y[key])


def assert_same_head(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(a / "head" / "model.safetensors"), load_file(b / "head" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


# ---------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampler_covers_every_sample_once_per_epoch(world):
    lengths = {i: 5 + (i * 37) % 60 for i in range(0, 203, 2)}  # sparse ids, like a train split
    for epoch in range(3):
        plan = plan_batches(lengths, seed=7, epoch=epoch, token_budget=300)
        assert plan == plan_batches(lengths, seed=7, epoch=epoch, token_budget=300)  # deterministic
        seen = []
        for batch in plan:
            parts = [rank_batch(batch, r, world) for r in range(world)]
            real = [items for items, padding in parts if not padding]
            assert sorted(i for items in real for i in items) == sorted(batch)  # a partition
            sizes = [len(items) for items in real]
            assert max(sizes) - min(sizes) <= 1 and len(real) == min(world, len(batch))
            seen += [i for items in real for i in items]
        assert sorted(seen) == sorted(lengths)  # every sample exactly once per epoch


def test_store_source_shards_sum_to_the_global_batch(store):
    from mtpkit.data.store import Store

    def source(shard):
        return StoreSource(Store(store), 100, 2048, 0.2, 64, seed=3, shard=shard)

    whole = source((0, 1))
    ranks = [source((r, 4)) for r in range(4)]
    for _ in range(len(whole._plan) + 2):  # across an epoch boundary
        tokens = [s.next_batch().num_tokens for s in ranks]
        assert sum(tokens) == whole.next_batch().num_tokens
    assert [s.state_dict() for s in ranks] == [whole.state_dict()] * 4
    assert sum(b.num_tokens for s in ranks for b in s.eval_batches()) == sum(
        b.num_tokens for b in whole.eval_batches()
    )


# ---------------------------------------------------------------------------- tensor parallelism
def test_dense_plans_agree_with_transformers_tp_plan():
    for spec in ("tiny-llama", "tiny-qwen2"):
        config = load_target(spec).config
        assert dense_plan(config, 2) == hf_layer_plan(config)
    smollm2_like = type(
        "C", (), {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    )
    assert set(dense_plan(smollm2_like, 2)) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    # MoE / MLA families need a plan of their own; until one is registered, tp > 1 is refused.
    with pytest.raises(DistributedError, match="no tensor-parallel plan for model_type 'deepseek_v3'"):
        layer_plan(AutoConfig.for_model("deepseek_v3"), 2)


def _tp_worker(rank: int, world: int, saved: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    par = Parallel(DistributedConfig(tp=world), rank, world, torch.device("cpu"), mesh)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for spec in ("tiny-llama", "tiny-qwen2", saved):
        whole = load_target(spec)
        ref = whole.hidden_states(ids, layers=[1, whole.num_layers])
        ref_gen = whole.model.generate(ids, max_new_tokens=6, do_sample=False)
        q_rows = whole.backbone.layers[0].self_attn.q_proj.weight.shape[0]
        # Split after loading (tiny models), or loaded shard by shard from safetensors (a saved dir).
        target = (
            load_parallel_target(spec, par) if spec == saved else parallelize_target(load_target(spec), par)
        )
        assert target.identity() == whole.identity()
        local = target.backbone.layers[0].self_attn.q_proj.weight.to_local()
        assert local.shape[0] == q_rows // world  # really sharded
        torch.testing.assert_close(target.hidden_states(ids, layers=[1, target.num_layers]), ref)
        assert torch.equal(target.model.generate(ids, max_new_tokens=6, do_sample=False), ref_gen)


def test_tp2_target_hidden_states_equal_unsharded(tmp_path):
    model, tokenizer = build_tiny("llama", seed=1)
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    spawn(_tp_worker, 2, str(tmp_path / "llama"))


# ---------------------------------------------------------------------------- data parallel training
def test_torchrun_two_processes_match_one(tmp_path, store):
    """`mtpkit train` under torchrun (2 gloo ranks, FSDP2 per MTP module) == one process."""
    kw = {"head": {"num_depths": 2, "train_depths": 2}}
    run_training(_cfg(store, tmp_path / "one", **kw), 1)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(_cfg(store, tmp_path / "two", **kw)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "mtpkit.cli", "train", "--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_curve(tmp_path / "one", tmp_path / "two")
    ev1, ev2 = _records(tmp_path / "one", "eval"), _records(tmp_path / "two", "eval")
    assert [r["sim_tau_k2"] for r in ev1] == pytest.approx([r["sim_tau_k2"] for r in ev2], rel=1e-4)
    assert_same_head(tmp_path / "one", tmp_path / "two")
    shards = sorted(
        p.name for p in (tmp_path / "two" / "checkpoints" / "step-000008" / "state").glob("*.distcp")
    )
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard


def test_save_at_2_resume_at_1_and_save_at_1_resume_at_2(tmp_path, store):
    """Repeated-layer mode (one FSDP unit; then replication), cosine schedule: the curve continues."""
    run_training(_cfg(store, tmp_path / "ref"), 1)
    run_training(_cfg(store, tmp_path / "a"), 2, stop_after=4)
    assert len(_records(tmp_path / "a")) == 4
    run_training(_cfg(store, tmp_path / "a"), 1, resume=True)
    assert_same_curve(tmp_path / "ref", tmp_path / "a")
    assert_same_head(tmp_path / "ref", tmp_path / "a")

    run_training(_cfg(store, tmp_path / "b"), 1, stop_after=4)
    run_training(_cfg(store, tmp_path / "b", distributed={"data_parallel": "replicate"}), 2, resume=True)
    assert_same_curve(tmp_path / "ref", tmp_path / "b")
    assert_same_head(tmp_path / "ref", tmp_path / "b")

    # A sharded checkpoint exports to one safetensors head, the same as the run's final head.
    assert (
        export_main(
            [str(tmp_path / "b" / "checkpoints" / "step-000008"), str(tmp_path / "exported" / "head")]
        )
        == 0
    )
    assert_same_head(tmp_path / "b", tmp_path / "exported", atol=0)


def test_online_dp2_tp2_mesh_matches_one_process(tmp_path):
    """Online mode on a (dp=2, tp=2) mesh of 4 ranks: the target sharded over tp, the batch over dp."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"{w} abcdefg" for w in range(300)))
    online = {
        "prompts": [str(corpus)],
        "mode": "corpus",
        "sample_size": 24,
        "batch_size": 4,
        "eval_samples": 4,
    }
    kw = {"data": {"online": online}, "max_steps": 5, "eval_every": 5, "save_every": 5}
    run_training(_cfg(None, tmp_path / "one", **kw), 1)
    run_training(_cfg(None, tmp_path / "four", distributed={"tp": 2}, **kw), 4)
    assert_same_curve(tmp_path / "one", tmp_path / "four")
    assert_same_head(tmp_path / "one", tmp_path / "four")
    # The head is sharded over all 4 ranks (tp ranks included), so each wrote a shard.
    state = tmp_path / "four" / "checkpoints" / "step-000005" / "state"
    assert len(list(state.glob("__*_0.distcp"))) == 4
