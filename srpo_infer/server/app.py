"""The ``flux/srpo`` HTTP API as an ASGI app: ``POST /v1/images/generations``, file serving, health,
Prometheus metrics and a playground page.

``create_app(pipeline)`` returns the app so other servers can mount it; ``srpo-infer serve`` runs it
under uvicorn. Every error is JSON ``{"error": {"message", "field"?, "status"}}``: 400 malformed JSON,
401 missing/wrong key, 404 unknown model or file, 413 oversized body, 422 invalid, unknown or
duplicated field or a request over the cost cap, 429 queue full (``Retry-After`` estimates the queued
work), 503 while the model loads, after it failed to load, while draining, or after a GPU
out-of-memory. A client that hangs up has its job dropped (queued) or stopped at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..context_parallel import ContextParallelError
from ..pipeline import GenerationCancelled
from ..request import (
    ACCELERATIONS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    IMAGE_SIZE_PRESETS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_SIDE,
    MIN_STEPS,
    OUTPUT_FORMATS,
    REQUEST_FIELDS,
    SIDE_MULTIPLE,
    GenerationRequest,
    check_output_format,
    resolve_image_size,
    unknown_names_message,
    validate_request,
)
from ..result import CONTENT_TYPES, api_response, data_uri, encode_image
from .guard import Guard
from .metrics import Metrics
from .storage import DEFAULT_RETENTION_BYTES, DEFAULT_RETENTION_SECONDS, ImageStore
from .streaming import MAX_PARTIAL_IMAGES, stream_refusal, streamed_job
from .worker import QueueFull, ShuttingDown, Worker, job_cost

log = logging.getLogger(__name__)

MODEL_NAMES = ("flux/srpo",)
MAX_BODY_BYTES = 64 * 1024  # a 4000-character prompt is at most 16 KB of UTF-8
BROKEN_GROUP = (
    "this server's context-parallel group failed or is gone (a process was lost): it cannot generate until "
    "you restart the server"
)
MAX_UNKNOWN_NAMED = 10  # a 422 names at most this many unknown fields (nearest-name hints cost time each)
CLIENT_CLOSED = 499  # nginx's "client closed request": counted in /metrics, read by nobody
DISCONNECT_POLL_S = 0.25

# Strict types: the same as the library's (no bool as an integer, no numeric strings, no 2.0 steps).
Side = Annotated[int, Strict(), Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)]
Preset = Literal[tuple(IMAGE_SIZE_PRESETS)]  # type: ignore[valid-type]


_ERROR_SCHEMA = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "object"}}}}}
_FILE_RESPONSES = {
    200: {"description": "the stored image", "content": {"image/jpeg": {}, "image/png": {}}},
    404: {"description": "no such image (never written here, or expired)", "content": _ERROR_SCHEMA},
}
_HEALTH_RESPONSES = {
    200: {"description": "ok: generations can run"},
    500: {"description": "failed: the model failed to load, or the server can no longer generate"},
    503: {"description": "loading, draining, or degraded (cannot store images)"},
}


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: Side  # both required: half a size is a mistake, not a request for the default
    height: Side


# OpenAI image-API fields with no flux/srpo meaning. Their default value is accepted (an SDK may send
# it) and does nothing; any other value is refused with what to do instead.
OPENAI_ONLY = {
    "quality": ("auto", "use num_inference_steps for more or less detail"),
    "background": ("auto", "flux/srpo images are opaque"),
    "moderation": ("auto", "use enable_safety_checker"),
    "style": (None, "describe the style in the prompt"),
    "output_compression": (None, "output_format jpeg is written at quality 95"),
}


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Annotated[str, Strict(), Field(min_length=1, max_length=255)]  # a name in the server's --lora-dir
    scale: Annotated[float, Strict(), Field(ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)] = 1.0


class GenerationBody(BaseModel):
    """The request body: the hosted ``flux/srpo`` API, and OpenAI's images API on the same path
    (``n``, ``size``, ``response_format``, ``user``), so OpenAI's SDKs and the tools built on them work.

    Unknown fields are kept aside (``model_extra``) so the app can name them, with the nearest known
    field, in its 422; ``allow_unknown_fields=True`` ignores them instead. :meth:`to_request` turns a
    body into the library's :class:`~srpo_infer.request.GenerationRequest`, the one typed request a
    job carries to the pipeline.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})
    # Any string parses (an unknown model is a 404, not a 422); the schema lists the served ones.
    model: Annotated[str, Strict()] = Field("flux/srpo", json_schema_extra={"enum": list(MODEL_NAMES)})
    prompt: Annotated[str, Strict(), Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    image_size: ImageSize | Preset = "landscape_4_3"
    num_inference_steps: Annotated[int, Strict(), Field(ge=MIN_STEPS, le=MAX_STEPS)] = DEFAULT_STEPS
    guidance_scale: Annotated[float, Strict(), Field(ge=MIN_GUIDANCE, le=MAX_GUIDANCE)] = DEFAULT_GUIDANCE
    seed: Annotated[int, Strict(), Field(ge=0, lt=MAX_SEED)] | None = None
    num_images: Annotated[int, Strict(), Field(ge=1, le=MAX_IMAGES)] = 1
    sync_mode: Annotated[bool, Strict()] = False
    enable_safety_checker: Annotated[bool, Strict()] = True
    output_format: Literal[(*OUTPUT_FORMATS, "jpg")] = "jpeg"  # type: ignore[valid-type]  # jpg: as the library
    acceleration: Literal[ACCELERATIONS] | None = None  # type: ignore[valid-type]  # None: the server's default
    # OpenAI's names: n = num_images, size "WxH" or "auto" = image_size; b64_json returns the bytes inline.
    n: Annotated[int, Strict(), Field(ge=1, le=MAX_IMAGES)] | None = None
    size: Annotated[str, Strict(), Field(pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$")] | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: Annotated[str, Strict()] | None = None  # accepted for OpenAI clients; not stored
    quality: Annotated[str, Strict()] | None = None
    background: Annotated[str, Strict()] | None = None
    moderation: Annotated[str, Strict()] | None = None
    style: Annotated[str, Strict()] | None = None
    output_compression: Annotated[int, Strict()] | None = None
    # OpenAI's image streaming: server-sent events, partial_images previews then the completed image.
    stream: Annotated[bool, Strict()] = False
    partial_images: Annotated[int, Strict(), Field(ge=0, le=MAX_PARTIAL_IMAGES)] | None = None
    # LoRA adapters for this request, by name in the server's --lora-dir (GET /v1/loras lists them).
    loras: Annotated[list[LoraRef], Field(max_length=MAX_LORAS)] | None = None

    @field_validator("output_format")
    @classmethod
    def _jpeg(cls, value: str) -> str:
        return check_output_format(value)  # "jpg" is "jpeg" from here on, as in the library

    def to_request(self, default_acceleration: str = "none") -> GenerationRequest:
        """The validated library request (the library's rules and messages), OpenAI twins resolved."""
        for name, (accepted, instead) in OPENAI_ONLY.items():
            value = getattr(self, name)
            if value is not None and value != accepted:
                also = f" (only {accepted!r} is accepted)" if accepted else ""
                raise ApiError(
                    422, f"{name} is an OpenAI image-API option flux/srpo has no equivalent for{also}: {instead}", name
                )
        given = self.model_fields_set
        if "n" in given and "num_images" in given and self.n != self.num_images:
            raise ApiError(422, f"n ({self.n}) and num_images ({self.num_images}) disagree: send one of them", "n")
        size = resolve_image_size(self.size) if self.size is not None else None
        own = resolve_image_size(self._image_size())
        if size is not None and "image_size" in given and size != own:
            raise ApiError(
                422, f"size ({self.size}) and image_size ({own[0]}x{own[1]}) disagree: send one of them", "size"
            )
        request = {name: getattr(self, name) for name in REQUEST_FIELDS if name in type(self).model_fields}
        request["width"], request["height"] = size or own
        request["num_images"] = self.n if self.n is not None else self.num_images
        request["acceleration"] = self.acceleration or default_acceleration
        request["loras"] = [(lora.path, lora.scale) for lora in self.loras or []]
        return validate_request(**request)

    def _image_size(self) -> str | dict:
        return self.image_size if isinstance(self.image_size, str) else self.image_size.model_dump()


class ApiError(Exception):
    """An error response: raised anywhere in a request, answered as the JSON error body."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.field, self.headers)


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "status": status}
    if field:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class ServerState:
    """Where the app stands: loading → ready, or failed (the load failed, or a context-parallel peer
    was lost: with the reason); draining once stopping."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.failure: str | None = None  # why the model failed to load
        self.broken: str | None = None  # why a loaded model can no longer generate
        self.draining = False

    @property
    def reason(self) -> str | None:
        return self.failure or self.broken

    @property
    def status(self) -> str:
        if self.reason is not None:
            return "failed"
        if self.draining:
            return "draining"
        return "ok" if self.worker.pipeline is not None else "loading"

    def check_can_serve(self) -> None:
        """Raise the 503 that explains why no generation can run now."""
        status = self.status
        if status == "failed":
            raise ApiError(503, self.broken or f"the model failed to load: {self.failure}")
        if status == "draining":
            raise ApiError(503, "the server is shutting down; retry on another instance", headers={"Retry-After": "5"})
        if status == "loading":
            raise ApiError(503, "the model is still loading; retry shortly", headers={"Retry-After": "10"})


def create_app(
    pipeline=None,
    *,
    backend=None,
    api_key: str | None = None,
    output_dir: str | Path = "outputs",
    public_url: str | None = None,
    max_queue: int = 16,
    safety_checker=None,
    default_acceleration: str = "regular",
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = 30.0,
    allow_unknown_fields: bool = False,
    max_cost: float | None = None,
    retention_seconds: float | None = DEFAULT_RETENTION_SECONDS,
    retention_bytes: int | None = DEFAULT_RETENTION_BYTES,
    loras=None,
) -> FastAPI:
    """Build the ASGI app around a loaded :class:`~srpo_infer.SRPOPipeline`.

    ``backend`` replaces the in-process worker (see :mod:`srpo_infer.server.ray_serve`).
    ``pipeline=None`` starts in the *loading* state (503 for generations) until
    ``app.state.set_pipeline(p)`` is called; ``app.state.set_failed(reason)`` records a failed load
    (``/health`` 500, generations 503 with the reason); ``app.state.drain(timeout)`` stops taking
    requests and answers every queued one. ``safety_checker``: a :class:`SafetyChecker` or None;
    without one, ``has_nsfw_concepts`` is ``null`` per image (never ``false``). ``default_acceleration``
    follows the hosted API (``regular``). ``max_cost`` caps one request's megapixel-steps
    (width·height·steps·images / 10⁶; 1024², 28 steps = 29.4). Stored images expire after
    ``retention_seconds`` or, oldest first, beyond ``retention_bytes`` (None: keep); ``output_dir`` may be
    an fsspec URL (``s3://bucket/srpo``) that several servers share. Image URLs are
    ``public_url`` + ``/files/NAME``, or relative (``/files/NAME`` under the mount path): never built
    from the client's ``Host`` header. ``loras``: a :class:`~srpo_infer.server.loras.LoraLibrary` (``serve
    --lora-dir``), the only adapters a request's ``loras`` may name (None: requests with loras get a 422).

    >>> # from fastapi import FastAPI; outer = FastAPI(); outer.mount("/srpo", create_app(pipe))
    """
    # Over 80 lines because the routes are closures over this app's worker, store and state (so two
    # apps in one process never share them); each route is short and the work is in the helpers below.
    if default_acceleration not in ACCELERATIONS:
        raise ValueError(f"default_acceleration must be one of {list(ACCELERATIONS)}, got {default_acceleration!r}")
    if max_cost is not None and not max_cost > 0:
        raise ValueError(f"max_cost must be > 0 megapixel-steps (or None), got {max_cost}")
    store = ImageStore(output_dir, max_age=retention_seconds, max_bytes=retention_bytes)
    # The backend runs the jobs: our GPU worker thread, or another engine's (Ray Serve's RayBackend).
    worker = backend if backend is not None else Worker(max_queue)
    metrics = Metrics()
    state = ServerState(worker)
    app = FastAPI(
        title="srpo_infer", version="1", description="The flux/srpo image generation API, served by srpo_infer."
    )
    # Starlette's trailing-slash redirect builds its Location from the client's Host header: a 404 instead.
    app.router.redirect_slashes = False

    def set_pipeline(p) -> None:
        worker.pipeline = p

    def set_failed(reason: str) -> None:
        state.failure = reason

    def drain(timeout: float = 60.0) -> int:
        state.draining = True
        return worker.stop(timeout)

    app.state.set_pipeline, app.state.set_failed, app.state.drain = set_pipeline, set_failed, drain
    app.state.worker, app.state.metrics, app.state.store, app.state.server = worker, metrics, store, state
    if backend is None:
        set_pipeline(pipeline)
    app.add_middleware(
        Guard, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout
    )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors(), exc.body)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})  # a 405 keeps its Allow header; GET routes answer HEAD too (Guard)
        if "GET" in headers.get("Allow", "").split(", "):
            headers["Allow"] += ", HEAD"
        return _error(exc.status_code, str(exc.detail), headers=headers or None)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.post("/v1/images/generations", responses={400: {}, 401: {}, 404: {}, 413: {}, 422: {}, 429: {}, 503: {}})
    async def generations(body: GenerationBody, request: Request):
        """Generate images: the hosted ``flux/srpo`` request and response."""
        if body.model not in MODEL_NAMES:
            raise ApiError(404, f"model {body.model!r} not found; this server serves {list(MODEL_NAMES)}", "model")
        req = _check_body(await request.body(), body, allow_unknown_fields, max_cost, default_acceleration)
        req = _with_loras(req, loras)
        refusal = stream_refusal(body, getattr(worker, "streams", False), safety_checker is not None)
        if refusal is not None:
            raise ApiError(422, *refusal)
        state.check_can_serve()
        previews = streamed_job(body) if body.stream else None
        try:
            cost = job_cost(req.width, req.height, req.num_inference_steps, req.num_images)
            job = worker.submit(req, cost, **previews.submit) if previews else worker.submit(req, cost=cost)
        except QueueFull:
            wait = max(1, math.ceil(worker.expected_wait()))
            raise ApiError(
                429,
                f"the queue is full (about {wait} s of work ahead); retry later",
                headers={"Retry-After": str(wait)},
            ) from None
        except ShuttingDown:
            state.check_can_serve()
            raise
        metrics.queue_depth = worker.depth
        if previews is not None:
            return previews.response(job, lambda future: _outcome(future, state), lambda r: finish(r, body))
        try:
            result = await _wait_for(job, request, state)
        finally:
            metrics.queue_depth = worker.depth
        images, flags = await finish(result, body)
        base = public_url.rstrip("/") if public_url else request.scope.get("root_path", "")
        entries = await _image_entries(images, body, store, base)
        metrics.images_served += len(entries)
        return api_response(result, entries, flags)

    async def finish(result, body: GenerationBody | None = None) -> tuple[list, list]:
        """The images with the safety checker's verdicts (None each: not checked)."""
        images, flags = result.images, [None] * len(result.images)
        if body is not None and body.enable_safety_checker and safety_checker is not None:
            images, flags = await asyncio.to_thread(safety_checker.check, images)
        metrics.queue_depth = worker.depth
        return images, flags

    @app.get("/v1/loras")
    async def list_loras():
        """The LoRA adapters requests may name (``serve --lora-dir``), with rank and target model."""
        if loras is None:
            return {"object": "list", "data": [], "max_loras": 0}
        return loras.listing()

    @app.get("/files/{name}", response_class=Response, responses=_FILE_RESPONSES)
    async def files(name: str):
        """An image stored by an earlier request. Only names this server wrote resolve."""
        data = await asyncio.to_thread(store.read, name)
        if data is None:
            return _error(404, "no such file")
        return Response(data, media_type=CONTENT_TYPES[name.rsplit(".", 1)[1]])

    @app.get("/health", responses=_HEALTH_RESPONSES)
    async def health():
        """``ok`` (200) when generations can run; ``loading``, ``draining`` or ``degraded`` (503) when
        they cannot yet, or cannot store images; ``failed`` (500, with the reason) after a failed load."""
        return await _health(state, store)

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


