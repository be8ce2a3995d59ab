"""A progress bar for a long pass over files (the decode check, `headstart check`), drawn on a
terminal only: a log file or a pipe gets no bar (the pass's own log line says what it did).

The bar is rich's (a dependency of Keras, so installed wherever headstart is), drawn on stderr
like the log lines, refreshed by its own thread and erased when the pass ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(
    total: int,
    what: str,
    *,
    enabled: bool = True,
    stream: TextIO | None = None,
    force: bool = False,
) -> Iterator[Callable[[int], None]]:
    """``advance(n)``: the pass did ``n`` more of its ``total`` items; the bar (``what`` N/M,
    elapsed and remaining time) shows while the block runs, when ``enabled`` and ``stream``
    (default stderr) is a terminal, or ``force`` (tests). Otherwise ``advance`` does nothing."""
    console = Console(file=stream or sys.stderr, force_terminal=force or None)
    if not (enabled and total > 0 and console.is_terminal):
        yield lambda n=1: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n=1: bar.advance(task, n)
