"""Progress of long jobs (collect, train): a tqdm bar on a terminal, plain log lines elsewhere.

tqdm hides itself when stderr is not a terminal (nohup, CI, `mtpkit demo > log`), which left
such logs silent for a whole job. Off a terminal this prints one line every `every_s` seconds
instead, with the rate and an ETA, so a log file shows the job is alive and when it will end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

EVERY_S = 30.0  # seconds between plain progress lines


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """`update(n)` / `set_postfix(dict)` / `close()`, like a tqdm bar."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        unit: str = "it",
        desc: str = "",
        enabled: bool = True,
        every_s: float | None = None,  # None: EVERY_S
        stream: TextIO | None = None,
    ):
        self.stream = stream or sys.stderr
        self.total, self.n, self.unit, self.desc = total, initial, unit, desc
        self.every_s = EVERY_S if every_s is None else every_s
        self._start_n = initial
        self._postfix: dict = {}
        self._bar = None
        self._plain = False
        if enabled:
            if getattr(self.stream, "isatty", lambda: False)():
                self._bar = tqdm(
                    total=total,
                    initial=initial,
                    unit=unit,
                    desc=desc or None,
                    dynamic_ncols=True,
                    file=self.stream,
                )
            else:
                self._plain = True
        self._t0 = self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._plain and time.perf_counter() - self._last >= self.every_s:
            self._line()

    def tick(self) -> None:
        """Print a due plain line without advancing (work inside one long unit, e.g. a round)."""
        if self._plain and time.perf_counter() - self._last >= self.every_s:
            self._line()

    def set_postfix(self, postfix: dict | None = None, **fields) -> None:
        postfix = {**(postfix or {}), **fields}
        self._postfix = postfix
        if self._bar is not None:
            self._bar.set_postfix(postfix)

    def line(self) -> str:
        """The plain progress line: done/total, rate, elapsed, ETA and the postfix fields."""
        elapsed = time.perf_counter() - self._t0
        done = self.n - self._start_n  # this run's work: a resumed job's rate counts only it
        rate = done / elapsed if elapsed > 0 else 0.0
        left = max(self.total - self.n, 0)
        eta = _clock(left / rate) if rate > 0 else "?"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self._postfix.items())
        head = f"{self.desc}: " if self.desc else ""
        return (
            f"{head}{self.n}/{self.total} {self.unit}{pct} | {rate:.3g} {self.unit}/s | "
            f"elapsed {_clock(elapsed)} ETA {eta}{extra}"
        )

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last = time.perf_counter()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._plain:
            self._line()
            self._plain = False
