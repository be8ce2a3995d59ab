"""Where the time of a run goes: `PhaseClock` times named phases (start-up, decode check, data
check, each extraction, each choice's trials, stage 1, stage 2, the refit on training and
validation images, test, report), and the rest is "other", so that the phases and "other" add
up to the run's total.

Phases nest, and each second counts once, for the innermost phase open: a choice's trials
that first extract features count the extraction under "extraction ...", the rest under the
choice; stage 1 is what is left of it once its choices and extractions are taken out.

The run's origin is the process's start when the command line runs it (`process_started`),
so "start-up" is the interpreter, the imports (TensorFlow, Keras) and the parsing before
`headstart.training.train` is called; from Python, without ``started``, the clock starts
at the call and there is no start-up phase.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

START_UP = "start-up"
OTHER = "other"


def process_started() -> float | None:
    """When this process started, as a `time.time()` value; None where it cannot be read.

    On Linux: the process's start in clock ticks after boot (field 22 of /proc/self/stat)
    against the boot clock now (CLOCK_BOOTTIME, the clock that field counts on), so a change
    of the wall clock since does not matter; to 1/CLK_TCK s (10 ms).
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the name may hold spaces, ")"
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22; fields[0] is field 3
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, IndexError, ValueError, AttributeError):  # not Linux
        return None
    return time.time() - age if age >= 0 else None


class PhaseClock:
    """Seconds by phase, each second counted once (for the innermost phase open).

    ``started``: when the run began, as a `time.time()` value (`process_started`); the time
    from then to now is the "start-up" phase. None: the clock starts now, no start-up.
    """

    def __init__(self, started: float | None = None):
        now = time.monotonic()
        self.seconds: dict[str, float] = {}  # in the order phases first end
        self.origin = now
        if started is not None:
            self.origin = now - max(0.0, time.time() - started)
            self.seconds[START_UP] = now - self.origin
        # [name, since when it counts (monotonic), seconds counted before], innermost last
        self._open: list[list] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the time inside the block for ``name`` (an open phase pauses meanwhile)."""
        now = time.monotonic()
        if self._open:
            self._open[-1][2] += now - self._open[-1][1]
        self._open.append([name, now, 0.0])
        try:
            yield
        finally:
            now = time.monotonic()
            _, since, counted = self._open.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + counted + now - since
            if self._open:
                self._open[-1][1] = now

    def total(self) -> float:
        """Seconds since the origin (the process's start, or the clock's creation)."""
        return time.monotonic() - self.origin

    def breakdown(self) -> tuple[float, dict[str, float]]:
        """(total, seconds by phase and "other"), rounded to 10 ms; "other" is the total less
        the phases, so the values add up to the total (phases still open are not counted)."""
        total = round(self.total(), 2)
        phases = {name: round(seconds, 2) for name, seconds in self.seconds.items()}
        phases[OTHER] = round(max(0.0, total - sum(phases.values())), 2)
        return total, phases


def breakdown_line(total: float, phases: dict[str, float]) -> str:
    """``time 101.2 s: start-up 4.1, decode check 2.0, ..., other 0.4``."""
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
    return f"time {total:.1f} s: {parts}"
