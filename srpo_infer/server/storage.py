"""The output folder of the server: images it wrote, served back by name, expired by age and total size."""

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
