"""A server whose pipeline splits each image over several processes (``--context-parallel N`` under
``torchrun``): rank 0 runs HTTP and the queue and hands each request to the other ranks, which run it
in step with it.

Every rank must run every request, step for step: a rank that stops (killed, out of memory) leaves the
others waiting in a collective that can never complete, so after any failure mid-generation the group
is broken for good. The leader then answers 503 and ``/health`` says ``failed`` with the reason, so a
supervisor restarts the whole group.
"""

from __future__ import annotations

import logging
import signal
import threading

from ..context_parallel import ContextParallelError
from ..pipeline import GenerationCancelled

log = logging.getLogger(__name__)


class Leader:
    """Rank 0's pipeline as the worker sees it: ``generate`` first sends the request to the followers."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.context_parallel = pipeline.context_parallel
        self.broken: str | None = None

    def generate(self, request, **options):
        """Run ``request`` on every rank; raises :class:`ContextParallelError` once the group is broken."""
        if self.broken is not None:
            raise ContextParallelError(self.broken)
        try:
            self.context_parallel.broadcast(request)
            return self.pipeline.generate(request, **options)
        except (ValueError, GenerationCancelled):  # every rank refused or stopped at the same point
            raise
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc, ContextParallelError) and exc.__cause__ else exc
            detail = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__
            self.broken = (
                f"a process of this server's {self.context_parallel.degree}-process context-parallel group failed "
                f"or is gone, so no image can be generated here any more; restart the server ({detail})"
            )
            log.error("%s", self.broken)
            raise ContextParallelError(self.broken) from exc

    def close(self) -> None:
        """Tell the followers to exit (they return 0)."""
        if self.broken is None:
            try:
                self.context_parallel.broadcast(None)
            except ContextParallelError as exc:
                log.warning("could not tell the other ranks to stop: %s", exc)

    def __getattr__(self, name):
        return getattr(self.pipeline, name)


def follow(pipeline) -> int:
    """A non-zero rank's loop: run each request rank 0 sends until it sends ``None``; the exit code."""
    cp = pipeline.context_parallel
    if threading.current_thread() is threading.main_thread():
        # torchrun (and a terminal's Ctrl-C) signal every rank; rank 0 drains the queue, these ranks must
        # keep running its requests until it says stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    log.info("rank %d follows rank 0's requests", cp.rank)
    while True:
        try:
            request = cp.broadcast(None)
        except ContextParallelError as exc:
            log.error("%s", exc)
            return 1
        if request is None:
            return 0
        try:
            pipeline.generate(request, progress=False)
        except (ValueError, GenerationCancelled):
            continue  # rank 0 refused or stopped it at the same point
        except Exception:
            log.exception("rank %d failed a generation; the group is broken", cp.rank)
            return 1
