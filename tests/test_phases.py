"""Every second of a run accounted for: metrics.json's ``phase_seconds`` (with "other") add up
to ``total_seconds``, each second counted once, for the innermost phase open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headstart.training.phases import PhaseClock, breakdown_line, cores_line, process_started

ROOT = Path(__file__).resolve().parents[1]


def test_nested_phases_count_each_second_once_and_other_is_the_rest():
    clock = PhaseClock()
    time.sleep(0.05)  # other
    with clock.phase("stage 1"):
        time.sleep(0.05)
        with clock.phase("extraction clean"):
            time.sleep(0.1)
        time.sleep(0.05)
        with clock.phase("extraction clean"):
            time.sleep(0.05)
    total, phases = clock.breakdown()
    assert list(phases) == ["extraction clean", "stage 1", "other"]  # in the order they end
    assert phases["extraction clean"] == pytest.approx(0.15, abs=0.03)
    assert phases["stage 1"] == pytest.approx(0.1, abs=0.03)
    assert phases["other"] == pytest.approx(0.05, abs=0.03)
    assert sum(phases.values()) == pytest.approx(total, abs=0.02)


def _spin(cpu_seconds: float) -> None:
    """Keep this thread busy until it has used ``cpu_seconds`` (however loaded the machine)."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def test_cpu_seconds_are_counted_like_wall_seconds_and_say_how_many_cores_were_busy():
    clock = PhaseClock()
    with clock.phase("trials"):
        _spin(0.2)  # one core busy
        with clock.phase("extraction"):
            time.sleep(0.3)  # waiting: no core
    wall_total, wall = clock.breakdown()
    cpu_total, cpu = clock.cpu_breakdown()
    assert list(cpu) == list(wall) == ["extraction", "trials", "other"]
    assert 0.19 <= cpu["trials"] <= wall["trials"] * (os.cpu_count() or 1) + 0.02
    assert cpu["extraction"] == pytest.approx(0.0, abs=0.03)
    assert sum(cpu.values()) == pytest.approx(cpu_total, abs=0.02)
    overall, each = cores_line(wall, cpu, least=0.1).split("; ")
    assert overall.startswith("cores busy: ") and overall.endswith(" overall")
    assert float(overall.split()[2]) == pytest.approx(cpu_total / wall_total, abs=0.06)
    cores = {part.rsplit(" ", 1)[0]: float(part.rsplit(" ", 1)[1]) for part in each.split(", ")}
    assert list(cores) == sorted(cores, key=lambda name: -wall[name])  # the longest first
    assert cores == {name: round(cpu[name] / wall[name], 1) for name in ("extraction", "trials")}
    assert cores["extraction"] == 0.0


def test_start_up_counts_from_the_given_start():
    clock = PhaseClock(started=time.time() - 2.0)
    total, phases = clock.breakdown()
    assert phases["start-up"] == pytest.approx(2.0, abs=0.05)
    assert total == pytest.approx(2.0, abs=0.05) and list(phases) == ["start-up", "other"]
    line = breakdown_line(total, phases)
    assert line.startswith("time 2.0 s: start-up 2.0, other 0.0")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/stat")
def test_the_process_start_is_read_from_proc():
    code = (
        "import time\n"
        "from headstart.training.phases import process_started\n"
        "time.sleep(0.5)\n"
        "print(time.time() - process_started())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    outer = time.time()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    wall = time.time() - outer
    assert done.returncode == 0, done.stderr
    age = float(done.stdout)
    assert 0.5 <= age <= wall + 0.05  # the interpreter's own start-up included
    assert 0 <= time.time() - process_started() < 7 * 24 * 3600  # this process's


def test_a_run_records_its_phases_and_they_add_up_to_its_total(tiny_run):
    """tiny_run (tests/conftest.py): a scratch CNN trained from Python, so no start-up phase;
    workflow 1 (frozen), so no extraction, choice or stage 2."""
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    phases, total = metrics["phase_seconds"], metrics["total_seconds"]
    expected = ["build model", "decode check", "data check", "stage 1", "test", "report", "other"]
    assert sorted(phases) == sorted(expected)
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) == pytest.approx(total, rel=0.01)
    assert total >= metrics["train_seconds"] > 0
    assert phases["stage 1"] <= metrics["train_seconds"] + 0.1
    assert "extraction_passes" not in metrics
    cpu = metrics["phase_cpu_seconds"]
    assert list(cpu) == list(phases) and all(seconds >= 0 for seconds in cpu.values())
    assert sum(cpu.values()) == pytest.approx(metrics["total_cpu_seconds"], rel=0.01)
    assert cpu["stage 1"] > 0  # training takes CPU
