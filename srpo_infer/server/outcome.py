"""What a queued job's end becomes for its client: the result, or the HTTP error its failure means,
and the cancellation of a job whose client hung up."""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request

from ..context_parallel import ContextParallelError
from ..pipeline import GenerationCancelled
from .backend import ShuttingDown
from .errors import ApiError, field_of

log = logging.getLogger(__name__)

BROKEN_GROUP = (
    "this server's context-parallel group failed or is gone (a process was lost): it cannot generate until "
    "you restart the server"
)
CLIENT_CLOSED = 499  # nginx's "client closed request": counted in /metrics, read by nobody
DISCONNECT_POLL_S = 0.25


async def wait_for(job, request: Request, state):
    """The job's result; a client that hangs up cancels its job (dropped if queued, stopped at the next
    step if running), and a job's failure becomes its HTTP error."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                abandon(job, future)
                log.info("client hung up; its job was cancelled")
                raise ApiError(CLIENT_CLOSED, "client closed the request; its job was cancelled")
    except asyncio.CancelledError:  # servers that cancel the handler on a hang-up (Ray Serve's proxy)
        abandon(job, future)
        log.info("request cancelled by the server; its job was cancelled")
        raise
    return outcome(future, state)


def outcome(future: asyncio.Future, state):
    """A finished job's result, or its failure as the HTTP error it becomes."""
    try:
        return future.result()
    except asyncio.CancelledError:
        raise ApiError(CLIENT_CLOSED, "client closed the request; its job was cancelled") from None
    except ValueError as exc:  # request rules the schema cannot express
        raise ApiError(422, str(exc), field_of(str(exc))) from None
    except (GenerationCancelled, ShuttingDown):
        if state.draining:
            raise ApiError(
                503,
                "the server shut down before this request finished; retry on another instance",
                headers={"Retry-After": "5"},
            ) from None
        raise ApiError(CLIENT_CLOSED, "client closed the request; its job was cancelled") from None
    except ContextParallelError as exc:  # a peer process is gone: no generation can run again here
        # The details (source paths, a peer's address) are for the operator's log, not for clients.
        log.error("context parallelism broke; this server can no longer generate: %s", exc)
        state.broken = BROKEN_GROUP
        raise ApiError(503, BROKEN_GROUP) from None
    except Exception as exc:
        if is_oom(exc):
            log.warning("out of GPU memory on one request: %s", exc)
            raise ApiError(
                503,
                "the GPU ran out of memory on this request; try fewer or smaller images",
                headers={"Retry-After": "5"},
            ) from None
        raise


def abandon(job, future: asyncio.Future) -> None:
    """Cancel a job nobody waits for any more. A running job still ends (cancelled, or with an error)
    later; its outcome is read here so asyncio never logs "exception was never retrieved"."""
    job.cancel()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return "out of memory" in str(exc).lower()
