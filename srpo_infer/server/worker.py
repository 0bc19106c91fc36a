"""The one thread that owns the GPU: a bounded queue of generation jobs, run one at a time."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue has no room; the client should retry later."""


@dataclass
class Job:
    kwargs: dict
    future: Future = field(default_factory=Future)


class Worker:
    """Runs ``pipeline.generate(**job.kwargs)`` for queued jobs on a single daemon thread.

    One worker owns the pipeline, so requests never run concurrently on the GPU; ``max_queue`` bounds
    the waiting jobs (the one running is not counted).
    """

    def __init__(self, max_queue: int = 16):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.pipeline: Any = None
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="srpo-gpu-worker", daemon=True)
        self._thread.start()
        self.busy = False

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._queue.qsize()

    def submit(self, **kwargs) -> Future:
        """Queue a job; raises :class:`QueueFull` at once when there is no room."""
        job = Job(kwargs)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            self.busy = True
            try:
                job.future.set_result(self.pipeline.generate(**job.kwargs))
            except BaseException as exc:  # every failure goes back to its own request; the loop lives on
                job.future.set_exception(exc)
            finally:
                self.busy = False
                _release_cuda_cache()


def _release_cuda_cache() -> None:
    # After an out-of-memory error the allocator may hold fragmented blocks; give them back so the next
    # request starts clean. Cheap when there is nothing to release.
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # never let housekeeping kill the worker
        log.debug("empty_cache failed", exc_info=True)
