"""Files written atomically (never half a file), and readable JSON.

Every file headstart writes goes through `write_text_atomic`, `write_bytes_atomic` or
`save_model_atomic`: the new content goes to a hidden temporary file in the same folder, is
flushed to disk, then renamed over the old file (``os.replace`` is atomic). A process killed at
any moment leaves the previous complete file or the new one, never a mix; at worst a hidden
``.<name>.<pid>-<random>.tmp`` file stays behind (`is_temp_file`).

A full disk (ENOSPC, or a quota: EDQUOT) during a write removes the temporary file and raises
`headstart.errors.DiskFullError`, naming the file and the space it needed; `raise_if_disk_full`
does the same for writes made elsewhere (the feature cache's shards).

The lowest layer of the package: standard library only.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from headstart.errors import DiskFullError

TEMP_MARK = ".tmp"  # in the name of every temporary file, which also starts with "."
DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None
)
# how libraries that do not keep errno (h5py, inside a .keras file) spell it in their message
_CODES = "|".join(str(code) for code in sorted(DISK_FULL_ERRNOS))
_DISK_FULL_TEXT = re.compile(rf"No space left on device|Disk quota exceeded|errno = ({_CODES})\b")


def write_text_atomic(path: str | Path, text: str, *, errors: str = "strict") -> None:
    """Write a temporary file beside ``path``, then rename: readers see old or new, never half.

    UTF-8; ``errors`` is the encoding error handler (e.g. "backslashreplace" for file names that
    are not valid UTF-8).
    """
    write_bytes_atomic(path, text.encode("utf-8", errors))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """`write_text_atomic` for bytes (e.g. a PNG rendered into memory)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        # os.open with 0o666 lets the umask decide the mode, like a plain open() would
        # (tempfile.mkstemp would leave every run file readable by its owner only).
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(error, path, lambda: len(data))
        raise
    _fsync_folder(path.parent)


def write_json(path: str | Path, value: object) -> None:
    """Readable UTF-8 JSON; ASCII escapes when a string (a file name that is not valid UTF-8,
    read by Python as surrogates) cannot be UTF-8, so that it survives the round trip."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, indent=2)
    write_text_atomic(path, text + "\n")


def write_ascii_json(path: str | Path, value: object) -> None:
    """ASCII JSON: file names that are not valid UTF-8 (surrogate escapes) survive the round
    trip as \\udcXX escapes, where UTF-8 output would fail to encode them."""
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def save_model_atomic(model, path: str | Path) -> None:
    """``model.save`` to a temporary ``.keras`` file beside ``path``, then rename."""
    path = Path(path)
    tmp = _temp_beside(path, ".keras")  # Keras insists on the extension
    try:
        model.save(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(error, path, lambda: max(written, model_bytes(model)))
        raise
    _fsync_folder(path.parent)


def is_disk_full(error: BaseException) -> bool:
    """True when ``error`` (or an error it was raised from) means no space left on the device:
    errno ENOSPC or EDQUOT, or their message from a library that drops the errno (h5py)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(error, (OSError, RuntimeError)) and _DISK_FULL_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def raise_if_disk_full(
    error: BaseException, path: str | Path, needed: int | Callable[[], int | None] | None
) -> None:
    """Raise ``error`` as a `DiskFullError` for ``path`` when it means a full disk (see
    `is_disk_full`), else return. ``needed``: the bytes the write needed (or a function that
    gives them, called only then). Call it once the failed write's temporary files are removed,
    so that the free space it reports counts what they held."""
    if isinstance(error, DiskFullError):
        raise error
    if is_disk_full(error):
        code = getattr(error, "errno", None)
        code = code if code in DISK_FULL_ERRNOS else errno.ENOSPC
        size = needed() if callable(needed) else needed
        raise DiskFullError(path, size, free_bytes(Path(path).parent), code) from error


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free for an unprivileged writer on ``folder``'s file system; None if unknown."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def model_bytes(model) -> int:
    """About the size of ``model``'s ``.keras`` file: the bytes of its variables, plus what the
    file adds (its config, ~4 KB of HDF5 bookkeeping per variable)."""
    total = 16 * 1024
    for variable in getattr(model, "variables", ()):
        try:
            count = math.prod(int(d) for d in variable.shape)
            bits = int((re.search(r"\d+", str(variable.dtype)) or [8])[0])
        except (TypeError, ValueError):
            continue
        total += count * max(bits, 8) // 8 + 4 * 1024
    return total


def is_temp_file(name: str) -> bool:
    """True for the hidden temporary files of the atomic writes (left only by a killed run)."""
    return name.startswith(".") and TEMP_MARK in name


def _temp_beside(path: Path, suffix: str = "") -> Path:
    """A unique hidden name in the same folder, so that the rename never crosses file systems."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_MARK}{suffix}")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible, nor needed, everywhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
