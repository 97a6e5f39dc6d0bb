"""Progress of long loops: a rich bar on a terminal, plain lines in a log.

A profile runs for many minutes. When stderr is a file or a pipe (a job's log, a CI step), a rich bar writes
nothing there and the log stays silent for the whole run, so there every task writes one plain line at most every
`every` seconds, and one when it ends:

    factors, half a: 96/128, 4m12s

    with Progress(enabled=verbose) as progress:
        task = progress.task("noise injection", total=len(layers))
        for layer in layers:
            ...
            task.advance()
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

# Often enough that a log shows a long phase moving, rarely enough that it stays readable.
LOG_EVERY_S = 10.0


def elapsed(seconds: float) -> str:
    """A duration for a log line: 42s, 4m12s, 1h03m."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Task:
    """One loop's count. `advance` only from the thread that made the task."""

    def __init__(self, progress: "Progress", description: str, total: int, done: int = 0):
        self.progress, self.description, self.total, self.done = progress, description, total, done
        self.started = progress.clock()
        self.logged = self.started
        self._bar_id = progress.bar.add_task(description, total=total, completed=done) if progress.bar else None

    def advance(self, n: int = 1) -> None:
        self.done += n
        p = self.progress
        if p.bar is not None:
            p.bar.advance(self._bar_id, n)
        elif p.log is not None and n:
            now = p.clock()
            if self.done >= self.total or now - self.logged >= p.every:
                self.logged = now
                p.log.write(f"{self.description}: {self.done}/{self.total}, {elapsed(now - self.started)}\n")
                p.log.flush()


class Progress:
    """Context manager handing out `Task`s: a transient rich bar when `stream` (default stderr) is a terminal,
    else a line per task at most every `every` seconds; nothing at all when not `enabled`."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, every: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled, self.every, self.clock = enabled, every, clock
        self.stream = sys.stderr if stream is None else stream
        self.bar = None     # rich.progress.Progress on a terminal
        self.log = None     # the stream, for plain lines

    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=self.stream),
                                    transient=True)
            self.bar.__enter__()
        else:
            self.log = self.stream
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        self.bar = self.log = None

    def task(self, description: str, total: int, done: int = 0) -> Task:
        return Task(self, description, total, done)
