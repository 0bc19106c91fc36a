"""The ``flux/srpo`` HTTP API as an ASGI app: ``POST /v1/images/generations``, file serving, health,
Prometheus metrics and a playground page.

``create_app(pipeline)`` returns the app so other servers can mount it; ``srpo-infer serve`` runs it
under uvicorn. Every error is JSON ``{"error": {"message", "field"?, "status"}}``: 400 malformed JSON,
401 missing/wrong key, 404 unknown model or file, 413 oversized body, 422 invalid field, 429 queue
full (with ``Retry-After``), 503 while the model loads or after a GPU out-of-memory.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..request import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    IMAGE_SIZE_PRESETS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_SIDE,
    MIN_STEPS,
    SIDE_MULTIPLE,
)
from ..result import CONTENT_TYPES, encode_image
from .metrics import Metrics
from .worker import QueueFull, Worker

log = logging.getLogger(__name__)

MODEL_NAMES = ("flux/srpo",)
MAX_BODY_BYTES = 64 * 1024  # a 4000-character prompt is at most 16 KB of UTF-8
_FILE_NAME = re.compile(r"^[0-9a-f]{32}\.(jpeg|png)$")

Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)]
Preset = Literal[tuple(IMAGE_SIZE_PRESETS)]  # type: ignore[valid-type]


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: Side = 1024
    height: Side = 768


class GenerationBody(BaseModel):
    """The request body of the hosted ``flux/srpo`` API."""

    model_config = ConfigDict(extra="ignore")
    # Any string parses (an unknown model is a 404, not a 422); the schema lists the served ones.
    model: str = Field("flux/srpo", json_schema_extra={"enum": list(MODEL_NAMES)})
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    image_size: ImageSize | Preset = "landscape_4_3"
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=MIN_STEPS, le=MAX_STEPS)
    guidance_scale: float = Field(DEFAULT_GUIDANCE, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    sync_mode: bool = False
    enable_safety_checker: bool = True
    output_format: Literal["jpeg", "png"] = "jpeg"
    acceleration: Literal["none", "regular", "high"] | None = None  # None: the server's default


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "status": status}
    if field:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def create_app(
    pipeline=None,
    *,
    api_key: str | None = None,
    output_dir: str | Path = "outputs",
    public_url: str | None = None,
    max_queue: int = 16,
    safety_checker=None,
    default_acceleration: str = "regular",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """Build the ASGI app around a loaded :class:`~srpo_infer.SRPOPipeline`.

    ``pipeline=None`` starts in the *loading* state (503 for generations) until
    ``app.state.set_pipeline(p)`` is called. ``safety_checker``: a :class:`SafetyChecker` or None;
    without one, ``enable_safety_checker`` checks nothing and ``has_nsfw_concepts`` is ``null`` per
    image (never ``false``). ``default_acceleration`` follows the hosted API (``regular``).

    >>> # from fastapi import FastAPI; outer = FastAPI(); outer.mount("/srpo", create_app(pipe))
    """
    if default_acceleration not in ("none", "regular", "high"):
        raise ValueError(f"default_acceleration must be none, regular or high, got {default_acceleration!r}")
    out_dir = Path(output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    worker = Worker(max_queue)
    metrics = Metrics()
    app = FastAPI(
        title="srpo_infer",
        version="1",
        description="The flux/srpo image generation API, served by srpo_infer.",
    )

    def set_pipeline(p) -> None:
        worker.pipeline = p

    app.state.set_pipeline = set_pipeline
    app.state.worker = worker
    app.state.metrics = metrics
    set_pipeline(pipeline)

    # ------------------------------------------------------------------ middleware and errors

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        if request.method == "POST":
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
                return _count(metrics, _error(413, f"request body over {max_body_bytes} bytes"), t0)
            if size is None:  # chunked: read it here, bounded, so a huge stream is refused too
                body = b""
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > max_body_bytes:
                        return _count(metrics, _error(413, f"request body over {max_body_bytes} bytes"), t0)
                request._body = body
        if api_key and request.url.path.startswith("/v1/"):
            sent = request.headers.get("authorization", "")
            token = sent[7:] if sent.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _count(
                    metrics,
                    _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"}),
                    t0,
                )  # fmt: skip
        try:
            response = await call_next(request)
        except Exception:  # no stack trace ever reaches a client
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = _error(500, "internal server error")
        return _count(metrics, response, t0, request.url.path == "/v1/images/generations")

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors() or [{}]
        if errors[0].get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {errors[0].get('ctx', {}).get('error', 'cannot parse')}")
        if tuple(errors[0].get("loc", ())) == ("body",):
            return _error(400, "the body must be a JSON object with at least a prompt")
        # A union (image_size: object | preset) reports one error per branch; the branch that matches
        # the input's kind is the one that explains it.
        chosen = next((e for e in errors if e.get("type") not in ("model_attributes_type", "dict_type")), errors[0])
        loc = [str(p) for p in chosen.get("loc", []) if p != "body"]
        field = ".".join(p for p in loc if not p.startswith(("ImageSize", "literal["))) or None
        message = chosen.get("msg", "invalid request")
        if field == "image_size":
            message = f"must be one of {sorted(IMAGE_SIZE_PRESETS)} or an object with width and height"
        value = chosen.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        return _error(422, f"{field}: {message} (got {shown[:100]})", field)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    # ------------------------------------------------------------------ routes

    @app.post("/v1/images/generations", responses={400: {}, 401: {}, 404: {}, 413: {}, 422: {}, 429: {}, 503: {}})
    async def generations(body: GenerationBody, request: Request):
        """Generate images: the hosted ``flux/srpo`` request and response."""
        if body.model not in MODEL_NAMES:
            return _error(404, f"model {body.model!r} not found; this server serves {list(MODEL_NAMES)}", "model")
        if worker.pipeline is None:
            return _error(503, "the model is still loading; retry shortly", headers={"Retry-After": "10"})
        if isinstance(body.image_size, str):
            size: dict[str, Any] = {"image_size": body.image_size}
        else:
            size = {"width": body.image_size.width, "height": body.image_size.height}
        if not body.prompt.strip():
            return _error(422, "prompt: must not be blank", "prompt")
        try:
            future = worker.submit(
                prompt=body.prompt, **size, seed=body.seed, num_inference_steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale, num_images=body.num_images,
                acceleration=body.acceleration or default_acceleration, progress=False,
            )  # fmt: skip
        except QueueFull:
            return _error(429, "the queue is full; retry later", headers={"Retry-After": "5"})
        metrics.queue_depth = worker.depth
        try:
            result = await asyncio.wrap_future(future)
        except ValueError as exc:  # request rules the schema cannot express
            return _error(422, str(exc), _field_of(str(exc)))
        except Exception as exc:
            if _is_oom(exc):
                log.warning("out of GPU memory on one request: %s", exc)
                return _error(503, "the GPU ran out of memory on this request; try fewer or smaller images",
                              headers={"Retry-After": "5"})  # fmt: skip
            raise
        finally:
            metrics.queue_depth = worker.depth
        images = result.images
        flags: list[bool | None] = [None] * len(images)
        if body.enable_safety_checker and safety_checker is not None:
            images, flags = await asyncio.to_thread(safety_checker.check, images)
        entries = []
        for image in images:
            data = await asyncio.to_thread(encode_image, image, body.output_format)
            if body.sync_mode:
                url = f"data:{CONTENT_TYPES[body.output_format]};base64," + base64.b64encode(data).decode()
            else:
                name = f"{uuid.uuid4().hex}.{body.output_format}"
                (out_dir / name).write_bytes(data)
                if public_url:
                    url = f"{public_url.rstrip('/')}/files/{name}"
                else:  # url_for knows the mount path when this app is mounted inside another
                    url = str(request.url_for("files", name=name))
            entries.append({"url": url, "width": image.width, "height": image.height,
                            "content_type": CONTENT_TYPES[body.output_format]})  # fmt: skip
        metrics.images_served += len(entries)
        timings = {k: v for k, v in result.timings.items()}
        return {
            "images": entries,
            "timings": timings,
            "seed": result.seed,
            "has_nsfw_concepts": flags,
            "prompt": result.prompt,
            "data": [dict(e) for e in entries],
            "meta": {"usage": {"tokens_used": result.tokens_used}},
        }

    @app.get("/files/{name}", responses={404: {}})
    async def files(name: str):
        """An image stored by an earlier request. Only names this server wrote resolve."""
        if not _FILE_NAME.match(name):
            return _error(404, "no such file")
        path = (out_dir / name).resolve()
        if path.parent != out_dir or not path.is_file():
            return _error(404, "no such file")
        return FileResponse(path, media_type=CONTENT_TYPES[path.suffix[1:]])

    @app.get("/health")
    async def health():
        """``ok`` once the model is loaded, ``loading`` before."""
        ready = worker.pipeline is not None
        return JSONResponse({"status": "ok" if ready else "loading", "queue_depth": worker.depth},
                            status_code=200 if ready else 503)  # fmt: skip

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        """Prometheus text format: queue depth, latency histogram, images served, responses by status."""
        metrics.queue_depth = worker.depth
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        """The playground page."""
        return HTMLResponse(resources.files("srpo_infer.server").joinpath("playground.html").read_text())

    return app


def _count(metrics: Metrics, response, t0: float, generation: bool = False):
    metrics.observe(response.status_code, time.perf_counter() - t0, generation)
    return response


def _field_of(message: str) -> str | None:
    match = re.match(r"^(\w+) ", message)
    return match.group(1) if match else None


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return "out of memory" in str(exc).lower()