async def _health(state: ServerState, store: ImageStore) -> JSONResponse:
    status, body = state.status, {"queue_depth": state.worker.depth}
    if status == "failed":
        return JSONResponse({"status": status, "reason": state.reason, **body}, status_code=500)
    problem = await asyncio.to_thread(store.problem)
    if status == "ok" and problem:
        return JSONResponse({"status": "degraded", "problems": [problem], **body}, status_code=503)
    return JSONResponse({"status": status, **body}, status_code=200 if status == "ok" else 503)


def _validation_error(errors: list[dict], body: object = None) -> JSONResponse:
    """pydantic's errors → our JSON error. A field the library's rules also refuse gets the library's
    message (the CLI and ``generate()`` say the same for the same mistake); pydantic's wording is the
    fallback for what only the schema knows (the first error that explains the input)."""
    errors = errors or [{}]
    if errors[0].get("type") == "json_invalid":
        return _error(400, f"malformed JSON body: {errors[0].get('ctx', {}).get('error', 'cannot parse')}")
    if tuple(errors[0].get("loc", ())) == ("body",):
        return _error(400, "the body must be a JSON object with at least a prompt")
    message = _library_message(body)
    if message is not None:
        field = _field_of(message)
        if field in ("width", "height") and isinstance(body.get("image_size"), dict):
            field = f"image_size.{field}"  # where it is in the JSON body
        return _error(422, message, field)
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


