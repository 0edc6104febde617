"""Killed mid-write, `export` and `convert` leave the old output or the complete new one, never a
half-written directory, and a re-run succeeds (issue 20); `mtpkit.io.atomic_dir`'s own contract.

The kill is a real SIGKILL of a subprocess running the CLI, fired by a profile hook at the N-th
I/O step (a call in mtpkit, shutil or a file/rename primitive) after the temporary output
directory exists, at points spread over the writing and at the final rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mtpkit.cli import main
from mtpkit.io import OutputExistsError, atomic_dir

REPO = Path(__file__).resolve().parents[1]

# Runs `mtpkit ARGS` and SIGKILLs itself at I/O step N (N = 0: count the steps, print them as JSON).
_KILLER = r"""
import json, os, signal, sys, tempfile, types
import mtpkit.io as mio
from mtpkit.cli import main

kill_at, steps = int(sys.argv[1]), []
IO = {os.replace, os.rename, os.mkdir, os.makedirs, os.fsync, os.chmod, os.link, os.open, open}

def hook(frame, event, arg):
    if event == "call":
        f = frame.f_code.co_filename
        if "/mtpkit/" not in f and "safetensors" not in f and not f.endswith("shutil.py"):
            return
        name = frame.f_code.co_name
    elif event == "return" and frame.f_code.co_name == "_commit":  # just after the final rename
        name = "_commit:return"
    elif event == "c_call" and any(arg is io for io in IO):
        name = "c:" + arg.__name__
    else:
        return
    steps.append(name)
    if len(steps) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def mkdtemp(*a, **k):  # writing starts when atomic_dir has made its temporary directory
    path = tempfile.mkdtemp(*a, **k)
    sys.setprofile(hook)
    return path

mio.tempfile = types.SimpleNamespace(mkdtemp=mkdtemp, mkstemp=tempfile.mkstemp)
code = main(sys.argv[2:])
sys.setprofile(None)
if kill_at == 0:
    print("STEPS " + json.dumps(steps))
sys.exit(code)
"""


def _tree(root: Path) -> dict[str, str] | None:
    if not root.exists():
        return None
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _run_killed(argv: list[str], kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", _KILLER, str(kill_at), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _kill_points(steps: list[str], n: int = 2) -> list[int]:
    """n points spread over the writing, plus the last rename(s): 1-based step numbers."""
    total = len(steps)
    spread = {max(1, round(total * (i + 1) / (n + 1))) for i in range(n)}
    commit = [i + 1 for i, s in enumerate(steps) if s in ("_commit", "_exchange", "_commit:return")]
    return sorted(spread | set(commit[-3:]))


def _crash_campaign(argv: list[str], out: Path, old: dict | None, new: dict) -> list[str]:
    counted = _run_killed(argv, 0)
    assert counted.returncode == 0, counted.stderr
    steps = json.loads(counted.stdout.split("STEPS ", 1)[1])
    assert _tree(out) == new
    if old is None:
        shutil.rmtree(out)
    else:
        _restore(out, old)
    outcomes = []
    for point in _kill_points(steps):
        proc = _run_killed(argv, point)
        assert proc.returncode == -signal.SIGKILL, f"step {point} of {len(steps)}: not killed ({proc.stderr})"
        state = _tree(out)
        assert state in (old, new), f"killed at step {point} ({steps[point - 1]}): half-written {out}"
        outcomes.append(f"{point}/{len(steps)} {steps[point - 1]}: {'new' if state == new else 'old'}")
        # A re-run (of the same command) succeeds and leaves the complete new output.
        if state != new:
            assert main(argv) == 0
        assert _tree(out) == new
        if old is None:
            shutil.rmtree(out)
        else:
            _restore(out, old)
    return outcomes


_OLD: dict[Path, Path] = {}


def _restore(out: Path, old: dict) -> None:
    shutil.rmtree(out)
    shutil.copytree(_OLD[out], out)
    assert _tree(out) == old


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory):
    from mtpkit.heads import build_head, save_head
    from mtpkit.models import load_target

    target = load_target("tiny-deepseek_v3")
    return save_head(
        build_head(target, "mtp", {"num_depths": 1}), tmp_path_factory.mktemp("h") / "head", target
    )


def test_export_killed_mid_write_leaves_nothing_or_everything(trained_head, tmp_path):
    out = tmp_path / "served"
    argv = ["export", "--head", str(trained_head), "--format", "vllm-mtp", "--out", str(out)]
    assert main(argv) == 0
    new = _tree(out)
    shutil.rmtree(out)
    outcomes = _crash_campaign(argv, out, None, new)
    assert len(outcomes) >= 4 and any(o.endswith("new") for o in outcomes)
    assert any(o.endswith("old") for o in outcomes)
    print("\n".join(outcomes))
    assert not [p for p in tmp_path.iterdir() if p.name in ("served.tmp", "served.old")]


def test_convert_overwrite_killed_mid_write_keeps_old_or_new(tmp_path):
    from mtpkit.models.tiny import build_tiny

    src = tmp_path / "hf"
    model, tok = build_tiny("llama")
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "sharded"
    assert main(["convert", "hf-to-sharded", str(src), str(out), "--iteration", "1"]) == 0
    old = _tree(out)
    _OLD[out] = tmp_path / "old-copy"
    shutil.copytree(out, _OLD[out])
    argv = ["convert", "hf-to-sharded", str(src), str(out), "--tp", "2", "--iteration", "2", "--overwrite"]
    assert main(argv) == 0
    new = _tree(out)
    assert new != old
    _restore(out, old)
    outcomes = _crash_campaign(argv, out, old, new)
    assert len(outcomes) >= 4 and any(o.endswith("new") for o in outcomes)
    assert any(o.endswith("old") for o in outcomes)
    print("\n".join(outcomes))


# ---------------------------------------------------------------------------- atomic_dir itself
def test_atomic_dir_never_touches_names_it_did_not_create(tmp_path):
    for name in ("out.tmp", "out.old", ".out.tmp", ".out.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "out", replace=True) as tmp:
        (tmp / "a").write_text("2")
    assert (tmp_path / "out" / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", ".out.tmp", "out", "out.old", "out.tmp"]
    assert all((tmp_path / n / "f").read_text() == n for n in ("out.tmp", "out.old", ".out.tmp", ".out.old"))


def test_atomic_dir_failure_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, replace=True) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("disk full")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OutputExistsError, match="exists and is not empty"), atomic_dir(out):
        pass
    assert (out / "a").read_text() == "old"


def test_atomic_dir_gives_the_usual_permissions_and_fills_an_empty_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "a").read_text() == "x" and (out.stat().st_mode & 0o777) == (0o777 & ~mask)


def test_atomic_dir_without_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    import mtpkit.io as mio

    monkeypatch.setattr(mio, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for text in ("1", "2"):
        with atomic_dir(out, replace=True) as tmp:
            (tmp / "a").write_text(text)
    assert (out / "a").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
