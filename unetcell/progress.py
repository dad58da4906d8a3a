"""Progress that reads well in a terminal and in a log file.

tqdm redraws its bars in place with carriage returns and cursor moves; when stderr is a file
(CI logs, a Slurm job's output) every redraw becomes text, and nested bars fill the log with
lines such as "a.tif:  37%|###7 | 37/100 [...][A". `tqdm` here is a drop-in for the calls
unetcell makes: tqdm's own bar (a notebook widget in Jupyter) where it can redraw, else
`LogLines`, one plain line every LOG_INTERVAL seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, TextIO

LOG_INTERVAL = 30.0  # seconds between two lines of a log: a line per minute of a long slide or two


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class LogLines:
    """The part of tqdm's interface that unetcell uses (iterate, `update`, `with`, `close`),
    written as whole lines: "a.tif: 12/48 tiles (25%), 0:00:31 elapsed, about 0:01:33 left",
    at most every `interval` seconds, and "a.tif: 48/48 tiles in 0:02:04" when done."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        disable: bool = False,
        file: TextIO | None = None,
        interval: float = LOG_INTERVAL,
        **_tqdm_display_options: Any,  # leave, ncols, ...: nothing to redraw in a log
    ) -> None:
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self.file, self.interval = file, interval
        self.start = self.last = time.monotonic()
        self.closed = False

    def _write(self, text: str) -> None:
        stream = self.file if self.file is not None else sys.stderr
        stream.write(f"{self.desc}: {text}\n" if self.desc else f"{text}\n")
        stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.disable or now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        if self.total:
            left = elapsed * (self.total - self.n) / max(self.n, 1)
            self._write(f"{self.n}/{self.total} {self.unit}s ({100 * self.n // self.total}%), "
                        f"{_duration(elapsed)} elapsed, about {_duration(left)} left")
        else:
            self._write(f"{self.n} {self.unit}s, {_duration(elapsed)} elapsed")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable:
            count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
            self._write(f"{count} {self.unit}s in {_duration(time.monotonic() - self.start)}")

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tqdm(iterable: Iterable | None = None, **options: Any):
    """`tqdm.auto.tqdm(iterable, **options)` where the bar can be redrawn (a terminal, a
    notebook), `LogLines(iterable, **options)` where stderr is a file or a pipe."""
    from tqdm.auto import tqdm as auto

    in_notebook = any(cls.__module__ == "tqdm.notebook" for cls in auto.__mro__)
    stream = options.get("file") or sys.stderr
    if not in_notebook and not (hasattr(stream, "isatty") and stream.isatty()):
        return LogLines(iterable, **options)
    return auto(iterable, **options)