def _library_message(body: object) -> str | None:
    """What :func:`~srpo_infer.request.validate_request` says of this body, if it refuses it."""
    if not isinstance(body, dict):
        return None
    request = {name: body[name] for name in REQUEST_FIELDS if name in body and name in GenerationBody.model_fields}
    request["prompt"] = body.get("prompt")
    request["num_images"] = body.get("n", body.get("num_images", 1))
    request["acceleration"] = body.get("acceleration") or "none"
    try:
        validate_request(**request, image_size=body.get("size") or body.get("image_size", "landscape_4_3"))
        check_output_format(body.get("output_format", "jpeg"))
    except ValueError as exc:
        message = str(exc)
        if "n" in body and message.startswith("num_images "):  # the name the client sent
            message = "n" + message[len("num_images") :]
        return message
    return None


def _check_body(
    raw: bytes, body: GenerationBody, allow_unknown_fields: bool, max_cost: float | None, default_acceleration: str
) -> GenerationRequest:
    """What the schema cannot say (duplicate keys, unknown fields, a blank prompt, OpenAI twins that
    disagree, the cost cap); returns the validated request."""

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ApiError(422, f"duplicate key {key!r} in the JSON body: send each field once", key)
            seen.add(key)
        return dict(pairs)

    json.loads(raw, object_pairs_hook=refuse_duplicates)
    unknown = sorted(body.model_extra or {})
    if unknown and not allow_unknown_fields:
        named = [name[:64] for name in unknown[:MAX_UNKNOWN_NAMED]]
        more = f" (and {len(unknown) - len(named)} more)" if len(unknown) > len(named) else ""
        raise ApiError(422, unknown_names_message(named, GenerationBody.model_fields) + more, named[0])
    try:
        req = body.to_request(default_acceleration)
    except ValueError as exc:  # the library's rules, in its words
        raise ApiError(422, str(exc), _field_of(str(exc))) from None
    cost = job_cost(req.width, req.height, req.num_inference_steps, req.num_images)
    if max_cost is not None and cost > max_cost:
        raise ApiError(
            422,
            f"this request costs {cost:.1f} megapixel-steps (width × height × steps × "
            f"images / 10⁶); this server allows at most {max_cost:g}: ask for fewer steps, fewer or "
            "smaller images",
            "num_inference_steps",
        )
    return req


