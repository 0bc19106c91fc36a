"""The one thread that owns the GPU: a bounded queue of generation jobs, run one at a time, that can
cancel an abandoned job, estimate the wait, and drain on shutdown."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..request import GenerationRequest

log = logging.getLogger(__name__)

# Seconds per megapixel-step before anything was measured: the tiny model on a 2-core CPU runs about
# 0.1 s per 1024² step; a real model on a GPU is in the same range (H200, bf16: 0.174 s at 1024²).
INITIAL_SECONDS_PER_MEGAPIXEL_STEP = 0.15


class QueueFull(Exception):
    """The bounded queue has no room; the client should retry later."""


class ShuttingDown(Exception):
    """The server is draining: no new jobs, and jobs still waiting when the drain time ran out."""


def job_cost(width: int, height: int, num_inference_steps: int, num_images: int = 1) -> float:
    """A request's cost in megapixel-steps: what the transformer's work grows with.

    >>> job_cost(1024, 1024, 28)
    29.360128
    """
    return width * height * num_inference_steps * num_images / 1e6


@dataclass(eq=False)  # identity: jobs go in sets
class Job:
    """One validated request on its way to the pipeline, and how to cancel it."""

    request: GenerationRequest
    cost: float = 0.0
    future: Future = field(default_factory=Future)
    stop: threading.Event = field(default_factory=threading.Event)
    withdraw: Callable[[Job], None] | None = None  # takes a waiting job out of its queue

    def cancel(self) -> None:
        """Drop the job if it still waits (its queue slot is free at once); stop it before its next
        denoising step if it runs."""
        self.stop.set()
        self.future.cancel()
        if self.withdraw is not None:
            self.withdraw(self)


class Worker:
    """Runs ``pipeline.generate(job.request)`` for queued jobs on a single daemon thread.

    One worker owns the pipeline, so requests never run concurrently on the GPU; ``max_queue`` bounds
    the waiting jobs (the one running is not counted). A cancelled job leaves the queue at once.
    """

    def __init__(self, max_queue: int = 16):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.pipeline: Any = None
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self._finished = False
        self.seconds_per_cost = INITIAL_SECONDS_PER_MEGAPIXEL_STEP  # updated from finished jobs
        self._thread = threading.Thread(target=self._loop, name="srpo-gpu-worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        with self._changed:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        """A job is running."""
        return self._running is not None

    def submit(self, request: GenerationRequest, cost: float = 0.0) -> Job:
        """Queue a job; raises :class:`QueueFull` at once when there is no room, :class:`ShuttingDown`
        once :meth:`stop` has begun."""
        with self._changed:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            job = Job(request, cost, withdraw=self._withdraw)
            self._waiting.append(job)
            self._changed.notify_all()
        return job

    def _withdraw(self, job: Job) -> None:
        with self._changed:
            if job in self._waiting:
                self._waiting.remove(job)
                self._changed.notify_all()

    def expected_wait(self) -> float:
        """Seconds until a job submitted now would start: the queued and running work at the measured rate."""
        with self._changed:
            waiting = sum(j.cost for j in self._waiting)
        running = self._running.cost if self._running is not None else 0.0
        return (waiting + running) * self.seconds_per_cost

    def stop(self, drain_timeout: float = 60.0) -> int:
        """Stop taking jobs, let the queued and running ones finish for up to ``drain_timeout`` seconds,
        then fail what is left with :class:`ShuttingDown`. Returns how many jobs were failed."""
        with self._changed:
            self._closed = True
            self._changed.wait_for(lambda: not self._waiting and self._running is None, timeout=drain_timeout)
            left, self._waiting = list(self._waiting), deque()
            running, self._finished = self._running, True
            self._changed.notify_all()
        failed = 0
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server shut down before this request could run"))
                failed += 1
        if running is not None:
            running.stop.set()  # the pipeline stops before its next step; the job answers as cancelled
            failed += 1
        self._thread.join(timeout=10)
        return failed

    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._finished)
                if self._finished:
                    return
                job = self._waiting.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited: its client is gone
                self._running = job
            t0 = time.perf_counter()
            try:
                job.future.set_result(self.pipeline.generate(job.request, progress=False, should_stop=job.stop.is_set))
                if job.cost > 0:  # an exponential average of the measured rate, for Retry-After
                    rate = (time.perf_counter() - t0) / job.cost
                    self.seconds_per_cost = 0.7 * self.seconds_per_cost + 0.3 * rate
            except BaseException as exc:  # every failure goes back to its own request; the loop lives on
                job.future.set_exception(exc)
            finally:
                with self._changed:
                    self._running = None
                    self._changed.notify_all()
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
