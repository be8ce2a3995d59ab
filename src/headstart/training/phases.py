"""Where the time of a run goes: `PhaseClock` times named phases (start-up, decode check, data
check, each extraction, each choice's trials, stage 1, stage 2, the refit on training and
validation images, test, report), and the rest is "other", so that the phases and "other" add
up to the run's total.

Phases nest, and each second counts once, for the innermost phase open: a choice's trials
that first extract features count the extraction under "extraction ...", the rest under the
choice; stage 1 is what is left of it once its choices and extractions are taken out.

Each phase's CPU time (the whole process's, every thread) is counted the same way: CPU seconds
over wall seconds is how many cores the phase kept busy, which says where a run waits on one
core while the others idle (`cores_line`).

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

import numpy as np

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


def _now() -> np.ndarray:
    """(wall, CPU) seconds on clocks that only go forward."""
    return np.array([time.monotonic(), time.process_time()])


class PhaseClock:
    """Seconds by phase, wall and CPU, each counted once (for the innermost phase open).

    ``started``: when the run began, as a `time.time()` value (`process_started`); the time
    from then to now is the "start-up" phase (its CPU: all the process used so far). None:
    the clock starts now, no start-up.
    """

    def __init__(self, started: float | None = None):
        now = _now()
        self._spent: dict[str, np.ndarray] = {}  # (wall, CPU) in the order phases first end
        self._origin = now.copy()
        if started is not None:
            self._origin = now - [max(0.0, time.time() - started), now[1]]
            self._spent[START_UP] = now - self._origin
        # [name, since when it counts, (wall, CPU) counted before], innermost last
        self._open: list[list] = []

    @property
    def seconds(self) -> dict[str, float]:
        """Wall seconds by phase ended, in the order they first ended."""
        return {name: float(spent[0]) for name, spent in self._spent.items()}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the time inside the block for ``name`` (an open phase pauses meanwhile)."""
        now = _now()
        if self._open:
            self._open[-1][2] += now - self._open[-1][1]
        self._open.append([name, now, np.zeros(2)])
        try:
            yield
        finally:
            now = _now()
            _, since, counted = self._open.pop()
            self._spent[name] = self._spent.get(name, 0.0) + counted + now - since
            if self._open:
                self._open[-1][1] = now

    def total(self) -> float:
        """Seconds since the origin (the process's start, or the clock's creation)."""
        return time.monotonic() - self._origin[0]

    def breakdown(self) -> tuple[float, dict[str, float]]:
        """(total, seconds by phase and "other"), rounded to 10 ms; "other" is the total less
        the phases, so the values add up to the total (phases still open are not counted)."""
        return self._breakdown(0)

    def cpu_breakdown(self) -> tuple[float, dict[str, float]]:
        """As `breakdown`, in CPU seconds of the whole process (every thread)."""
        return self._breakdown(1)

    def _breakdown(self, clock: int) -> tuple[float, dict[str, float]]:
        total = round(float(_now()[clock] - self._origin[clock]), 2)
        phases = {name: round(float(spent[clock]), 2) for name, spent in self._spent.items()}
        phases[OTHER] = round(max(0.0, total - sum(phases.values())), 2)
        return total, phases


def breakdown_line(total: float, phases: dict[str, float]) -> str:
    """``time 101.2 s: start-up 4.1, decode check 2.0, ..., other 0.4``."""
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
    return f"time {total:.1f} s: {parts}"


def cores_line(wall: dict[str, float], cpu: dict[str, float], least: float = 1.0) -> str:
    """``cores busy: 1.4 overall; extraction clean 1.9, fine-tuning rate 1.0, ...``: CPU over
    wall seconds, for the phases of at least ``least`` wall seconds, longest first."""
    total = sum(cpu.values()) / max(sum(wall.values()), 1e-9)
    long = sorted((name for name in wall if wall[name] >= least), key=lambda n: -wall[n])
    parts = "".join(f", {name} {cpu[name] / wall[name]:.1f}" for name in long)
    return f"cores busy: {total:.1f} overall{';' if parts else ''}{parts[1:]}"
