"""The ASGI middleware in front of the API: body size limit, API key, no stack trace to a client, and
the metrics of every response.

A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: behind that one an endpoint never
sees ``http.disconnect`` (``request.is_disconnected()`` stays false), and the server must notice a
client that hung up to cancel its job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time

from starlette.datastructures import Headers

from .metrics import Metrics

log = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"
# Starlette's route patterns end in "$", which also matches before a final newline: "/health\n" (sent as
# /health%0A) would reach /health. No route has a control character, so such a path is a 404 here.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Guard:
    """Wraps the app: ``Guard(app, metrics=..., api_key=..., max_body_bytes=..., body_timeout=...)``.

    Every request body is read here before the app sees it: at most ``max_body_bytes`` (a larger
    declared length is refused before reading), within ``body_timeout`` seconds (408 otherwise), and
    never when it carries both ``Content-Length`` and ``Transfer-Encoding`` (400)."""

    def __init__(self, app, *, metrics: Metrics, api_key: str | None, max_body_bytes: int, body_timeout: float = 30.0):
        self.app, self.metrics, self.api_key, self.max_body_bytes = app, metrics, api_key, max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        # Paths relative to where the app is mounted, so a mounted app guards its /v1/ routes too.
        path = (
            scope["path"][len(scope.get("root_path", "")) :]
            if scope["path"].startswith(scope.get("root_path", ""))
            else scope["path"]
        )
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send, path)
        finally:
            # The latency histogram is of generations; refusals (401/413/422/429/503…) only count by status.
            self.metrics.observe(status[0], time.perf_counter() - t0, path == GENERATIONS_PATH and status[0] == 200)

    async def _guarded(self, scope, receive, send, path: str):
        headers = Headers(scope=scope)
        length, chunked = headers.get("content-length"), "transfer-encoding" in headers
        if CONTROL.search(path):
            await _json_error(send, 404, "Not Found", close=chunked or length not in (None, "0"))
            return
        if length is not None and chunked:
            # A smuggling shape: h11 reads such a body as chunked, past the length it declares. Refused
            # before a byte of it is read, whatever the HTTP parser underneath would have done.
            await _json_error(send, 400, "send Content-Length or Transfer-Encoding, not both", close=True)
            return
        too_big = f"request body over {self.max_body_bytes} bytes"
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _json_error(send, 413, too_big, close=True)
            return
        if chunked or (length is not None and int(length) > 0):
            # Every body is read here, bounded in size and in time, and handed to the app afterwards.
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
            except TimeoutError:
                await _json_error(
                    send, 408, f"the request body did not arrive within {self.body_timeout:g} s", close=True
                )
                return
            if body is None:  # the client hung up
                return
            if len(body) > self.max_body_bytes:
                await _json_error(send, 413, too_big, close=True)
                return
            receive = _replay(body, receive)
        if self.api_key and path.startswith("/v1/"):
            sent = headers.get("authorization", "")
            token = sent[7:] if sent.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await _json_error(
                    send,
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        started = [False]
        head = scope["method"] == "HEAD"
        if head:  # HEAD is GET without the body, on every GET route (monitors and link checkers use it)
            scope = {**scope, "method": "GET"}

        async def tracked_send(message):
            started[0] = started[0] or message["type"] == "http.response.start"
            if head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:  # no stack trace ever reaches a client
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started[0]:
                await _json_error(send, 500, "internal server error")

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or the first bytes past the limit; None when the client hung up."""
        body, more = b"", True
        while more and len(body) <= self.max_body_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
        return body


def _replay(body: bytes, receive):
    """A ``receive`` that hands the already-read body over first, then the client's later messages
    (``http.disconnect`` among them)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def _json_error(send, status: int, message: str, headers: list | None = None, close: bool = False) -> None:
    """``close``: the connection ends after this answer (a body left unread cannot be skipped safely)."""
    body = json.dumps({"error": {"message": message, "status": status}}).encode()
    headers = [*(headers or []), *([(b"connection", b"close")] if close else [])]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
