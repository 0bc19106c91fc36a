"""The output store of the server: images it wrote, served back by name, expired by age and total size.

A local folder or any fsspec URL (``s3://bucket/srpo`` with s3fs, ``gs://…`` with gcsfs, ``memory://``
in tests), so servers on several machines can share one store. Only names of the form the server
writes are ever read or deleted: the store may hold other files.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = re.compile(r"^[0-9a-f]{32}\.(jpeg|png)$")
DEFAULT_RETENTION_SECONDS = 24 * 3600.0
DEFAULT_RETENTION_BYTES = 2 * 2**30


class ImageStore:
    """Writes images under ``location`` and expires them: older than ``max_age`` seconds, or the oldest
    beyond ``max_bytes`` in all (``None`` turns either rule off). Sweeps run after writes, at most once
    every ``sweep_every`` seconds, so a write costs one listing of the store at most then."""

    def __init__(
        self,
        location: str | Path,
        max_age: float | None = DEFAULT_RETENTION_SECONDS,
        max_bytes: int | None = DEFAULT_RETENTION_BYTES,
        sweep_every: float = 10.0,
    ):
        import fsspec

        for name, value in (("retention age", max_age), ("retention size", max_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None for no limit), got {value}")
        location = str(location)
        if "://" not in location:
            location = str(Path(location).expanduser().resolve())
        try:
            self.fs, root = fsspec.core.url_to_fs(location)
        except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
            raise ValueError(f"output store {location!r}: {exc}") from exc
        self.location, self.root = location, root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)
        self.max_age, self.max_bytes, self.sweep_every = max_age, max_bytes, sweep_every
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def save(self, data: bytes, ext: str) -> str:
        """Store one encoded image; returns its name. Its URL is handed out only after this returns,
        so no reader sees a partial file."""
        name = f"{uuid.uuid4().hex}.{ext}"
        self.fs.pipe_file(f"{self.root}/{name}", data)
        if time.monotonic() - self._last_sweep >= self.sweep_every:
            self.sweep()
        return name

    def read(self, name: str) -> bytes | None:
        """A stored image's bytes, or None: only names this store writes resolve."""
        if not FILE_NAME.match(name):
            return None
        try:
            return self.fs.cat_file(f"{self.root}/{name}")
        except FileNotFoundError:
            return None

    def sweep(self, now: float | None = None) -> int:
        """Delete expired images; returns how many."""
        with self._lock:
            self._last_sweep = time.monotonic()
            now = time.time() if now is None else now
            files = sorted(
                (_modified(info), info.get("size") or 0, info["name"])
                for info in self.fs.ls(self.root, detail=True)
                if FILE_NAME.match(info["name"].rsplit("/", 1)[-1])
            )  # oldest first
            doomed = [f for f in files if self.max_age is not None and now - f[0] > self.max_age]
            kept = files[len(doomed) :]
            total = sum(size for _, size, _ in kept)
            while self.max_bytes is not None and kept and total > self.max_bytes:
                total -= kept[0][1]
                doomed.append(kept.pop(0))
            for _, _, path in doomed:
                try:
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass
            if doomed:
                log.info("expired %d stored image(s) from %s", len(doomed), self.location)
            return len(doomed)

    def problem(self) -> str | None:
        """Why images cannot be stored right now (None when they can): checked by writing a probe file."""
        probe = f"{self.root}/.health-{uuid.uuid4().hex}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:  # each file system raises its own errors
            return f"the output store {self.location!r} is not writable: {getattr(exc, 'strerror', None) or exc}"
        return None


def _modified(info: dict) -> float:
    """Modification time in seconds from an fsspec ``ls`` entry (each file system names it its own way)."""
    for key in ("mtime", "LastModified", "created", "updated", "last_modified"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0  # unknown: treated as the oldest, so the size rule removes it first
