"""A hostile user's sweep over every command, kept in the suite (issue 20).

Each case runs `mtpkit.cli.main` in-process on tiny targets and asserts (a) a non-zero exit with a
message naming the file, line or field, (b) no Python traceback (an exception escaping `main` fails
the case; the printed error must hold no "Traceback"), and (c) every file of the workspace — the
store, run directories, heads, exports, prompt files and a user's `OUT.tmp` beside an output —
byte-identical afterwards, with nothing added. A few cases also run as real subprocesses to check
the real stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mtpkit.cli import main

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root: relative path -> sha256 of its bytes ('dir' for dirs)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace every case runs in: a store, a trained run, heads, an export, prompt files."""
    from mtpkit.heads import build_head, save_head
    from mtpkit.models import load_target
    from mtpkit.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("ws")
    w = {"root": root}
    files = {
        "instances.jsonl": '{"instruction": "Add", "instances": [1, 2]}\n',
        "corpus_array.jsonl": '{"text": "fine"}\n[1, 2, 3]\n',
        "empty.jsonl": "",
        "blank.txt": "\n   \n\t\n",
        "broken.jsonl": '{"prompt": "ok"}\n{"prompt": \n',
        "latin1.jsonl": '{"prompt": "caf\xe9"}\n'.encode("latin-1"),
        "no_answer.jsonl": '{"question": "1 + 1", "answer": 2}\n',
        "good.jsonl": '{"prompt": "Say hi"}\n{"prompt": "Count to three"}\n',
        "bad_key.yaml": "modle: tiny-llama\n",
        "bad_type.yaml": "max_new_tokens: lots\n",
        "not_mapping.yaml": "- a\n- b\n",
        "bad_yaml.yaml": "a: [1, 2\n",
        "train_bad.yaml": "optim:\n  lr: 1e-3\n  warmup: 5\n",
        "convert_bad.yaml": "tpp: 2\n",
        "export_bad.yaml": "k: 0\n",
    }
    for name, text in files.items():
        path = root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        w[Path(name).stem] = str(path)

    store = root / "store"
    assert main(["collect", "--model", "tiny-llama", "--prompts", "builtin", "--out", str(store),
                 "--max-prompts", "4", "--max-new-tokens", "4", "--no-progress"]) == 0  # fmt: skip
    w["store"] = str(store)
    run = root / "run"
    train = ["train", f"data.store={store}", "--out", str(run), "max_steps=2", "progress=false"]
    assert main([*train, "data.token_budget=256", "data.eval_fraction=0.25", "save_every=1"]) == 0
    w["run"] = str(run)

    # A run whose newest checkpoint lost half of its DCP shard (a disk that filled up).
    broken = root / "broken_run"
    import shutil

    shutil.copytree(run, broken)
    shard = next((broken / "checkpoints" / "step-000002" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    w["broken_run"] = str(broken)

    target = load_target("tiny-llama")
    eagle = save_head(build_head(target, "eagle3", {"draft_vocab_size": 64}), root / "eagle_head", target)
    w["eagle_head"] = str(eagle)
    reshaped = root / "reshaped_head"  # config.json says another draft vocabulary than the weights have
    shutil.copytree(eagle, reshaped)
    meta = json.loads((reshaped / "config.json").read_text())
    meta["head_config"]["draft_vocab_size"] = 128
    (reshaped / "config.json").write_text(json.dumps(meta))
    w["reshaped_head"] = str(reshaped)
    corrupt = root / "corrupt_head"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('["not", "a", "head"]')
    w["corrupt_head"] = str(corrupt)

    export = root / "export"
    assert main(["export", "--head", str(run), "--format", "native", "--out", str(export)]) == 0
    w["export"] = str(export)
    user_tmp = root / "export2.tmp"  # a user's own directory beside an export target
    user_tmp.mkdir()
    (user_tmp / "notes.txt").write_text("mine")
    w["export2"] = str(root / "export2")

    hf = root / "hf"
    model, tok = build_tiny("llama")
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    w["hf"] = str(hf)
    w["converted"] = str(root / "converted")
    assert main(["convert", "hf-to-sharded", str(hf), w["converted"]]) == 0
    return w


# (id, argv with {placeholders} from the workspace, regex the error must match)
CASES = [
    # ---- collect
    ("collect-instances-not-objects", "collect --model tiny-llama --prompts {instances} --out {store}",
     r"instances\.jsonl:1: instances\[0\] must be an object"),
    ("collect-corpus-array-record", "collect --model tiny-llama --mode corpus --prompts {corpus_array} "
     "--sample-size 8 --out {store}", r"corpus_array\.jsonl:2: a record must be a JSON object, got list"),
    ("collect-max-prompts-negative", "collect --model tiny-llama --prompts builtin --out {store} --max-prompts -1",
     r"--max-prompts: max_prompts must be >= 1, got -1"),
    ("collect-max-prompts-zero", "collect --model tiny-llama --prompts builtin --out {store} --max-prompts 0",
     r"--max-prompts: max_prompts must be >= 1, got 0"),
    ("collect-max-length-zero", "collect --model tiny-llama --prompts builtin --out {store} --max-length 0",
     r"--max-length: max_length must be >= 2, got 0"),
    ("collect-max-length-below-answer", "collect --model tiny-llama --prompts builtin --out {store} "
     "--max-length 100", r"--max-length: max_length \(100\) must exceed max_new_tokens \(256\)"),
    ("collect-empty-file", "collect --model tiny-llama --prompts {empty} --out {store}",
     r"empty\.jsonl: no prompts"),
    ("collect-blank-file", "collect --model tiny-llama --prompts {blank} --out {store}",
     r"blank\.txt: no prompts"),
    ("collect-all-skipped", "collect --model tiny-llama --prompts {instances} --skip-bad --out {store}",
     r"instances\.jsonl: no prompts"),
    ("collect-malformed-json", "collect --model tiny-llama --prompts {broken} --out {store}",
     r"broken\.jsonl:2: malformed JSON"),
    ("collect-not-utf8", "collect --model tiny-llama --prompts {latin1} --out {store}",
     r"latin1\.jsonl:1: not UTF-8"),
    ("collect-missing-file", "collect --model tiny-llama --prompts {root}/nope.jsonl --out {store}",
     r"nope\.jsonl: prompt file not found"),
    ("collect-batch-size-zero", "collect --model tiny-llama --prompts builtin --out {store} --batch-size 0",
     r"--batch-size: batch_size must be >= 1, got 0"),
    ("collect-top-p", "collect --model tiny-llama --prompts builtin --out {store} --top-p 2",
     r"--top-p: top_p must be in \(0, 1\], got 2"),
    ("collect-format", "collect --model tiny-llama --prompts builtin --out {store} --format chatml",
     r"--format: format must be one of"),
    ("collect-layers", "collect --model tiny-llama --prompts builtin --out {store} --layers 0,99",
     r"layer 99 out of range for tiny-llama"),
    ("collect-yaml-unknown", "collect --config {bad_key}",
     r"bad_key\.yaml: unknown field\(s\) \['modle'\] \(did you mean 'model'\?\)"),
    ("collect-yaml-type", "collect --config {bad_type} --model tiny-llama --prompts builtin --out {store}",
     r"bad_type\.yaml: max_new_tokens: expected an integer, got 'lots'"),
    ("collect-yaml-not-mapping", "collect --config {not_mapping}",
     r"not_mapping\.yaml: a config file must be a mapping"),
    ("collect-yaml-syntax", "collect --config {bad_yaml}", r"bad_yaml\.yaml: invalid YAML"),
    ("collect-override-typo", "collect --model tiny-llama --prompts builtin --out {store} max_prompt=3",
     r"override 'max_prompt=3': unknown field\(s\) \['max_prompt'\] \(did you mean 'max_prompts'\?\)"),
    ("collect-sample-size", "collect --model tiny-llama --mode corpus --prompts builtin --out {store} "
     "--sample-size 1", r"--sample-size: sample_size must be >= 2"),
    # ---- train
    ("train-eval-fraction", "train data.store={store} --out {root}/t1 data.eval_fraction=2",
     r"override 'data\.eval_fraction=2': data\.eval_fraction must be in \[0, 1\), got 2"),
    ("train-save-every-zero", "train data.store={store} --out {root}/t1 save_every=0",
     r"override 'save_every=0': save_every must be >= 1, got 0"),
    ("train-eval-every-zero", "train data.store={store} --out {root}/t1 eval_every=0", r"eval_every must be >= 1"),
    ("train-log-every-zero", "train data.store={store} --out {root}/t1 log_every=0", r"log_every must be >= 1"),
    ("train-token-budget-zero", "train data.store={store} --out {root}/t1 data.token_budget=0",
     r"data\.token_budget must be >= 1, got 0"),
    ("train-max-seq-len", "train data.store={store} --out {root}/t1 data.max_seq_len=1",
     r"data\.max_seq_len must be >= 2"),
    ("train-betas", "train data.store={store} --out {root}/t1 optim.betas=[0.9,1.5]",
     r"optim\.betas must be in \[0, 1\), got \[0\.9, 1\.5\]"),
    ("train-typo-section", "train data.store={store} --out {root}/t1 optim.lrr=1",
     r"override 'optim\.lrr=1': optim: unknown field\(s\) \['lrr'\] \(did you mean 'lr'\?\)"),
    ("train-yaml-typo", "train --config {train_bad} data.store={store} --out {root}/t1",
     r"train_bad\.yaml: optim: unknown field\(s\) \['warmup'\] \(did you mean 'warmup_steps'\?\)"),
    ("train-head-field-typo", "train data.store={store} --out {root}/t1 head.num_depth=2",
     r"override 'head\.num_depth=2': head: unknown field\(s\) \['num_depth'\] \(did you mean 'num_depths'\?\)"),
    ("train-head-family", "train data.store={store} --out {root}/t1 --head eagle9",
     r"--head: head_type: unknown head type 'eagle9'"),
    ("train-type", "train data.store={store} --out {root}/t1 max_steps=many",
     r"override 'max_steps=many': max_steps: expected an integer, got 'many'"),
    ("train-precision", "train data.store={store} --out {root}/t1 precision=fp8", r"precision must be fp32 or bf16"),
    ("train-missing-store", "train data.store={root}/nostore --out {root}/t1 model=tiny-llama", r"nostore"),
    ("train-run-not-empty", "train data.store={store} --out {run}", r"run: run directory is not empty"),
    ("train-resume-truncated-shard", "train data.store={store} --out {broken_run} --resume max_steps=3",
     r"step-000002: corrupt or incomplete checkpoint \(shard .*__0_0\.distcp: truncated.*"
     r"last good checkpoint is .*step-000001"),
    ("train-config-missing", "train --config {root}/nope.yaml", r"nope\.yaml: config file not found"),
    ("train-override-syntax", "train data.store={store} --out {root}/t1 .lr=3", r"override '\.lr=3': expected"),
    # ---- eval
    ("eval-max-prompts-negative", "eval --head {run} --prompts {good} --out {root}/r.json --max-prompts -1",
     r"--max-prompts: max_prompts must be >= 1, got -1"),
    ("eval-k-zero", "eval --head {run} --prompts {good} --out {root}/r.json -k 0", r"-k must be >= 1"),
    ("eval-temperature", "eval --head {run} --prompts {good} --out {root}/r.json --temperature -1",
     r"--temperature: temperature must be >= 0"),
    ("eval-head-shape", "eval --head {reshaped_head} --prompts {good} --out {root}/r.json",
     r"reshaped_head/model\.safetensors: weights do not fit the eagle3 head that .*reshaped_head/config\.json "
     r"describes .*draft_vocab_size.*is \[64.*for the config"),
    ("eval-corrupt-head", "eval --head {corrupt_head} --prompts {good} --out {root}/r.json",
     r"corrupt_head/config\.json: not an mtpkit head config"),
    ("eval-no-head", "eval --head {root}/nohead --prompts {good} --out {root}/r.json",
     r"nohead: not an mtpkit head directory"),
    ("eval-empty-prompts", "eval --head {run} --prompts {empty} --out {root}/r.json", r"empty\.jsonl"),
    ("eval-denoising-mtp", "eval --head {run} --prompts {good} --out {root}/r.json --denoising-steps 2",
     r"denoising_steps applies to diffusion heads"),
    ("eval-missing-head-flag", "eval --prompts {good}", r"missing required field\(s\) \['head'\]"),
    # ---- export
    ("export-k-zero", "export --head {run} --format native --out {root}/e1 -k 0", r"-k: k must be >= 1, got 0"),
    ("export-k-negative", "export --head {run} --format native --out {root}/e1 -k -2",
     r"-k: k must be >= 1, got -2"),
    ("export-out-not-empty", "export --head {run} --format native --out {export}",
     r"export: exists and is not empty"),
    ("export-wrong-family", "export --head {eagle_head} --format vllm-mtp --out {export2}",
     r"vllm-mtp cannot represent a 'eagle3' head"),
    ("export-format-choice", "export --head {run} --format vllm --out {root}/e1",
     r"argument --format: invalid choice: 'vllm'"),
    ("export-yaml-k", "export --config {export_bad} --head {run} --format native --out {root}/e1",
     r"export_bad\.yaml: k must be >= 1, got 0"),
    ("export-no-head", "export --head {root}/nohead --format native --out {root}/e1", r"nohead"),
    # ---- convert
    ("convert-tp-zero", "convert hf-to-sharded {hf} {root}/c1 --tp 0", r"--tp: tp must be >= 1, got 0"),
    ("convert-tp-divide", "convert hf-to-sharded {hf} {root}/c1 --tp 3", r"--tp 3 does not divide"),
    ("convert-out-exists", "convert hf-to-sharded {hf} {converted}", r"converted already exists"),
    ("convert-size", "convert sharded-to-hf {converted} {root}/c1 --max-shard-size 5XB",
     r"argument --max-shard-size: expected a size"),
    ("convert-yaml-unknown", "convert hf-to-sharded {hf} {root}/c1 --config {convert_bad}",
     r"convert_bad\.yaml: unknown field\(s\) \['tpp'\] \(did you mean 'tp'\?\)"),
    ("convert-mtp-layers", "convert hf-to-sharded {hf} {root}/c1 --mtp-num-layers -2",
     r"--mtp-num-layers: mtp_num_layers must be >= -1 \(-1 = all the source holds\), got -2"),
    ("convert-exclusive", "convert hf-to-sharded {hf} {root}/c1 --num-layer-list 1,1 --noop-layers 1",
     r"--num-layer-list and --noop-layers are mutually exclusive"),
    ("convert-merge-no-lora", "convert merge-lora {hf} {root}/c1", r"merge-lora: pass --lora"),
    ("convert-missing-src", "convert hf-to-sharded {root}/nosrc {root}/c1", r"nosrc"),
    # ---- sft / rl (refused before the model is loaded)
    ("sft-max-steps", "sft --out {root}/s1 max_steps=0", r"override 'max_steps=0': max_steps must be >= 1, got 0"),
    ("sft-batch-size", "sft --out {root}/s1 data.batch_size=0", r"data\.batch_size must be >= 1, got 0"),
    ("sft-policy-mode", "sft --out {root}/s1 policy.mode=half", r"policy\.mode must be one of"),
    ("sft-lora-dropout", "sft --out {root}/s1 policy.lora.dropout=1.5",
     r"policy\.lora\.dropout must be in \[0, 1\), got 1\.5"),
    ("sft-no-data", "sft --out {root}/s1 model=tiny-llama", r"set data\.paths"),
    ("sft-record-without-answer", "sft --out {root}/s1 model=tiny-llama policy.mode=full data.paths=[{no_answer}]",
     r"no_answer\.jsonl:1: no answer to train on"),
    ("rl-malformed-json", "rl --out {root}/r1 model=tiny-llama policy.mode=full prompts=[{broken}]",
     r"broken\.jsonl:2: malformed JSON"),
    ("rl-unknown-reward", "rl --out {root}/r1 model=tiny-llama policy.mode=full prompts=[{good}] rewards=[nope]",
     r"unknown reward 'nope'"),
    ("sft-head-typo", "sft --out {root}/s1 head.depths=2", r"head: unknown field\(s\) \['depths'\]"),
    ("rl-group-size", "rl --out {root}/r1 algo.group_size=1", r"algo\.group_size must be >= 2, got 1"),
    ("rl-rollout-k", "rl --out {root}/r1 rollout.k=0", r"rollout\.k must be >= 1, got 0"),
    ("rl-typo", "rl --out {root}/r1 algo.grup_size=4", r"algo: unknown field\(s\) \['grup_size'\] \(did you mean"),
    ("rl-no-prompts", "rl --out {root}/r1 model=tiny-llama", r"set prompts"),
    ("rl-config-dir", "rl --config {root}", r"cannot read config file"),
]  # fmt: skip


def _argv(template: str, ws: dict) -> list[str]:
    return [part.format(**ws) for part in template.split()]


@pytest.mark.parametrize(("template", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(ws, capsys, template, expect):
    argv = _argv(template, ws)
    before = _snapshot(ws["root"])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage + "error: argument ..." on stderr
        code = exc.code
    except BaseException as exc:
        pytest.fail(f"{' '.join(argv)}: escaped main as a traceback: {type(exc).__name__}: {exc}")
    err = capsys.readouterr().err
    assert code not in (0, None), f"accepted: {' '.join(argv)}"
    assert "Traceback" not in err
    assert re.search(expect, err), f"{err!r} does not match {expect!r}"
    assert _snapshot(ws["root"]) == before


def test_the_sweep_covers_every_command_with_enough_cases():
    commands = {c[1].split()[0] for c in CASES}
    assert commands == {"collect", "train", "eval", "export", "convert", "sft", "rl"}
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "name", ["collect-instances-not-objects", "train-resume-truncated-shard", "export-k-zero"]
)
def test_real_stderr_holds_no_traceback(ws, name):
    template, expect = next(c[1:] for c in CASES if c[0] == name)
    before = _snapshot(ws["root"])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mtpkit.cli", *_argv(template, ws)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert re.search(expect, proc.stderr), proc.stderr
    assert _snapshot(ws["root"]) == before


def test_skip_bad_skips_malformed_instances_and_array_records(tmp_path):
    from mtpkit.data.prompts import load_documents, load_prompts

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        '{"instruction": "Add", "instances": [1, 2]}\n'
        '{"instruction": "Add", "instances": [{"input": "1 + 2"}]}\n[1]\n{"prompt": "hi"}\n'
    )
    assert [p.source for p in load_prompts([mixed], skip_bad=True)] == [f"{mixed}:2:0", f"{mixed}:4"]
    assert [d.source for d in load_documents([mixed], skip_bad=True)] == [f"{mixed}:2", f"{mixed}:4"]


def test_export_leaves_a_users_tmp_sibling_alone(ws, tmp_path):
    """The data-loss case: `export --out OUT` used to delete a user's OUT.tmp."""
    out = tmp_path / "served"
    mine = tmp_path / "served.tmp"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    old = tmp_path / "served.old"
    old.mkdir()
    (old / "keep.txt").write_text("user data too")
    assert main(["export", "--head", ws["run"], "--format", "native", "--out", str(out)]) == 0
    assert (mine / "keep.txt").read_text() == "user data" and (
        old / "keep.txt"
    ).read_text() == "user data too"
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served", "served.old", "served.tmp"]


def test_save_head_leaves_users_tmp_and_old_siblings_alone(ws, tmp_path, tiny_llama):
    from mtpkit.heads import build_head, load_head, save_head

    for name in ("h.tmp", "h.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text(name)
    save_head(build_head(tiny_llama, "mtp", {}), tmp_path / "h", tiny_llama)
    save_head(build_head(tiny_llama, "mtp", {"num_depths": 2}), tmp_path / "h", tiny_llama)  # replaces
    assert load_head(tmp_path / "h", tiny_llama).cfg.num_depths == 2
    assert [(tmp_path / n / "x").read_text() for n in ("h.tmp", "h.old")] == ["h.tmp", "h.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "h.old", "h.tmp"]


def test_meaningful_values_are_accepted(tmp_path):
    """What is documented as meaningful stays accepted: 0 = greedy, lr 0 = frozen, -1 = all MTP layers."""
    from mtpkit.config import load_config
    from mtpkit.convert.command import ConvertConfig
    from mtpkit.data.collect import CollectConfig
    from mtpkit.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["optim.lr=0", "simulate_k=0", "data.eval_fraction=0"])
    assert cfg.optim.lr == 0 and cfg.simulate_k == 0 and cfg.data.eval_fraction == 0
    c = load_config(CollectConfig, None, [], {"model": "m", "prompts": ["p"], "out": "o", "temperature": 0})
    assert c.temperature == 0.0 and c.max_prompts is None
    conv = load_config(ConvertConfig, None, ["max_shard_size=300KB"], {"src": "a", "out": "b"})
    assert conv.max_shard_size == 300 * 1024 and conv.mtp_num_layers == -1