def _with_loras(req: GenerationRequest, library) -> GenerationRequest:
    """The request with its adapters' names resolved in the server's LoRA folder (422s name the rule)."""
    if not req.loras:
        return req
    if library is None:
        raise ApiError(422, "loras: this server serves no LoRA adapters (start it with serve --lora-dir DIR)", "loras")
    try:
        return library.resolve_request(req)
    except ValueError as exc:
        raise ApiError(422, str(exc), "loras") from None


async def _image_entries(images: list, body: GenerationBody, store: ImageStore, base_url: str) -> list[dict]:
    """Encode each image; return it inline (OpenAI's ``b64_json``), as a data URI (``sync_mode``) or
    stored and linked as ``base_url/files/NAME``."""
    entries = []
    for image in images:
        data = await asyncio.to_thread(encode_image, image, body.output_format)
        if body.response_format == "b64_json":
            entries.append(
                {
                    "b64_json": base64.b64encode(data).decode("ascii"),
                    "width": image.width,
                    "height": image.height,
                    "content_type": CONTENT_TYPES[body.output_format],
                }
            )
            continue
        if body.sync_mode:
            url = data_uri(data, body.output_format)
        else:
            try:
                name = await asyncio.to_thread(store.save, data, body.output_format)
            except OSError as exc:
                log.error("cannot store an image: %s", exc)
                raise ApiError(
                    503,
                    "the server cannot store images right now; retry with sync_mode: true to get data URIs",
                    headers={"Retry-After": "30"},
                ) from None
            url = f"{base_url}/files/{name}"
        entries.append(
            {
                "url": url,
                "width": image.width,
                "height": image.height,
                "content_type": CONTENT_TYPES[body.output_format],
            }
        )
    return entries


