"""Files written atomically (never half a file), and readable JSON.

Every file headstart writes goes through `write_text_atomic`, `write_bytes_atomic` or
`save_model_atomic`: the new content goes to a hidden temporary file in the same folder, is
flushed to disk, then renamed over the old file (``os.replace`` is atomic). A process killed at
any moment leaves the previous complete file or the new one, never a mix; at worst a hidden
``.<name>.<pid>-<random>.tmp`` file stays behind (`is_temp_file`).

The lowest layer of the package: standard library only.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

TEMP_MARK = ".tmp"  # in the name of every temporary file, which also starts with "."


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
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


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
