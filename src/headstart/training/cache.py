"""An on-disk cache of backbone outputs, reused across epochs and across runs.

Running the frozen part of a backbone is the expensive step of transfer learning, and its
output for an image never changes. Entries are keyed by everything that decides it (backbone,
weights, image size, preprocessing, where the network is cut, which augmented view) and rows
by the image file's *content*, so a renamed file still hits and an edited one misses. Arrays
are float16 ``.npy`` shards read through memory maps: a dataset larger than memory streams.

Layout: ``<cache_dir>/<entry key>/{meta.json, <shard>.keys.npy, <shard>.npy}`` plus
``file_hashes.json`` (path, size, mtime -> content hash), so unchanged files are not re-read,
and ``.locks/`` (empty lock files).

Several runs may share one cache at once. A shard is published whole (rows, then keys, each by
``os.replace``) and the index reads only ``*.keys.npy``, so a reader never sees a torn entry. A
process about to compute an entry's missing rows holds that entry's ``flock`` and re-reads the
index first: a second run wanting the same rows waits, then finds them cached instead of
computing them again. The kernel drops a killed process's locks, so a killed run never leaves
the cache locked; what it was writing is swept later (`_sweep`) and the next run recomputes it.
Without ``fcntl`` (Windows) there is no locking and no sweep: concurrent runs stay correct but
may compute the same rows twice, and a killed run's temporary files stay.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from headstart.files import is_temp_file, raise_if_disk_full, write_json, write_text_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (see the module docstring)
    fcntl = None

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the meaning of a cached array changes
STORAGE_DTYPE = np.float16
_HASHES_FILE = "file_hashes.json"
_LOCKS = ".locks"  # outside the entries: `cache ls` and the entries' listings never see them
_IRS = ".openvino"  # frozen parts converted for OpenVINO (`FeatureCache.ir_dir`), also outside
_XLA = ".xla"  # JAX's compiled programs (`use_compilation_cache`), also outside
XLA_CACHE_BYTES = 512 * 1024**2  # JAX evicts the least recently used programs beyond this
# programs that took longer to compile are kept (JAX's default, 1 s, keeps none of a small
# model's on a CPU: Lite0's train step on cached features takes 0.6 s, its predict step 0.35 s)
XLA_MIN_COMPILE_SECONDS = 0.1
# A leftover no process holds is deleted only past this age: a writer creates its file an
# instant before locking it, and must not lose it in that instant.
STALE_SECONDS = 60.0


def default_cache_dir() -> Path:
    """``$HEADSTART_CACHE``, else ``$XDG_CACHE_HOME/headstart``, else ``~/.cache/headstart``."""
    if os.environ.get("HEADSTART_CACHE"):
        return Path(os.environ["HEADSTART_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "headstart"


@dataclass(frozen=True)
class EntrySpec:
    """Everything that decides the cached output for an image; its hash names the entry."""

    backbone: str
    # "imagenet", "imagenet:<content hash>" (weights in files: a keras-hub preset's),
    # "none:<seed>" or "file:<content hash>"
    weights: str
    image_size: int
    preprocessing: str
    output: str  # "pooled:gap", "pooled:flatten" or "trunk:<first layer after the cut>"
    view: str  # "clean" or "<augment spec>#<seed>#<view index>"
    # what computed the rows, and in what precision (`headstart.runtime.FrozenRunner.key`):
    # "keras" or "openvino:f32"; runtimes agree to well within float16, but rows never mix
    runtime: str = "keras"

    def key(self) -> str:
        text = json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def part_key(self) -> str:
        """What names the frozen part itself (every view and runtime of it): its OpenVINO IR
        is kept under it."""
        part = {**asdict(self), "view": "", "runtime": ""}
        text = json.dumps({"format": CACHE_FORMAT, **part}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


class CachedRows:
    """Rows of one entry for a list of images, in that order, read lazily from the shards."""

    def __init__(self, shards: list[np.ndarray], shard_of: np.ndarray, row_of: np.ndarray):
        self._shards, self._shard_of, self._row_of = shards, shard_of, row_of
        self.shape = (len(row_of), *shards[0].shape[1:]) if shards else (0,)

    def __len__(self) -> int:
        return len(self._row_of)

    def take(self, indices: Iterable[int]) -> np.ndarray:
        """float32 rows for ``indices`` (a batch): only these rows are read from disk."""
        indices = np.asarray(list(indices), dtype=np.int64)
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.float32)
        for position, index in enumerate(indices):
            out[position] = self._shards[self._shard_of[index]][self._row_of[index]]
        return out

    def __getitem__(self, indices) -> np.ndarray:
        return self.take(np.atleast_1d(indices))

    def to_numpy(self) -> np.ndarray:
        return self.take(range(len(self)))


class FeatureCache:
    """Get-or-compute of backbone outputs for image files; see the module docstring."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        _sweep(self.directory)  # a killed run's half-written file_hashes.json
        self._hashes = self._load_hashes()

    # ------------------------------------------------------------------ content hashes
    def _load_hashes(self) -> dict[str, list]:
        try:
            return json.loads((self.directory / _HASHES_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def content_hashes(self, paths: list[str]) -> list[str]:
        """sha1 of each file's bytes, memoised on (size, mtime) so unchanged files aren't read."""
        result, new = [], {}
        for path in paths:
            stat = os.stat(path)
            known = self._hashes.get(path)
            if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
                result.append(known[2])
                continue
            with open(path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha1").hexdigest()
            self._hashes[path] = new[path] = [stat.st_size, stat.st_mtime_ns, digest]
            result.append(digest)
        if new:  # merged into what is on disk now: other runs' hashes are kept, not overwritten
            with _locked(self._lock_path("file_hashes")):
                self._hashes = {**self._load_hashes(), **new}
                # ASCII JSON: paths that are not valid UTF-8 survive as escapes
                write_text_atomic(self.directory / _HASHES_FILE, json.dumps(self._hashes))
        return result

    # ------------------------------------------------------------------ entries
    def rows(
        self,
        spec: EntrySpec,
        paths: list[str],
        compute: Callable[[list[str]], Iterator[np.ndarray]],
    ) -> CachedRows:
        """The entry's rows for ``paths``; images not cached yet go through ``compute``.

        ``compute(missing_paths)`` yields batches of outputs in order; they are written to a
        new shard as they come, so memory stays bounded by one batch.
        """
        return self._rows(spec, paths, compute, self._lock_path(spec.key()))

    def _rows(self, spec: EntrySpec, paths: list[str], compute, lock: Path) -> CachedRows:
        """`rows`, computing what is missing while holding ``lock``: whoever held it before may
        have published rows this process no longer needs to compute."""
        entry = self._entry(spec)
        keys = self.content_hashes(paths)
        index = self._index(entry)
        if any(key not in index for key in keys):
            with _locked(lock, f"{spec.output} ({spec.key()})"):
                _sweep(entry)  # the holder we waited for may have been killed mid-shard
                index = self._index(entry)
                pairs = zip(keys, paths, strict=True)
                missing = sorted({k: p for k, p in pairs if k not in index}.items())
                if missing:
                    log.info(
                        "computing %s for %d images (%d cached)",
                        spec.output,
                        len(missing),
                        len(set(keys)) - len(missing),
                    )
                    batches = compute([p for _, p in missing])
                    self._write_shard(entry, [k for k, _ in missing], batches)
                    index = self._index(entry)
        self._touch(entry, spec)
        shard_names = sorted({index[k][0] for k in keys})
        shards = [np.load(entry / f"{name}.npy", mmap_mode="r") for name in shard_names]
        position = {name: i for i, name in enumerate(shard_names)}
        shard_of = np.array([position[index[k][0]] for k in keys], dtype=np.int64)
        row_of = np.array([index[k][1] for k in keys], dtype=np.int64)
        return CachedRows(shards, shard_of, row_of)

    def fill_part(
        self,
        spec: EntrySpec,
        paths: list[str],
        compute: Callable[..., Iterator[np.ndarray]],
        part: int,
        parts: int,
        block: int = 1,
    ) -> None:
        """Compute the missing rows of part ``part`` of ``parts`` of ``paths``, into a shard of
        its own (``--distributed``: each process fills its part of a shared cache).

        The distinct images, in content-key order (the order `rows` computes them in), are
        dealt out in blocks of ``block``: every image is in exactly one part, and the parts do
        not depend on what is cached already (a process that finishes first changes no other
        process's part). With ``block`` the extraction batch size, a fresh cache gets the very
        batches a single process would compute, so the merged entry holds the same rows. An
        augmented view's random draws depend on the pass, so there ``compute(all, only=blocks)``
        goes over all the images and runs the backbone on this part's blocks only.

        The lock is the part's, not the entry's: the parts of one run are computed in parallel,
        while the same part of two runs sharing the cache is computed once.
        """
        distinct = sorted(dict(zip(self.content_hashes(paths), paths, strict=True)).items())
        mine = [i for i in range(len(distinct)) if i // block % parts == part]
        lock = self._lock_path(f"{spec.key()}.part-{part}-of-{parts}-by-{block}")
        if spec.view == "clean":
            if mine:
                self._rows(spec, [distinct[i][1] for i in mine], compute, lock)
            return
        entry = self._entry(spec)
        with _locked(lock, f"{spec.output} ({spec.key()}, part {part} of {parts})"):
            index = self._index(entry)
            blocks = sorted({i // block for i in mine if distinct[i][0] not in index})
            if blocks:
                keys = [distinct[i][0] for i in mine if i // block in blocks]
                log.info(
                    "computing %s for %d images (part %d of %d)",
                    spec.output,
                    len(keys),
                    part,
                    parts,
                )
                self._write_shard(entry, keys, compute([p for _, p in distinct], only=blocks))

    def _entry(self, spec: EntrySpec) -> Path:
        entry = self.directory / spec.key()
        entry.mkdir(exist_ok=True)
        self._touch(entry, spec)  # meta first: `cache ls` and `clear` see even a partial entry
        _sweep(entry)
        return entry

    def ir_dir(self, spec: EntrySpec) -> Path:
        """Where the frozen part that computes ``spec``'s rows is kept as an OpenVINO IR."""
        return self.directory / _IRS / spec.part_key()

    def _lock_path(self, name: str) -> Path:
        folder = self.directory / _LOCKS
        folder.mkdir(exist_ok=True)
        return folder / f"{name}.lock"

    @staticmethod
    def _index(entry: Path) -> dict[str, tuple[str, int]]:
        index = {}
        for keys_file in sorted(entry.glob("*.keys.npy")):
            name = keys_file.name[: -len(".keys.npy")]
            for row, key in enumerate(np.load(keys_file)):
                index[key.decode()] = (name, row)
        return index

    @staticmethod
    def _write_shard(entry: Path, keys: list[str], batches: Iterator[np.ndarray]) -> None:
        """Fill a memory-mapped .npy batch by batch; publish it (keys last) only when complete.

        The file stays flocked until its keys are published, so `_sweep` in another process
        never takes it for a dead writer's leftover. A full disk is a `DiskFullError` naming
        the shard and its full size, with no temporary file left: the shard's space is
        reserved before it is mapped (`_reserve`), since a write into a memory map that finds
        no space is a SIGBUS, not an error."""
        name = f"shard-{uuid.uuid4().hex[:12]}"
        tmp = entry / f".{name}.npy.tmp"
        keys_tmp = entry / f".{name}.keys.tmp.npy"
        needed = len(keys) * 40  # bytes: the keys, and the shard once its shape is known
        held = None  # (without fcntl, no handle: Windows could not rename a file held open)
        array = None
        filled = 0
        try:
            if fcntl is not None:
                held = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
            for batch in batches:
                if array is None:
                    shape = (len(keys), *batch.shape[1:])
                    needed += math.prod(shape) * np.dtype(STORAGE_DTYPE).itemsize
                    array = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=STORAGE_DTYPE, shape=shape
                    )
                    _reserve(tmp)
                array[filled : filled + len(batch)] = batch
                filled += len(batch)
            if filled != len(keys):
                raise RuntimeError(f"computed {filled} outputs for {len(keys)} images")
            array.flush()
            del array
            np.save(keys_tmp, np.array(keys, dtype="S40"))  # before publishing: it takes space
            os.replace(tmp, entry / f"{name}.npy")
            os.replace(keys_tmp, entry / f"{name}.keys.npy")
        except Exception as error:
            for path in (tmp, keys_tmp):  # first, so that the free space counts what they held
                path.unlink(missing_ok=True)
            raise_if_disk_full(error, entry / f"{name}.npy", needed)
            raise
        finally:
            tmp.unlink(missing_ok=True)
            keys_tmp.unlink(missing_ok=True)
            if held is not None:
                os.close(held)

    @staticmethod
    def _touch(entry: Path, spec: EntrySpec) -> None:
        write_json(
            entry / "meta.json",
            {
                **asdict(spec),
                "format": CACHE_FORMAT,
                "last_used": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )


@contextmanager
def _locked(path: Path, what: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), waiting for its holder.
    The kernel releases it when the holder exits or is killed, so it never goes stale."""
    if fcntl is None:
        yield
        return
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if what:
                log.info("another run is computing %s: waiting for it", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _sweep(folder: Path) -> None:
    """Delete what killed writers left in ``folder``: temporary files, and shards whose keys
    were never published (they are not in the index, so nothing reads them).

    A file is deleted only if no live process holds its ``flock`` (a shard's writer holds it
    until the keys are out) and it is older than `STALE_SECONDS`. No sweep without ``fcntl``:
    nothing would tell a dead writer's file from a live one's.
    """
    if fcntl is None:
        return
    now = time.time()
    for path in folder.iterdir():
        name = path.name
        keys_file = path.with_name(name[: -len(".npy")] + ".keys.npy")
        orphan = name.startswith("shard-") and name.endswith(".npy") and ".keys." not in name
        if not (is_temp_file(name) or (orphan and not keys_file.exists())):
            continue
        try:
            if now - path.stat().st_mtime < STALE_SECONDS:
                continue
            handle = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile: published or swept by another process
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if orphan and keys_file.exists():  # its writer published the keys, then let go
                continue
            path.unlink(missing_ok=True)  # a temporary name renamed meanwhile is simply gone
            log.info("removed %s, left by a run that was stopped while writing it", path)
        except OSError:  # held: a live writer's
            continue
        finally:
            os.close(handle)


def _reserve(path: Path) -> None:
    """Allocate the whole of ``path``'s (sparse) file now, where the system allows it: no space
    is then an ``OSError`` here (ENOSPC) rather than a SIGBUS when the memory map is written."""
    allocate = getattr(os, "posix_fallocate", None)  # POSIX; not on macOS nor Windows
    if allocate is None:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        allocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that cannot
            return
        raise
    finally:
        os.close(fd)


def list_entries(directory: str | Path | None = None) -> list[dict]:
    """One dict per cache entry: its spec, number of images and bytes on disk."""
    root = Path(directory) if directory else default_cache_dir()
    entries = []
    for meta_file in sorted(root.glob("*/meta.json")):
        meta = json.loads(meta_file.read_text())
        files = list(meta_file.parent.iterdir())
        images = sum(len(np.load(f, mmap_mode="r")) for f in files if f.name.endswith(".keys.npy"))
        meta.update(
            key=meta_file.parent.name, images=images, bytes=sum(f.stat().st_size for f in files)
        )
        entries.append(meta)
    return entries


def clear(directory: str | Path | None = None) -> int:
    """Delete every cache entry (and the content-hash memo); returns the bytes freed."""
    root = Path(directory) if directory else default_cache_dir()
    freed = 0
    for meta_file in root.glob("*/meta.json"):
        entry = meta_file.parent
        freed += sum(f.stat().st_size for f in entry.iterdir())
        shutil.rmtree(entry)
    (root / _HASHES_FILE).unlink(missing_ok=True)
    shutil.rmtree(root / _LOCKS, ignore_errors=True)
    shutil.rmtree(root / _IRS, ignore_errors=True)
    shutil.rmtree(root / _XLA, ignore_errors=True)
    return freed


def use_compilation_cache(directory: str | Path | None, backend: str) -> Path | None:
    """On JAX, keep compiled XLA programs in ``<cache_dir>/.xla`` (JAX's persistent
    compilation cache): the refit's new model compiles the very train step stage 1 did, and a
    resumed or repeated run (a later `launch` of the same job too) all of stage 1's and 2's
    programs, each up to seconds on a CPU. JAX's own ``JAX_COMPILATION_CACHE_DIR`` wins when
    set; other backends have nothing to keep. Returns the folder used (None: not set here)."""
    if backend != "jax" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    import jax  # only a JAX run gets here

    folder = (Path(directory) if directory else default_cache_dir()) / _XLA
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_BYTES)
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", XLA_MIN_COMPILE_SECONDS)
    return folder
