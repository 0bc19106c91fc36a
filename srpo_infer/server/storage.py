"""The output folder of the server: images it wrote, served back by name, expired by age and total size.

A local folder (:class:`ImageStore`) or any fsspec URL (:class:`FsspecImageStore`: ``s3://bucket/srpo``,
``gs://…``, ``memory://`` in tests), so replicas on several machines can share one store;
:func:`open_store` picks by the ``://``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

# Only names of this form are ever served or deleted: the folder may hold other files.
FILE_NAME = re.compile(r"^[0-9a-f]{32}\.(jpeg|png)$")
DEFAULT_RETENTION_SECONDS = 24 * 3600.0
DEFAULT_RETENTION_BYTES = 2 * 2**30


class ImageStore:
    """Writes images under ``folder`` and expires them: older than ``max_age`` seconds, or the oldest
    beyond ``max_bytes`` in all (``None`` turns either rule off). Sweeps run after writes, at most
    once every ``sweep_every`` seconds, so a write costs one ``stat`` per stored file at most then."""

    def __init__(
        self,
        folder: str | Path,
        max_age: float | None = DEFAULT_RETENTION_SECONDS,
        max_bytes: int | None = DEFAULT_RETENTION_BYTES,
        sweep_every: float = 10.0,
    ):
        for name, value in (("retention age", max_age), ("retention size", max_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None for no limit), got {value}")
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_age, self.max_bytes, self.sweep_every = max_age, max_bytes, sweep_every
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def save(self, data: bytes, ext: str) -> str:
        """Store one encoded image; returns its file name."""
        name = f"{uuid.uuid4().hex}.{ext}"
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.folder / name)  # atomic: a concurrent GET never sees half a file
        if time.monotonic() - self._last_sweep >= self.sweep_every:
            self.sweep()
        return name

    def path(self, name: str) -> Path | None:
        """The stored file called ``name``, or None: only names this store writes resolve."""
        if not FILE_NAME.match(name):
            return None
        path = (self.folder / name).resolve()
        return path if path.parent == self.folder and path.is_file() else None

    def read(self, name: str) -> bytes | None:
        """The stored image's bytes, or None."""
        path = self.path(name)
        return path.read_bytes() if path is not None else None

    def sweep(self, now: float | None = None) -> int:
        """Delete expired images; returns how many."""
        with self._lock:
            self._last_sweep = time.monotonic()
            now = time.time() if now is None else now
            files = []
            for entry in os.scandir(self.folder):
                if FILE_NAME.match(entry.name) and entry.is_file():
                    st = entry.stat()
                    files.append((st.st_mtime, st.st_size, entry.path))
            files.sort()  # oldest first
            doomed = [f for f in files if self.max_age is not None and now - f[0] > self.max_age]
            kept = files[len(doomed) :]
            total = sum(size for _, size, _ in kept)
            while self.max_bytes is not None and kept and total > self.max_bytes:
                total -= kept[0][1]
                doomed.append(kept.pop(0))
            for _, _, path in doomed:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            if doomed:
                log.info("expired %d stored image(s) from %s", len(doomed), self.folder)
            return len(doomed)

    def problem(self) -> str | None:
        """Why images cannot be stored right now (None when they can): checked by writing a probe file."""
        probe = self.folder / f".health-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"the output folder {str(self.folder)!r} is not writable: {exc.strerror or exc}"
        return None


class FsspecImageStore:
    """:class:`ImageStore`'s interface over an fsspec file system (``pip install s3fs`` for ``s3://``)."""

    def __init__(
        self,
        url: str,
        max_age: float | None = DEFAULT_RETENTION_SECONDS,
        max_bytes: int | None = DEFAULT_RETENTION_BYTES,
        sweep_every: float = 10.0,
    ):
        import fsspec

        for name, value in (("retention age", max_age), ("retention size", max_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None for no limit), got {value}")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"--output-dir {url!r}: {exc}") from exc
        self.root = self.root.rstrip("/")
        self.url = url
        self.fs.makedirs(self.root, exist_ok=True)
        self.max_age, self.max_bytes, self.sweep_every = max_age, max_bytes, sweep_every
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def save(self, data: bytes, ext: str) -> str:
        name = f"{uuid.uuid4().hex}.{ext}"
        self.fs.pipe_file(f"{self.root}/{name}", data)
        if time.monotonic() - self._last_sweep >= self.sweep_every:
            self.sweep()
        return name

    def read(self, name: str) -> bytes | None:
        if not FILE_NAME.match(name):
            return None
        try:
            return self.fs.cat_file(f"{self.root}/{name}")
        except FileNotFoundError:
            return None

    def sweep(self, now: float | None = None) -> int:
        with self._lock:
            self._last_sweep = time.monotonic()
            now = time.time() if now is None else now
            files = sorted(
                (_modified(info), info.get("size", 0), info["name"])
                for info in self.fs.ls(self.root, detail=True)
                if FILE_NAME.match(info["name"].rsplit("/", 1)[-1])
            )
            doomed = [f for f in files if self.max_age is not None and now - f[0] > self.max_age]
            kept = files[len(doomed) :]
            total = sum(size for _, size, _ in kept)
            while self.max_bytes is not None and kept and total > self.max_bytes:
                total -= kept[0][1]
                doomed.append(kept.pop(0))
            for _, _, path in doomed:
                self.fs.rm_file(path)
            return len(doomed)

    def problem(self) -> str | None:
        probe = f"{self.root}/.health-{uuid.uuid4().hex}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:  # every backend raises its own errors
            return f"the output store {self.url!r} is not writable: {exc}"
        return None


def _modified(info: dict) -> float:
    """Modification time in seconds from an fsspec ``ls`` entry (each file system names it its own way)."""
    for key in ("mtime", "LastModified", "created", "updated", "last_modified"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        try:
            from datetime import datetime

            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return 0.0  # unknown: treated as oldest, so the size rule removes it first


def open_store(output_dir: str | Path, **retention) -> ImageStore | FsspecImageStore:
    """A local folder, or an fsspec URL (anything with ``://``)."""
    if "://" in str(output_dir):
        return FsspecImageStore(str(output_dir), **retention)
    return ImageStore(output_dir, **retention)
