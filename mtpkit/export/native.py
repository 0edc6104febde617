"""`native`: mtpkit's own head format (every head family), for `mtpkit eval` / `train --init-from`."""

from __future__ import annotations

import shutil
from pathlib import Path

from mtpkit.export.source import HeadSource
from mtpkit.heads import HEAD_CONFIG, HEAD_WEIGHTS


def write_native(src: HeadSource, out: Path, k: int) -> None:
    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        shutil.copy2(src.path / name, out / name)
