"""The exception types headstart raises on purpose: bad input (`UsageError`), and a full disk
(`DiskFullError`)."""

from __future__ import annotations

import errno
import os

_MB = 1024 * 1024


class UsageError(ValueError):
    """Bad input from the user: a one-line message that names the file or option and the fix.

    The CLI prints it as ``headstart: error: <message>`` and exits with code 2.
    """


class DiskFullError(OSError):
    """No space left on the device (ENOSPC, or a disk quota: EDQUOT) while writing ``path``.

    ``needed`` is the size in bytes of what was being written (an estimate for a model; None
    when unknown), ``free`` the bytes free on that file system once the failed write's temporary
    file is gone (None when unknown). Nothing is left half-written: the atomic writes of
    `headstart.files` keep the previous complete file. An ``OSError`` with ``errno`` ENOSPC or
    EDQUOT, so code that handles those still does; the CLI prints it as one line that says how
    to go on, and exits with code 1.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        needed: int | None = None,
        free: int | None = None,
        code: int = errno.ENOSPC,
    ):
        super().__init__(code, os.strerror(code), os.fspath(path))
        self.path, self.needed, self.free = os.fspath(path), needed, free

    def __str__(self) -> str:
        sizes = []
        if self.needed:
            sizes.append(f"needs about {human_size(self.needed)}")
        if self.free is not None:
            sizes.append(f"{human_size(self.free)} free")
        detail = f" ({', '.join(sizes)})" if sizes else ""
        what = "disk quota exceeded" if self.errno == _EDQUOT else "no space left on device"
        return f"{what} writing {self.path}{detail}"

    def __reduce__(self):  # picklable with its fields (OSError's default drops them)
        return type(self), (self.path, self.needed, self.free, self.errno)


_EDQUOT = getattr(errno, "EDQUOT", None)


def human_size(size: int) -> str:
    """``size`` bytes for a person: "36 KB", "4.2 MB", "12 MB" (KB, MB of 2**10, 2**20 bytes,
    as df -h counts)."""
    value = size / _MB
    if value >= 10:
        return f"{value:.0f} MB"
    if value >= 1:
        return f"{value:.1f} MB"
    return f"{max(1, round(size / 1024)) if size else 0} KB"
