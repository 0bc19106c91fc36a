"""The one thread that owns the GPU: a bounded queue of generation jobs, run one at a time, that can
cancel an abandoned job, estimate the wait, and drain on shutdown."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..request import GenerationRequest
from .backend import Capabilities, Job, QueueFull, ShuttingDown

log = logging.getLogger(__name__)

# Seconds per megapixel-step before anything was measured: the tiny model on a 2-core CPU runs about
# 0.1 s per 1024² step; a real model on a GPU is in the same range (H200, bf16: 0.174 s at 1024²).
INITIAL_SECONDS_PER_MEGAPIXEL_STEP = 0.15
MAX_PACE = 5.0  # the most the running job's pace may scale the estimate, either way


class ServiceTimes:
    """Seconds a job takes, from the last ``window`` finished jobs: a fixed part (text encoding, decoding,
    the per-step overhead a small image still pays) plus a part per megapixel-step, fitted by least
    squares once the jobs seen differ in cost, else the measured seconds per megapixel-step. Before any
    job has finished: ``initial`` seconds per megapixel-step.

    >>> times = ServiceTimes()
    >>> for cost in (1.0, 2.0, 4.0):
    ...     times.record(cost, 3.0 + 0.5 * cost)
    >>> round(times.estimate(8.0), 6)
    7.0
    """

    def __init__(self, initial: float = INITIAL_SECONDS_PER_MEGAPIXEL_STEP, window: int = 16):
        self.initial = initial
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)

    def record(self, cost: float, seconds: float) -> None:
        if cost > 0 and seconds >= 0:
            self.recent.append((cost, seconds))

    def estimate(self, cost: float) -> float:
        """Expected seconds for a job of ``cost`` megapixel-steps."""
        fixed, per_cost = self.model()
        return fixed + per_cost * cost

    def model(self) -> tuple[float, float]:
        """``(fixed seconds, seconds per megapixel-step)`` of the jobs seen."""
        if not self.recent:
            return 0.0, self.initial
        costs, times = zip(*self.recent, strict=True)
        mean_c, mean_t = sum(costs) / len(costs), sum(times) / len(times)
        spread = sum((c - mean_c) ** 2 for c in costs)
        if spread > 1e-9 * max(1.0, mean_c**2):
            slope = sum((c - mean_c) * (t - mean_t) for c, t in zip(costs, times, strict=True)) / spread
            if slope >= 0:
                fixed = mean_t - slope * mean_c
                if fixed >= 0:
                    return fixed, slope
        # One cost seen (or a fit that makes no sense): seconds per megapixel-step, the median of the jobs.
        return 0.0, statistics.median(t / c for c, t in self.recent)


class Worker:
    """Runs ``pipeline.generate(job.request)`` for queued jobs on a single daemon thread.

    One worker owns the pipeline, so requests never run concurrently on the GPU; ``max_queue`` bounds
    the waiting jobs (the one running is not counted). A cancelled job leaves the queue at once.
    """

    capabilities = Capabilities(streams=True, adapters=True)  # previews as they form; adapters in this process

    def __init__(self, max_queue: int = 16, clock: Callable[[], float] = time.monotonic):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.pipeline: Any = None
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self._finished = False
        self.times = ServiceTimes()  # what finished jobs took, for Retry-After
        self.clock = clock
        self._started_at = 0.0
        self._thread = threading.Thread(target=self._loop, name="srpo-gpu-worker", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """A pipeline is loaded: jobs can run."""
        return self.pipeline is not None

    def attach(self, pipeline: Any) -> None:
        """The loaded pipeline this worker's thread runs."""
        self.pipeline = pipeline

    def cancel(self, job: Job) -> None:
        """Drop ``job`` if it waits (its queue slot is free at once); stop it before its next step if it runs."""
        job.cancel()

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        with self._changed:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        """A job is running."""
        return self._running is not None

    def submit(
        self,
        request: GenerationRequest,
        previews: int = 0,
        on_preview: Callable[[Any], None] | None = None,
    ) -> Job:
        """Queue a job; raises :class:`QueueFull` at once when there is no room, :class:`ShuttingDown`
        once :meth:`stop` has begun. ``previews``/``on_preview`` go to ``pipeline.generate``."""
        with self._changed:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            job = Job(request, withdraw=self._withdraw, previews=previews, on_preview=on_preview, clock=self.clock)
            self._waiting.append(job)
            self._changed.notify_all()
        return job

    def _withdraw(self, job: Job) -> None:
        with self._changed:
            if job in self._waiting:
                self._waiting.remove(job)
                self._changed.notify_all()

    def expected_wait(self) -> float:
        """Seconds until a job submitted now would start: what the queued jobs and the rest of the running
        one should take, from the measured times of recent jobs (:class:`ServiceTimes`), scaled by how
        fast the running job's steps go now against what those jobs predict for it (a machine busy with
        other work, or throttled, is slower than it was: the measured steps say so at once)."""
        with self._changed:
            waiting = [j.cost for j in self._waiting]
            running, started = self._running, self._started_at
        pace = 1.0
        left = 0.0
        if running is not None:
            pace = self._pace(running)
            left = max(0.0, pace * self.times.estimate(running.cost) - (self.clock() - started))
        return left + pace * sum(self.times.estimate(cost) for cost in waiting)

    def _pace(self, job: Job) -> float:
        """The running job's measured seconds per step over what the recent jobs predict per step (1:
        nothing measured yet), within [1/MAX_PACE, MAX_PACE] so one odd step cannot swing the estimate."""
        measured = job.step_seconds()
        steps = job.request.num_inference_steps
        _, per_cost = self.times.model()
        predicted = per_cost * job.cost / steps if steps else 0.0
        if measured is None or not predicted > 0:
            return 1.0
        return min(MAX_PACE, max(1 / MAX_PACE, measured / predicted))

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
                self._running, self._started_at = job, self.clock()
            t0 = self._started_at
            try:
                job.future.set_result(self.pipeline.generate(job.request, **job.options()))
                self.times.record(job.cost, self.clock() - t0)
            except BaseException as exc:  # every failure goes back to its own request; the loop lives on
                job.future.set_exception(exc)
                if out_of_memory(exc):
                    release_cuda_cache()
            finally:
                with self._changed:
                    self._running = None
                    self._changed.notify_all()


def out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (torch's own class, or the RuntimeError older paths raise)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def release_cuda_cache() -> None:
    """After an out-of-memory error only: the allocator may hold fragmented blocks, give them back so
    the next request starts clean. Not after every job: the cached blocks are what lets the next
    request allocate without a cudaMalloc (and its implicit synchronization); memory modes that move
    weights release what they need themselves (``memory.Residency``)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # never let housekeeping kill the worker
        log.debug("empty_cache failed", exc_info=True)
