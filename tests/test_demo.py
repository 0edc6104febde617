from __future__ import annotations

import json
from pathlib import Path

from mtpkit.data.prompts import load_prompts
from mtpkit.demo import DemoConfig, run_demo


def test_builtin_demo_sets_are_disjoint_and_varied():
    train = load_prompts(["builtin:demo_train"])
    held_out = load_prompts(["builtin:demo_eval"])
    assert len(train) >= 64 and len(held_out) >= 12
    assert not {p.turns for p in train} & {p.turns for p in held_out}
    path = Path(train[0].source.rsplit(":", 1)[0])
    categories = {json.loads(line)["category"] for line in path.read_text().splitlines()}
    assert {"explain", "list", "code", "math", "rewrite"} <= categories


def test_demo_pipeline_end_to_end_and_rerun_reuses_work(tmp_path, capsys):
    cfg = DemoConfig(
        out=str(tmp_path / "demo"),
        model="tiny-llama",
        max_new_tokens=8,
        steps=4,
        k=(2,),
        eval_max_new_tokens=8,
        eval_prompts_count=2,
    )
    report = run_demo(cfg)
    assert report["identical"] == report["num_prompts"] == 2 and report["k"] == 2
    out = capsys.readouterr().out
    assert "1/3 collect" in out and "3/3 eval" in out and "speedup" in out
    head = tmp_path / "demo" / "mtp" / "head" / "model.safetensors"
    mtime = head.stat().st_mtime_ns
    again = run_demo(cfg)
    assert head.stat().st_mtime_ns == mtime  # the trained head is reused, not retrained
    assert "reusing the trained head" in capsys.readouterr().out
    assert again["num_prompts"] == 2
