"""The output store of the server: images it wrote, served back by name, expired by age and total size.

A local folder or any fsspec URL (``s3://bucket/srpo`` with s3fs, ``gs://…`` with gcsfs, ``memory://``
in tests), so servers on several machines can share one store. Only names of the form the server
writes, and that it marked when it wrote them, are ever read or deleted: the store may hold other files.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = re.compile(r"[0-9a-f]{32}\.(jpeg|png)")  # always fullmatch: "$" also matches before a final "\n"
DEFAULT_RETENTION_SECONDS = 24 * 3600.0
DEFAULT_RETENTION_BYTES = 2 * 2**30


class ImageStore:
    """Writes images under ``location`` and expires them: older than ``max_age`` seconds, or the oldest
    beyond ``max_bytes`` in all (``None`` turns either rule off).

    It trusts nothing it did not write. Each image gets a marker (``NAME.srpo``) when written, and only
    a name with a marker that is a regular file is served or deleted: a foreign file with a matching name
    is never touched, and a symlink, a directory or anything unreadable at such a name answers "no such
    image" (locally the file is opened without following links). An expired image is refused on read
    at once; a sweep deletes expired images every ``sweep_every`` seconds on a timer (an idle server
    too) and after a write that takes the total over ``max_bytes`` (so the cap holds at write time). A
    bad entry is logged and skipped, never fatal to the sweep.
    """

    MARKER = ".srpo"

    def __init__(
        self,
        location: str | Path,
        max_age: float | None = DEFAULT_RETENTION_SECONDS,
        max_bytes: int | None = DEFAULT_RETENTION_BYTES,
        sweep_every: float | None = 30.0,
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
        self.local = "file" in _protocols(self.fs)
        self.fs.makedirs(self.root, exist_ok=True)
        self.max_age, self.max_bytes, self.sweep_every = max_age, max_bytes, sweep_every
        self.clock = time.time  # tests move it instead of waiting
        self._lock = threading.Lock()
        self._bytes: int | None = None  # stored bytes as of the last sweep, plus writes since (None: not yet listed)
        self._closed = threading.Event()
        if sweep_every is not None and (max_age is not None or max_bytes is not None):
            threading.Thread(target=self._sweep_periodically, name="srpo-store-sweep", daemon=True).start()

    def save(self, data: bytes, ext: str) -> str:
        """Store one encoded image; returns its name. Its URL is handed out only after this returns,
        so no reader sees a partial file."""
        name = f"{uuid.uuid4().hex}.{ext}"
        self.fs.pipe_file(f"{self.root}/{name}", data)
        self.fs.pipe_file(f"{self.root}/{name}{self.MARKER}", b"")
        with self._lock:
            known = self._bytes is not None
            if known:
                self._bytes += len(data)
            over = self.max_bytes is not None and (not known or self._bytes > self.max_bytes)
        if over:  # the first write after a start lists the store once: images it already held count too
            self.sweep()
        return name

    def read(self, name: str) -> bytes | None:
        """A stored image's bytes, or None: only regular files this store wrote, and not expired."""
        if not FILE_NAME.fullmatch(name):
            return None
        path = f"{self.root}/{name}"
        try:
            info = self._own_file(path)
            if info is None or self._expired(info, self.clock()):
                return None
            return _read_no_follow(path) if self.local else self.fs.cat_file(path)
        except OSError:  # vanished, a loop, a permission problem: not an image we can serve
            return None

    def sweep(self, now: float | None = None) -> int:
        """Delete expired images; returns how many."""
        with self._lock:
            now = self.clock() if now is None else now
            files = []
            paths = self.fs.ls(self.root, detail=False)  # names only: one bad entry cannot fail the list
            bases = {path.rsplit("/", 1)[-1] for path in paths}
            orphans = [p for p in paths if _is_orphan_marker(p.rsplit("/", 1)[-1], bases, self.MARKER)]
            for path in paths:
                base = path.rsplit("/", 1)[-1]
                if not FILE_NAME.fullmatch(base):
                    continue
                try:
                    info = self._own_file(path)
                except OSError as exc:
                    log.warning("output store: skipping %s: %s", base, exc)
                    continue
                if info is not None:
                    files.append((_modified(info), info.get("size") or 0, path))
            files.sort()  # oldest first
            doomed = [f for f in files if self._expired({"mtime": f[0]}, now)]
            kept = files[len(doomed) :]
            total = sum(size for _, size, _ in kept)
            while self.max_bytes is not None and kept and total > self.max_bytes:
                total -= kept[0][1]
                doomed.append(kept.pop(0))
            self._bytes = total
            for _, _, path in doomed:
                for victim in (path, path + self.MARKER):
                    try:
                        self.fs.rm_file(victim)
                    except OSError as exc:  # gone already, or not ours to remove after all
                        log.debug("output store: could not remove %s: %s", victim, exc)
            for path in orphans:  # a marker whose image is gone (removed by hand, or a crash mid-delete)
                try:
                    self.fs.rm_file(path)
                except OSError as exc:
                    log.debug("output store: could not remove %s: %s", path, exc)
            if doomed:
                log.info("expired %d stored image(s) from %s", len(doomed), self.location)
            return len(doomed)

    def close(self) -> None:
        """Stop the sweep timer."""
        self._closed.set()

    def problem(self) -> str | None:
        """Why images cannot be stored right now (None when they can): checked by writing a probe file."""
        probe = f"{self.root}/.health-{uuid.uuid4().hex}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:  # each file system raises its own errors
            return f"the output store {self.location!r} is not writable: {getattr(exc, 'strerror', None) or exc}"
        return None

    def _own_file(self, path: str) -> dict | None:
        """``path``'s info when it is a regular file (not a link) that this store wrote, else None."""
        if not self.fs.exists(path + self.MARKER):
            return None  # not written by us: never served, never deleted
        if self.local and os.path.islink(path):
            return None
        info = self.fs.info(path)
        if info.get("type") != "file" or info.get("islink"):
            return None
        return info

    def _expired(self, info: dict, now: float) -> bool:
        return self.max_age is not None and now - _modified(info) > self.max_age

    def _sweep_periodically(self) -> None:
        while not self._closed.wait(self.sweep_every):
            try:
                self.sweep()
            except Exception:  # a store that cannot be listed right now: try again next time
                log.warning("output store sweep failed", exc_info=True)


def _is_orphan_marker(base: str, bases: set[str], marker: str) -> bool:
    """A marker of a name the store writes whose image is not in the listing. (``save`` writes the image
    before its marker, so a marker never precedes its image.)"""
    image = base[: -len(marker)]
    return base.endswith(marker) and bool(FILE_NAME.fullmatch(image)) and image not in bases


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _read_no_follow(path: str) -> bytes:
    """A local file's bytes, refusing a symlink swapped in after the check (``O_NOFOLLOW``) and anything
    that is not a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read()


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
