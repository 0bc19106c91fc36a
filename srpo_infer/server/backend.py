"""What the app serves through: one :class:`Backend` protocol, implemented by the in-process GPU worker
(:class:`~srpo_infer.server.worker.Worker`) and by the Ray Serve backend
(:class:`~srpo_infer.server.ray_serve.RayBackend`). The app asks a backend only what this protocol
states; what a backend can do beyond running requests is in its :class:`Capabilities`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..request import GenerationRequest


class QueueFull(Exception):
    """The bounded queue has no room; the client should retry later."""


class ShuttingDown(Exception):
    """The server is draining: no new jobs, and jobs still waiting when the drain time ran out."""


@dataclass(eq=False)  # identity: jobs go in sets
class Job:
    """One validated request on its way to the pipeline, and how to cancel it."""

    request: GenerationRequest
    future: Future = field(default_factory=Future)
    stop: threading.Event = field(default_factory=threading.Event)
    withdraw: Callable[[Job], None] | None = None  # takes a waiting job out of its queue
    previews: int = 0  # stream: true with partial_images: previews sent to on_preview as they form
    on_preview: Callable[[Any], None] | None = None
    clock: Callable[[], float] = time.monotonic
    steps_begun: int = 0  # denoising steps begun so far (the pipeline asks should_stop before each)
    first_step_at: float | None = None
    last_step_at: float | None = None

    @property
    def cost(self) -> float:
        """Megapixel-steps (:attr:`GenerationRequest.cost`): what the queue's time estimates scale with."""
        return self.request.cost

    def options(self) -> dict:
        """The keywords ``pipeline.generate`` gets besides the request."""
        options: dict[str, Any] = {"progress": False, "should_stop": self.at_step}
        if self.previews:
            options.update(previews=self.previews, on_preview=self.on_preview)
        return options

    def at_step(self) -> bool:
        """The pipeline's ``should_stop``, asked before every denoising step: notes when each began (the
        pace of the running job tells how fast the machine is now), and says whether to stop."""
        now = self.clock()
        if self.first_step_at is None:
            self.first_step_at = now
        self.last_step_at, self.steps_begun = now, self.steps_begun + 1
        return self.stop.is_set()

    def step_seconds(self) -> float | None:
        """Seconds per denoising step so far (None before a whole step was timed)."""
        if self.steps_begun < 2 or self.first_step_at is None or self.last_step_at is None:
            return None
        seconds = (self.last_step_at - self.first_step_at) / (self.steps_begun - 1)
        return seconds if seconds > 0 else None

    def cancel(self) -> None:
        """Drop the job if it still waits (its queue slot is free at once); stop it before its next
        denoising step if it runs."""
        self.stop.set()
        self.future.cancel()
        if self.withdraw is not None:
            self.withdraw(self)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do besides running a request to its images."""

    streams: bool  # previews as an image forms (``stream: true``)
    adapters: bool  # per-request LoRA adapters from the server's --lora-dir


@runtime_checkable
class Backend(Protocol):
    """Runs validated requests as jobs: queue them, cancel them, say how busy it is, drain."""

    capabilities: Capabilities

    @property
    def ready(self) -> bool:
        """A model is loaded and can take requests (health)."""

    @property
    def depth(self) -> int:
        """Jobs waiting, not counting those running (health, metrics)."""

    @property
    def busy(self) -> bool:
        """A job is running."""

    def attach(self, pipeline: Any) -> None:
        """The pipeline the backend runs, once it is loaded (one that loads its own ignores it)."""

    def submit(
        self, request: GenerationRequest, previews: int = 0, on_preview: Callable[[Any], None] | None = None
    ) -> Job:
        """Queue ``request``; raises ``QueueFull`` (429) or ``ShuttingDown`` (503)."""

    def cancel(self, job: Job) -> None:
        """Drop ``job`` if it waits, stop it before its next step if it runs (its client hung up)."""

    def expected_wait(self) -> float:
        """Seconds of work ahead of a new job (Retry-After)."""

    def stop(self, drain_timeout: float = 60.0) -> int:
        """Take no more jobs, let those in flight finish for up to ``drain_timeout``; returns how many
        were failed or stopped."""
