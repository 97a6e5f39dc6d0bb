"""Progress lines in a log (stderr not a terminal): throttled, naming the phase, ending at N/N."""
from __future__ import annotations

import io
import re

from bitplan.progress import Progress, elapsed


class Clock:
    """A clock the test moves by hand: each step of the loop below takes 3 s."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_log_gets_a_line_at_most_every_10_s_and_one_at_the_end():
    stream, clock = io.StringIO(), Clock()
    n = 20
    with Progress(stream=stream, every=10.0, clock=clock) as progress:
        task = progress.task("factors, half a", n)
        for _ in range(n):
            clock.now += 3.0
            task.advance()
    lines = stream.getvalue().splitlines()
    parsed = [re.fullmatch(r"factors, half a: (\d+)/20, (\S+)", line) for line in lines]
    assert all(parsed), lines
    done = [int(m.group(1)) for m in parsed]
    # steps of 3 s and a line once 10 s have passed since the last one: after steps 4, 8, 12, 16, 20
    assert done == [4, 8, 12, 16, 20]
    assert parsed[-1].group(2) == "1m00s"   # 20 steps × 3 s


def test_a_fast_loop_writes_only_its_last_line_and_a_resumed_task_counts_from_where_it_was():
    stream, clock = io.StringIO(), Clock()
    with Progress(stream=stream, clock=clock) as progress:
        task = progress.task("noise injection", 7, done=3)
        for _ in range(4):
            task.advance()
    assert stream.getvalue() == "noise injection: 7/7, 0s\n"


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    with Progress(enabled=False, stream=stream) as progress:
        task = progress.task("format errors", 3)
        for _ in range(3):
            task.advance()
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_transient_bar_instead_of_lines():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    with Progress(stream=stream) as progress:
        assert progress.bar is not None and progress.log is None
        task = progress.task("coefficients (block LDL)", 2)
        task.advance(2)
    assert "coefficients (block LDL): 2/2" not in stream.getvalue()


def test_elapsed():
    assert [elapsed(s) for s in (0, 42.9, 60, 252, 3600 + 180)] == ["0s", "42s", "1m00s", "4m12s", "1h03m"]
