"""Progress of long work: a live bar on a terminal, a plain line every few seconds elsewhere.

Under torchrun, in CI or behind `nohup`, output goes to a file or a pipe, where a tqdm bar turns
into thousands of carriage-return updates per rank. There a `ProgressLines` prints one ordinary
line every `interval` seconds (and one at the end) instead. Only the rank that reports should
pass `enabled=True`.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

DEFAULT_INTERVAL = 30.0


class ProgressLines:
    """tqdm's `update` / `set_postfix` / `close`, printed as a plain line at most every `interval` s."""

    def __init__(self, total: int | None, desc: str, initial: int = 0, interval: float = DEFAULT_INTERVAL,
                 stream=None) -> None:
        self.total, self.desc, self.n, self.interval = total, desc, initial, interval
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: dict = {}
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print()

    def set_postfix(self, values: dict, refresh: bool = False) -> None:
        self.postfix = dict(values)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print()

    def _print(self) -> None:
        elapsed = time.monotonic() - self._start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {count}{percent} {elapsed:.0f}s{extra}", file=self.stream, flush=True)


def progress(total: int | None, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it",
             interval: float = DEFAULT_INTERVAL, leave: bool = True):
    """A tqdm bar on a terminal, `ProgressLines` when stderr is not one, nothing when disabled."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
    return ProgressLines(total, desc, initial, interval)
