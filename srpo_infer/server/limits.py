"""What one client may hold of the server: connections, the size of its headers, the time to send
them and to read the answer, and log lines.

uvicorn bounds few of these by itself: a connection that sends half a request line is kept forever, a
flood of them runs the process out of file descriptors, after which every accept fails (and asyncio
logs each failure); under httptools a header block has no size limit at all, and under either parser a
client that stops reading holds its connection for as long as it likes. :func:`uvicorn_config` gives
``srpo-infer serve`` a uvicorn protocol class (h11 or httptools, whichever uvicorn would pick) with
these rules, the same under both parsers:

- **Headers in time**: a connection must complete each request's headers within ``header_timeout``
  seconds of connecting (or of the previous response); otherwise it is closed.
- **Headers in size**: a header block (request line included) over ``max_header_bytes`` gets a 431
  JSON refusal and the connection is closed; nothing past the limit reaches the parser, so a block
  that never ends costs at most that much memory.
- **Answers read in time**: a response whose bytes make no progress into the socket for
  ``send_timeout`` seconds (the client stopped reading) is dropped and its connection closed, so slow
  readers cannot hold the connection cap. A slow link that still reads keeps its connection.
- **Parser errors are JSON**: a request the parser cannot read gets the usual JSON error body (400).
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
MIN_HEADER_BYTES = 1024  # below this, ordinary clients (a browser's cookies, user agent) would be refused


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
    2 KB/s). ``max_connections``: open connections at once (None: :func:`default_max_connections`).
    ``max_header_bytes``: the largest header block, request line included (16 KB: browsers and proxies
    send a few KB; nginx's default buffers allow 8 KB per line). ``send_timeout``: seconds an answer
    may make no progress into the socket before its connection is dropped (30 s: any link that moves
    a byte in 30 s keeps going, so a 1536² PNG of ~7 MB still reaches a 2 KB/s client)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int | None = None
    max_header_bytes: int = 16 * 1024
    send_timeout: float = 30.0

    def __post_init__(self):
        for name in ("header_timeout", "body_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_header_bytes < MIN_HEADER_BYTES:
            raise ValueError(f"max_header_bytes must be >= {MIN_HEADER_BYTES}, got {self.max_header_bytes}")

    @property
    def connections(self) -> int:
        return self.max_connections if self.max_connections is not None else default_max_connections()


def raw_json_error(status: int, message: str, headers: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response with the JSON error body, for answers written below the ASGI app
    (before a request exists, or when the parser cannot read one); the connection closes after it."""
    import http

    body = json.dumps({"error": {"message": message, "status": status}}).encode()
    return (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()
        + b"content-type: application/json\r\n"
        + headers
        + f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )


REFUSAL = raw_json_error(503, "too many open connections; retry shortly", b"retry-after: 5\r\n")


class _CountingTransport:
    """The connection's transport, counting the bytes handed to it, so the send timeout can tell
    progress (bytes that left the transport's buffer) from a client that stopped reading."""

    def __init__(self, transport, on_write):
        self._transport, self._on_write = transport, on_write
        self.written = 0

    def write(self, data) -> None:
        self.written += len(data)
        self._transport.write(data)
        self._on_write()

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    @property
    def sent(self) -> int:
        """Bytes that reached the socket (written, less what still waits in the transport's buffer)."""
        return self.written - self._transport.get_write_buffer_size()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class _Limited:
    """Mixed in before uvicorn's H11Protocol or HttpToolsProtocol (both keep ``self.cycle``, the request
    being answered, whose ``more_body`` stays true until its body has been read, ``self.connections``,
    the server's open connections, ``self.loop``, and ``send_400_response``)."""

    limits: ConnectionLimits

    def connection_made(self, transport) -> None:
        self._header_timer = self._send_timer = None
        self._waiting_since: float | None = None  # set while the connection owes us a request's headers
        self._head_of, self._head_bytes = None, 0  # the cycle the head being read follows, and its size
        self.transport = transport  # uvicorn's connection_lost closes it, refused or not
        if len(self.connections) >= self.limits.connections and not self._evict_one_waiting():
            _shortage.note("connection cap (%d) reached: refusing new connections", self.limits.connections)
            transport.write(REFUSAL)
            transport.close()
            return
        super().connection_made(_CountingTransport(transport, self._written))
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
        self._feed(data)
        if self._waiting_since is not None and self.cycle is not self._cycle_at_arm:
            self._waiting_since = None  # its headers arrived; the body's deadline is the app's
            self._cancel_timer()

    def _feed(self, data: bytes) -> None:
        """Hand ``data`` to the parser, but never more than ``max_header_bytes`` of one request's head.

        Neither parser says where in a chunk a head ends, so while a head is being read the parser gets
        at most the bytes left in its allowance and the loop looks again: a head that ends inside a
        piece starts a new cycle (the rest of the piece is its body, or the next head, whose allowance
        starts afresh; a pipelined head may so reach twice the limit, never more)."""
        limit = self.limits.max_header_bytes
        while data and not self.transport.is_closing():
            if self.cycle is not None and self.cycle.more_body:  # a body: the app bounds it (Guard)
                super().data_received(data)
                return
            if self.cycle is not self._head_of:  # the head of the request after self.cycle's begins
                self._head_of, self._head_bytes = self.cycle, 0
            room = limit - self._head_bytes
            if room <= 0:
                self._refuse_head()
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)

    def _refuse_head(self) -> None:
        _shortage.note("request headers over %d bytes: answered 431 and closed", self.limits.max_header_bytes)
        self._waiting_since = None
        self._cancel_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head while the previous answer is still going out: a 431 cannot be spliced in.
            self.transport.abort()
            return
        message = f"request headers over {self.limits.max_header_bytes} bytes (request line included)"
        self.transport.write(raw_json_error(431, message))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what its parser cannot read, as our JSON error instead of text/plain."""
        self.transport.write(raw_json_error(400, f"malformed HTTP request: {msg.rstrip('.')}"))
        self.transport.close()

    def _written(self) -> None:
        """A write went to the transport: watch that its bytes keep moving (see :meth:`_check_send`)."""
        if self._send_timer is None:
            self._sent_mark, self._progress_at = self.transport.sent, self.loop.time()
            self._send_timer = self.loop.call_later(self.limits.send_timeout / 4, self._check_send)

    def _check_send(self) -> None:
        """Every quarter of ``send_timeout`` while the transport holds unsent bytes: if none left it for
        ``send_timeout`` seconds, the client stopped reading and the connection is dropped."""
        self._send_timer = None
        if self.transport.get_write_buffer_size() == 0:
            return  # all handed to the socket; the next write watches again
        now, sent = self.loop.time(), self.transport.sent
        if sent != self._sent_mark:
            self._sent_mark, self._progress_at = sent, now
        elif now - self._progress_at >= self.limits.send_timeout:
            _shortage.note(
                "dropped a connection whose client read none of its answer for %.0f s", self.limits.send_timeout
            )
            self.transport.abort()  # close() would wait for the unread bytes; abort frees the slot now
            return
        self._send_timer = self.loop.call_later(self.limits.send_timeout / 4, self._check_send)

    def connection_lost(self, exc) -> None:
        self._cancel_timer()
        if getattr(self, "_send_timer", None) is not None:
            self._send_timer.cancel()
            self._send_timer = None
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

    # h11 bounds its own buffer too (a pipelined head reaches it whole); httptools has no such setting.
    options.setdefault("h11_max_incomplete_event_size", limits.max_header_bytes)
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
