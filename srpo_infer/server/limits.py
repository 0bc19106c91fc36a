"""What one client may hold of the server: connections, the time to send its headers, and log lines.

uvicorn bounds none of these by itself: a connection that sends half a request line is kept forever,
and a flood of them runs the process out of file descriptors, after which every accept fails (and
asyncio logs each failure). :func:`uvicorn_config` gives ``srpo-infer serve`` a uvicorn protocol class
(h11 or httptools, whichever uvicorn would pick) with three rules:

- **Headers in time**: a connection must complete each request's headers within ``header_timeout``
  seconds of connecting (or of the previous response); otherwise it is closed.
- **A connection cap**: at most ``max_connections`` open at once (default: half the process's file
  descriptor limit, at most 1024). At the cap, a new connection first evicts the oldest connection
  still waiting for its headers (a half-open one costs the server nothing to drop); when every
  connection is busy with a real request, the new one gets a 503 JSON refusal and is closed.
- **A resource shortage logs once per interval**, with a count, instead of once per failed accept.

The body's own time limit (a trickling body) is the app's: :class:`~srpo_infer.server.guard.Guard`
reads every body with a deadline, so a mounted app is bounded too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

SHORTAGE_LOG_EVERY_S = 10.0


def default_max_connections() -> int:
    """Half the soft file-descriptor limit (the other half for files, the model and the store), at
    most 1024 and at least 8."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft // 2))


@dataclass(frozen=True)
class ConnectionLimits:
    """``header_timeout``: seconds a connection has to send a request's headers. ``body_timeout``:
    seconds a request has to send its whole body (at most 64 KB: 30 s is a minimum rate of about
    2 KB/s). ``max_connections``: open connections at once (None: :func:`default_max_connections`)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int | None = None

    def __post_init__(self):
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")

    @property
    def connections(self) -> int:
        return self.max_connections if self.max_connections is not None else default_max_connections()


_REFUSAL_BODY = json.dumps({"error": {"message": "too many open connections; retry shortly", "status": 503}}).encode()
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\nconnection: close\r\n"
    + f"content-length: {len(_REFUSAL_BODY)}\r\n\r\n".encode()
    + _REFUSAL_BODY
)


class _Limited:
    """Mixed in before uvicorn's H11Protocol or HttpToolsProtocol (both keep ``self.cycle``, the request
    being answered, ``self.connections``, the server's open connections, and ``self.loop``)."""

    limits: ConnectionLimits

    def connection_made(self, transport) -> None:
        self._header_timer = None
        self._waiting_since: float | None = None  # set while the connection owes us a request's headers
        self.transport = transport  # uvicorn's connection_lost closes it, refused or not
        if len(self.connections) >= self.limits.connections and not self._evict_one_waiting():
            _shortage.note("connection cap (%d) reached: refusing new connections", self.limits.connections)
            transport.write(REFUSAL)
            transport.close()
            return
        super().connection_made(transport)
        self._arm()

    def _evict_one_waiting(self) -> bool:
        waiting = [c for c in self.connections if getattr(c, "_waiting_since", None) is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._waiting_since)
        _shortage.note(
            "connection cap (%d) reached: closing the oldest connections still sending headers", self.limits.connections
        )
        oldest._close_waiting()
        return True

    def _arm(self) -> None:
        self._cancel_timer()
        self._cycle_at_arm = self.cycle
        self._waiting_since = time.monotonic()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_late)

    def _cancel_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
        self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is self._cycle_at_arm:  # no request has begun since the timer was set
            log.debug("closing a connection that sent no complete headers in %.0f s", self.limits.header_timeout)
            self._close_waiting()

    def _close_waiting(self) -> None:
        self._waiting_since = None
        self._cancel_timer()
        self.connections.discard(self)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._waiting_since is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the next request on a kept-alive connection: its headers get the same limit
        super().data_received(data)
        if self._waiting_since is not None and self.cycle is not self._cycle_at_arm:
            self._waiting_since = None  # its headers arrived; the body's deadline is the app's
            self._cancel_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_timer()
        self._waiting_since = None
        super().connection_lost(exc)


def protocol_class(limits: ConnectionLimits, http: str = "auto") -> type:
    """uvicorn's HTTP protocol (``h11``, ``httptools``, or ``auto``: httptools when installed) with the limits."""
    if http not in ("auto", "h11", "httptools"):
        raise ValueError(f"http must be 'auto', 'h11' or 'httptools', got {http!r}")
    base = None
    if http in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        except ImportError:
            if http == "httptools":
                raise ValueError("http='httptools' needs the httptools package: pip install httptools") from None
    if base is None:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type(f"Limited{base.__name__}", (_Limited, base), {"limits": limits})


def uvicorn_config(app, *, host: str, port: int, limits: ConnectionLimits, http: str = "auto", **options):
    """A ``uvicorn.Config`` serving ``app`` with the limits."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=protocol_class(limits, http), **options)


class _Shortage:
    """Says a resource shortage once per :data:`SHORTAGE_LOG_EVERY_S`, with how many times it happened."""

    def __init__(self):
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def note(self, message: str, *args) -> None:
        now = time.monotonic()
        self._count[message] = self._count.get(message, 0) + 1
        if now - self._last.get(message, -SHORTAGE_LOG_EVERY_S) >= SHORTAGE_LOG_EVERY_S:
            count, self._count[message], self._last[message] = self._count[message], 0, now
            log.warning(message + " (%d time(s) in the last %.0f s)", *args, count, SHORTAGE_LOG_EVERY_S)


_shortage = _Shortage()


def quiet_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Route the event loop's "out of system resource" errors (a failed ``accept()`` when file descriptors
    run out: one per attempt) through the once-per-interval log; everything else as before."""

    def handler(loop, context):
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _SHORTAGE_ERRNOS:
            _shortage.note("accept() failed: %s", exc.strerror or exc)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _shortage_errnos() -> frozenset[int]:
    import errno

    return frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


_SHORTAGE_ERRNOS = _shortage_errnos()
