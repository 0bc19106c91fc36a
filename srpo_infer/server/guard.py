"""The ASGI middleware in front of the API: body size limit, API key, no stack trace to a client, and
the metrics of every response.

A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: behind that one an endpoint never
sees ``http.disconnect`` (``request.is_disconnected()`` stays false), and the server must notice a
client that hung up to cancel its job.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from starlette.datastructures import Headers

from .metrics import Metrics

log = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"


class Guard:
    """Wraps the app: ``Guard(app, metrics=..., api_key=..., max_body_bytes=...)``."""

    def __init__(self, app, *, metrics: Metrics, api_key: str | None, max_body_bytes: int):
        self.app, self.metrics, self.api_key, self.max_body_bytes = app, metrics, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        # Paths relative to where the app is mounted, so a mounted app guards its /v1/ routes too.
        path = scope["path"][len(scope.get("root_path", "")) :] if scope["path"].startswith(
            scope.get("root_path", "")) else scope["path"]  # fmt: skip
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
        if scope["method"] == "POST":
            size = headers.get("content-length")
            too_big = f"request body over {self.max_body_bytes} bytes"
            if size is not None and (not size.isdigit() or int(size) > self.max_body_bytes):
                await _json_error(send, 413, too_big)
                return
            if size is None:  # chunked: read it here, bounded, so a huge stream is refused too
                body, more = b"", True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body_bytes:
                        await _json_error(send, 413, too_big)
                        return
                receive = _replay(body, receive)
        if self.api_key and path.startswith("/v1/"):
            sent = headers.get("authorization", "")
            token = sent[7:] if sent.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await _json_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  [(b"www-authenticate", b"Bearer")])  # fmt: skip
                return
        started = [False]

        async def tracked_send(message):
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:  # no stack trace ever reaches a client
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started[0]:
                await _json_error(send, 500, "internal server error")


def _replay(body: bytes, receive):
    """A ``receive`` that hands the already-read body over first, then the client's later messages
    (``http.disconnect`` among them)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def _json_error(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "status": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
