"""The frame every training recipe runs in: head training (`train`), `sft` and `rl`.

A recipe builds its model, data and optimizer, then hands the frame three callables: one
optimisation step, an optional held-out evaluation and a checkpoint writer. The frame owns what
they share: the run directory (refused when not empty unless resuming), seeding, the resolved
config dump, metrics (JSONL + TensorBoard), resuming from the newest checkpoint, the
log / eval / save cadence, the progress bar and the learning-rate schedule. Like torchtitan's
one `Trainer` with a few override points: recipes keep only their own step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mtpkit.errors import MtpkitError
from mtpkit.progress import Progress
from mtpkit.train.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")


class RunError(MtpkitError, RuntimeError):
    """A run directory or checkpoint that cannot be used."""


class MetricsLogger:
    """JSONL (the record) + TensorBoard (the plots). Appends, so a resumed run continues both."""

    def __init__(self, run: Path, enabled: bool = True):
        self.path = run / "metrics.jsonl"
        self._tb, self.enabled = None, enabled  # only rank 0 of a distributed run writes
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run / "tb"))
        except ImportError:  # tensorboard is a dependency, but never fail a run over plots
            log.warning("tensorboard not installed; metrics go to %s only", self.path)

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            "split": split,
            **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a run resumes from)."""
        if self.enabled and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def lr_lambda(
    warmup_steps: int, schedule: str, min_lr_ratio: float, max_steps: int
) -> Callable[[int], float]:
    """LR factor per step: linear warmup, then cosine / linear decay to `min_lr_ratio`, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return factor


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


@dataclass
class Cadence:
    max_steps: int
    log_every: int
    save_every: int
    eval_every: int | None = None  # None: the recipe has no held-out evaluation

    def due(self, step: int, every: int | None) -> bool:
        """Every `every` steps, and always at the last one."""
        return every is not None and (step % every == 0 or step == self.max_steps)


class Run:
    """One run directory: refused when it holds anything unless resuming; rank 0 writes."""

    def __init__(
        self, out: str | Path, resume: bool, error: type[Exception] = RunError, is_main: bool = True
    ):
        self.dir = Path(out)
        self.resume, self.is_main = resume, is_main
        self.existing = self.dir.exists() and any(self.dir.iterdir())
        if self.existing and not resume:
            raise error(
                f"{self.dir}: run directory is not empty; pass --resume to continue it or choose another --out"
            )
        self.logger: MetricsLogger | None = None

    def open(self, resolved_config: dict[str, Any]) -> MetricsLogger:
        """Create the directory, dump the resolved config, start the metrics log."""
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        self.logger = MetricsLogger(self.dir, enabled=self.is_main)
        return self.logger

    def restore(self, load: Callable[[Path], dict]) -> dict | None:
        """With --resume, `load(newest checkpoint)` → its state (with "step"); metrics logged after
        that step are dropped, since the run redoes them."""
        if not self.resume:
            return None
        ckpt = latest_checkpoint(self.dir)
        if ckpt is None:
            if self.existing:
                log.warning("%s: no checkpoint to resume from; starting at step 0", self.dir)
                self.logger.truncate_after(0)
            return None
        state = load(ckpt)
        self.logger.truncate_after(state["step"])
        log.info("resumed %s at step %d", ckpt, state["step"])
        return state

    def loop(
        self,
        cadence: Cadence,
        step: int,
        train_step: Callable[[int], dict],
        save: Callable[[int], None],
        evaluate: Callable[[], dict] | None = None,
        progress: bool = True,
        postfix: Callable[[dict], dict] | None = None,
        eval_at_start: bool = False,
        tokens_at_start: int = 0,
    ) -> tuple[int, dict]:
        """Run steps `step`+1..max_steps; returns the last step and the last eval metrics.

        `train_step(step)` does one optimisation step and returns its metrics; a cumulative
        `tokens` count among them adds `tokens_per_s` since the last log."""
        last_eval: dict = {}
        if eval_at_start and evaluate is not None and step == 0:
            self.logger.log(0, "eval", evaluate())
        bar = Progress(cadence.max_steps, step, "step", "train", enabled=progress)
        t_last, tokens_last = time.perf_counter(), tokens_at_start
        try:
            while step < cadence.max_steps:
                metrics = train_step(step)
                step += 1
                bar.update(1)
                if cadence.due(step, cadence.log_every):
                    now = time.perf_counter()
                    if "tokens" in metrics:
                        metrics["tokens_per_s"] = (metrics["tokens"] - tokens_last) / max(now - t_last, 1e-9)
                        tokens_last = metrics["tokens"]
                    self.logger.log(step, "train", metrics)
                    if postfix is not None:
                        bar.set_postfix(postfix(metrics))
                    t_last = now
                if evaluate is not None and cadence.due(step, cadence.eval_every):
                    last_eval = evaluate()
                    self.logger.log(step, "eval", last_eval)
                if cadence.due(step, cadence.save_every):
                    save(step)
        finally:
            bar.close()
            self.logger.close()
        return step, last_eval
