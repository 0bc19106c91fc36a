"""``stream: true`` on ``POST /v1/images/generations``: OpenAI's image streaming events over
server-sent events.

``partial_images`` N (0–3) previews (``image_generation.partial_image``, a linear RGB sketch of the
clean-image estimate at evenly spread steps, see :mod:`srpo_infer.preview`), then one
``image_generation.completed`` event with the final image as ``b64_json``: the fields of OpenAI's
``ImageGenPartialImageEvent`` / ``ImageGenCompletedEvent``, so ``client.images.generate(...,
stream=True, partial_images=N)`` of the ``openai`` SDK reads them unchanged. A failure after the
stream began is an ``error`` event carrying the usual ``{"error": {...}}`` body (the SDK raises it).

:class:`EventStream` is a plain ASGI response that listens for ``http.disconnect`` while it waits for
the next event, so a client that hangs up mid-stream cancels its job at once: the generation stops
before its next denoising step, whatever ASGI version the server speaks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response

from ..result import encode_image

log = logging.getLogger(__name__)

MAX_PARTIAL_IMAGES = 3  # OpenAI's range


def stream_refusal(body, streams: bool, checks_safety: bool) -> tuple[str, str] | None:
    """``(message, field)`` when the body asks for a streaming combination this server refuses."""
    if not body.stream:
        if body.partial_images is not None:
            return f"partial_images ({body.partial_images}) needs stream: true", "partial_images"
        return None
    if not streams:
        return (
            "stream is not supported by this server's backend (Ray Serve replicas, --replicas): send stream: false",
            "stream",
        )
    images = body.n if body.n is not None else body.num_images
    if images != 1:
        return f"stream: true makes one image; n/num_images must be 1, got {images}", "n"
    if body.response_format == "url":
        return "stream: true returns the image inline: response_format must be b64_json", "response_format"
    if body.sync_mode:
        return "stream: true returns the image inline: sync_mode must be false", "sync_mode"
    if body.partial_images and checks_safety and body.enable_safety_checker:
        return (
            "partial_images > 0 with the safety checker on: previews are not checked; send partial_images 0 "
            "or enable_safety_checker: false",
            "partial_images",
        )
    return None


def sse(event: str, data: dict) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _common(body, width: int, height: int) -> dict:
    return {
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": body.output_format,
        "quality": body.quality or "auto",
        "size": f"{width}x{height}",
    }


async def _b64(image, output_format: str) -> str:
    data = await asyncio.to_thread(encode_image, image, output_format)
    return base64.b64encode(data).decode("ascii")


async def partial_event(body, preview) -> bytes:
    image = preview.images[0]
    data = {
        "type": "image_generation.partial_image",
        "b64_json": await _b64(image, body.output_format),
        "partial_image_index": preview.index,
        **_common(body, image.width, image.height),
    }
    return sse(data["type"], data)


async def completed_event(body, result, image, flag) -> bytes:
    image_tokens = result.tokens_used and result.width * result.height // 256
    text_tokens = max(0, result.tokens_used - image_tokens)
    usage = {
        "input_tokens": text_tokens,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": text_tokens},
        "output_tokens": image_tokens,
        "total_tokens": text_tokens + image_tokens,
    }
    data = {
        "type": "image_generation.completed",
        "b64_json": await _b64(image, body.output_format),
        "usage": usage,
        **_common(body, image.width, image.height),
        "seed": result.seed,
        "timings": result.timings,
        "has_nsfw_concepts": [flag],
    }
    return sse(data["type"], data)


def error_event(status: int, message: str, field: str | None = None) -> bytes:
    error = {"message": message, "status": status, **({"field": field} if field else {})}
    return sse("error", {"error": error})


class PreviewQueue:
    """Carries previews from the GPU thread to the event loop (``put`` is the pipeline's ``on_preview``)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, preview) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, preview)


async def previews_then_result(queue: PreviewQueue, future: asyncio.Future) -> AsyncIterator:
    """Yield each preview as it arrives, until the job's future is done (then the ones still queued)."""
    while not future.done():
        get = asyncio.ensure_future(queue.queue.get())
        try:
            await asyncio.wait({get, future}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when the stream is cancelled here (its client hung up): a task left pending would be
            # garbage-collected later with asyncio's "Task was destroyed but it is pending!" ERROR.
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():  # a cancelled get is not done until the loop's next turn
            yield get.result()
    while not queue.queue.empty():  # put before the future finished: call_soon_threadsafe keeps the order
        yield queue.queue.get_nowait()


class StreamedJob:
    """What one ``stream: true`` request needs: the keywords for ``worker.submit`` (previews go to a
    :class:`PreviewQueue`) and, once the job is queued, its :class:`EventStream` response."""

    def __init__(self, body):
        self.body, self.queue = body, PreviewQueue()
        self.submit = {"previews": body.partial_images or 0, "on_preview": self.queue.put}

    def response(self, job, resolve: Callable, finish: Callable[..., Awaitable]) -> EventStream:
        """``resolve(future)``: the job's result or an error with ``status``/``message``/``field``;
        ``finish(result)``: ``(images, safety flags)``."""
        future = asyncio.wrap_future(job.future)

        def abandon() -> None:
            job.cancel()
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, so asyncio never warns

        return EventStream(self._events(future, resolve, finish), abandon)

    async def _events(self, future, resolve, finish) -> AsyncIterator[bytes]:
        async for preview in previews_then_result(self.queue, future):
            yield await partial_event(self.body, preview)
        try:
            result = resolve(future)
            images, flags = await finish(result)
        except Exception as exc:  # after the 200 went out, a failure is an error event
            status = getattr(exc, "status", 500)
            if status == 500:
                log.error("a streamed generation failed: %s", exc)
            yield error_event(status, getattr(exc, "message", "internal server error"), getattr(exc, "field", None))
            return
        yield await completed_event(self.body, result, images[0], flags[0])


def streamed_job(body) -> StreamedJob:
    """The streaming side of one request (call it inside the endpoint: it binds to the running loop)."""
    return StreamedJob(body)


class EventStream(Response):
    """An ASGI ``text/event-stream`` response of ``events`` that calls ``on_disconnect`` and stops
    iterating as soon as the client hangs up (not only at the next write)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]):
        super().__init__(status_code=200)
        self.events, self.on_disconnect = events, on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def pump() -> None:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed = pumping.done() and not pumping.cancelled() and pumping.exception() is not None
            if not pumping.done() or failed:  # the client hung up (or the server cancelled this handler)
                self.on_disconnect()
                log.info("client hung up mid-stream; its job was cancelled")
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await self.events.aclose()