async def _wait_for(job, request: Request, state: ServerState):
    """The job's result; a client that hangs up cancels its job (dropped if queued, stopped at the next
    step if running), and a job's failure becomes its HTTP error."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                _abandon(job, future)
                log.info("client hung up; its job was cancelled")
                raise ApiError(CLIENT_CLOSED, "client closed the request; its job was cancelled")
    except asyncio.CancelledError:  # servers that cancel the handler on a hang-up (Ray Serve's proxy)
        _abandon(job, future)
        log.info("request cancelled by the server; its job was cancelled")
        raise
    return _outcome(future, state)


def _outcome(future: asyncio.Future, state: ServerState):
    """A finished job's result, or its failure as the HTTP error it becomes."""
    try:
        return future.result()
    except asyncio.CancelledError:
        raise ApiError(CLIENT_CLOSED, "client closed the request; its job was cancelled") from None
    except ValueError as exc:  # request rules the schema cannot express
        raise ApiError(422, str(exc), _field_of(str(exc))) from None
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
        if _is_oom(exc):
            log.warning("out of GPU memory on one request: %s", exc)
            raise ApiError(
                503,
                "the GPU ran out of memory on this request; try fewer or smaller images",
                headers={"Retry-After": "5"},
            ) from None
        raise


def _abandon(job, future: asyncio.Future) -> None:
    """Cancel a job nobody waits for any more. A running job still ends (cancelled, or with an error)
    later; its outcome is read here so asyncio never logs "exception was never retrieved"."""
    job.cancel()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


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
