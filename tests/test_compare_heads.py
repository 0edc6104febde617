from __future__ import annotations

import importlib.util

import pytest
from helpers import REPO, shared_prompts


def test_compare_heads_smoke(tmp_path):
    """The comparison harness end to end on tiny-llama: every family trained on one store and
    decoded losslessly in the same eval, one row per variant."""
    spec = importlib.util.spec_from_file_location("compare_heads", REPO / "benchmarks" / "compare_heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prompts = str(shared_prompts("vicuna_bench.jsonl"))
    variants = "mtp D=1,eagle3,medusa,diffusion L=4 S=2"
    doc = mod.main(
        ["--model", "tiny-llama", "--store", str(tmp_path / "store"), "--runs", str(tmp_path / "runs"),
         "--train-prompts", prompts, "--eval", prompts, "--prompts-count", "12", "--collect-new-tokens", "16",
         "--steps", "3", "--token-budget", "512", "--precision", "fp32", "--k", "2", "5",
         "--max-prompts", "2", "--max-new-tokens", "8", "--variants", variants, "--out", str(tmp_path / "c.json")]
    )  # fmt: skip
    assert doc["layers"] == [0, 1, 2]
    assert [r["variant"] for r in doc["rows"]] == variants.split(",")
    for r in doc["rows"]:
        ks = sorted(r["eval"]["vicuna_bench"])
        # K is capped by what a family can draft: Medusa 4 heads, diffusion L = 4.
        assert ks == ([2, 4] if r["head_type"] in ("medusa", "diffusion") else [2, 5]), r["variant"]
        for k, m in r["eval"]["vicuna_bench"].items():
            assert m["identical"] == m["num_prompts"] == 2 and len(m["per_position"]) == k
            assert m["draft_ms_per_step"] > 0 and 1 <= m["tau"] <= k + 1
        assert r["params"] > 0
    assert (tmp_path / "c.md").read_text().count("| eagle3 |") == 2
    assert (tmp_path / "c.png").stat().st_size > 0
    # Eval alone reuses the runs left by training and refuses a variant that was never trained.
    args = ["--model", "tiny-llama", "--store", str(tmp_path / "store"), "--runs", str(tmp_path / "runs"),
            "--eval", prompts, "--k", "2", "--max-prompts", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "e.json")]  # fmt: skip
    again = mod.main([*args, "--phases", "eval", "--variants", "diffusion L=4 S=1"])
    assert again["rows"][0]["params"] == doc["rows"][3]["params"]
    with pytest.raises(SystemExit):
        mod.main([*args, "--phases", "eval", "--variants", "mtp D=2"])
