"""``headstart launch``: N local processes of one distributed command, like ``torchrun``.

Each process gets ``--distributed --coordinator 127.0.0.1:PORT --num-processes N --process-id
I`` and the JAX backend; its output lines come back prefixed with ``[I]``. If one process
fails or dies, the others are stopped (SIGTERM, then SIGKILL after ``grace`` seconds), so a
dead peer never leaves the rest hanging in a collective.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from headstart.errors import UsageError

POLL_SECONDS = 0.2
GRACE_SECONDS = 5.0  # a process stopped by SIGTERM gets this long before SIGKILL


THREADS_VARIABLE = "OMP_NUM_THREADS"


def process_environment(nproc: int, environ, cores: int) -> dict[str, str]:
    """Each process's environment: the JAX backend, and the machine's cores shared among the
    processes, as ``torchrun`` sets ``OMP_NUM_THREADS``: every process's math would otherwise
    take all of them, and the processes, which wait for each other at every step, would crowd
    each other out (measured: 2 processes on 2 cores, 12% less wall time with 1 thread each).
    A thread count the user set (``OMP_NUM_THREADS``, TensorFlow's or XLA's own) is kept; an
    ``OMP_NUM_THREADS`` that is not one count (OpenMP's nested "4,2") is left to OpenMP alone."""
    env = {**environ, "KERAS_BACKEND": "jax"}
    given = environ.get(THREADS_VARIABLE, "").strip()
    if given and not (given.isdigit() and int(given) > 0):
        return env
    threads = given or str(max(1, cores // nproc))
    env[THREADS_VARIABLE] = threads
    env.setdefault("TF_NUM_INTRAOP_THREADS", threads)  # tf.data and TensorFlow's own ops
    env.setdefault("TF_NUM_INTEROP_THREADS", threads)
    xla = env.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in xla and "xla_cpu_multi_thread_eigen" not in xla:
        multi = "true" if int(threads) > 1 else "false"
        threading_flags = (
            f"--xla_cpu_multi_thread_eigen={multi} intra_op_parallelism_threads={threads}"
        )
        env["XLA_FLAGS"] = f"{xla} {threading_flags}".strip()
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the coordinator binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    nproc: int, command: Sequence[str], *, out: TextIO | None = None, grace: float = GRACE_SECONDS
) -> int:
    """Run ``headstart COMMAND`` in ``nproc`` processes; 0 when all succeed, else 1.

    A failure ends everything within ``POLL_SECONDS + grace`` seconds of the first death.
    """
    command = list(command)
    if command[:1] == ["--"]:
        command = command[1:]
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    if command[:1] != ["train"]:
        raise UsageError("launch runs `train`: headstart launch --nproc N -- train DATA ...")
    out = out or sys.stdout
    port = free_port()
    env = process_environment(nproc, os.environ, os.cpu_count() or 1)
    if env.get(THREADS_VARIABLE) != os.environ.get(THREADS_VARIABLE):
        out.write(
            f"headstart launch: {env[THREADS_VARIABLE]} thread(s) per process for the math "
            f"({os.cpu_count()} cores, {nproc} processes); set {THREADS_VARIABLE} to choose\n"
        )
    processes, lock = [], threading.Lock()
    for rank in range(nproc):
        args = [
            *command,
            "--distributed",
            f"--coordinator=127.0.0.1:{port}",
            f"--num-processes={nproc}",
            f"--process-id={rank}",
        ]
        process = subprocess.Popen(
            [sys.executable, "-m", "headstart", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
        )
        threading.Thread(target=_forward, args=(process, rank, out, lock), daemon=True).start()
        processes.append(process)
    return _watch(processes, out, lock, grace)


def _forward(process: subprocess.Popen, rank: int, out: TextIO, lock: threading.Lock) -> None:
    for line in process.stdout:
        with lock:
            out.write(f"[{rank}] {line}")
            out.flush()


def _watch(processes, out: TextIO, lock: threading.Lock, grace: float) -> int:
    """Wait for all; at the first failure stop the rest and say which process failed how."""
    while True:
        codes = [process.poll() for process in processes]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            rank = failed[0]
            _stop([p for p in processes if p.poll() is None], grace)
            time.sleep(POLL_SECONDS)  # let the forwarders print the last lines
            with lock:
                out.write(
                    f"headstart launch: process {rank} {_how(codes[rank])}; stopped the other "
                    f"{len(processes) - 1} process(es)\n"
                )
                out.flush()
            return 1
        if all(code == 0 for code in codes):
            return 0
        time.sleep(POLL_SECONDS)


def _stop(processes, grace: float) -> None:
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _how(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"failed with exit code {code}"
