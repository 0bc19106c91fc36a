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
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..names import unknown_names_message
from ..request import GenerationRequest, check_acceleration
from ..result import CONTENT_TYPES, api_response, data_uri, encode_images
from .backend import QueueFull, ShuttingDown
from .errors import ApiError, error_response, unencodable, validation_error
from .guard import Guard
from .metrics import Metrics
from .outcome import outcome, wait_for
from .schema import MODEL_NAMES, GenerationBody, parse_body
from .storage import DEFAULT_RETENTION_BYTES, DEFAULT_RETENTION_SECONDS, ImageStore
from .streaming import stream_refusal, streamed_job
from .worker import Worker

if TYPE_CHECKING:
    from .backend import Backend
    from .loras import LoraLibrary
    from .safety import SafetyChecker

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a 4000-character prompt is at most 16 KB of UTF-8
MAX_UNKNOWN_NAMED = 10  # a 422 names at most this many unknown fields (nearest-name hints cost time each)

_ERROR_SCHEMA = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "object"}}}}}
_GENERATION_RESPONSES = {status: {} for status in (400, 401, 404, 413, 422, 429, 503)}
_FILE_RESPONSES = {
    200: {"description": "the stored image", "content": {"image/jpeg": {}, "image/png": {}}},
    404: {"description": "no such image (never written here, or expired)", "content": _ERROR_SCHEMA},
}
_HEALTH_RESPONSES = {
    200: {"description": "ok: generations can run"},
    500: {"description": "failed: the model failed to load, or the server can no longer generate"},
    503: {"description": "loading, draining, or degraded (cannot store images)"},
}


class ServerState:
    """Where the app stands: loading → ready, or failed (the load failed, or a context-parallel peer
    was lost: with the reason); draining once stopping."""

    def __init__(self, worker: Backend):
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
        return "ok" if self.worker.ready else "loading"

    def check_can_serve(self) -> None:
        """Raise the 503 that explains why no generation can run now."""
        status = self.status
        if status == "failed":
            raise ApiError(503, self.broken or f"the model failed to load: {self.failure}")
        if status == "draining":
            raise ApiError(503, "the server is shutting down; retry on another instance", headers={"Retry-After": "5"})
        if status == "loading":
            raise ApiError(503, "the model is still loading; retry shortly", headers={"Retry-After": "10"})


@dataclass
class Served:
    """One app's parts and policy, shared by its routes (two apps in one process share nothing)."""

    worker: Backend  # our GPU worker thread, or another engine's (ray_serve.RayBackend)
    store: ImageStore
    metrics: Metrics
    state: ServerState
    default_acceleration: str
    allow_unknown_fields: bool
    max_cost: float | None
    public_url: str | None
    safety_checker: SafetyChecker | None
    loras: LoraLibrary | None  # None: requests may name no adapters

    def admit(self, body: GenerationBody) -> GenerationRequest:
        """The request this body asks for, or the 4xx/503 that says why it cannot run here."""
        if body.model not in MODEL_NAMES:
            raise ApiError(404, f"model {body.model!r} not found; this server serves {list(MODEL_NAMES)}", "model")
        self._refuse_unknown_fields(body)
        req = self._with_loras(body.to_request(self.default_acceleration))
        self._refuse_over_cost(req)
        refusal = stream_refusal(body, self.worker.capabilities.streams, self.safety_checker is not None)
        if refusal is not None:
            raise ApiError(422, *refusal)
        self.state.check_can_serve()
        return req

    def submit(self, req: GenerationRequest, **previews):
        """Queue the job; a full queue is a 429 with the expected wait."""
        try:
            job = self.worker.submit(req, **previews)
        except QueueFull:
            wait = max(1, math.ceil(self.worker.expected_wait()))
            raise ApiError(
                429,
                f"the queue is full (about {wait} s of work ahead); retry later",
                headers={"Retry-After": str(wait)},
            ) from None
        except ShuttingDown:
            self.state.check_can_serve()
            raise
        self.metrics.queue_depth = self.worker.depth
        return job

    async def finish(self, result, body: GenerationBody | None = None) -> tuple[list, list]:
        """The images with the safety checker's verdicts (None each: not checked)."""
        images, flags = result.images, [None] * len(result.images)
        if body is not None and body.enable_safety_checker and self.safety_checker is not None:
            images, flags = await asyncio.to_thread(self.safety_checker.check, images)
        self.metrics.queue_depth = self.worker.depth
        return images, flags

    async def respond(self, result, body: GenerationBody, request: Request) -> dict:
        """The flux/srpo response: images inline, as data URIs or stored behind absolute links."""
        images, flags = await self.finish(result, body)
        base = self.public_url.rstrip("/") if self.public_url else request.scope.get("root_path", "")
        entries = await _image_entries(images, body, self.store, base)
        self.metrics.images_served += len(entries)
        return api_response(result, entries, flags)

    def _refuse_unknown_fields(self, body: GenerationBody) -> None:
        unknown = sorted(body.model_extra or {})
        if unknown and not self.allow_unknown_fields:
            named = [name[:64] for name in unknown[:MAX_UNKNOWN_NAMED]]
            more = f" (and {len(unknown) - len(named)} more)" if len(unknown) > len(named) else ""
            raise ApiError(422, unknown_names_message(named, GenerationBody.model_fields) + more, named[0])

    def _refuse_over_cost(self, req: GenerationRequest) -> None:
        if self.max_cost is not None and req.cost > self.max_cost:
            raise ApiError(
                422,
                f"this request costs {req.cost:.1f} megapixel-steps (width × height × steps × "
                f"images / 10⁶); this server allows at most {self.max_cost:g}: ask for fewer steps, fewer or "
                "smaller images",
                "num_inference_steps",
            )

    def _with_loras(self, req: GenerationRequest) -> GenerationRequest:
        """The request with its adapters' names resolved in the server's LoRA folder (422s name the rule)."""
        if not req.loras:
            return req
        if self.loras is None:
            raise ApiError(
                422, "loras: this server serves no LoRA adapters (start it with serve --lora-dir DIR)", "loras"
            )
        try:
            return self.loras.resolve_request(req)
        except ValueError as exc:
            raise ApiError(422, str(exc), "loras") from None


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
    docs: bool = False,
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
    ``docs``: the Swagger UI page at ``/docs`` (off by default: it loads its script from a public CDN, so
    offline it would be a blank page; ``/openapi.json`` is always served).

    Mounted in another server, the app still bounds bodies (size, time), checks the key, matches routes
    exactly and answers JSON errors; what happens below the app is that server's: header size, the send
    timeout, the connection cap and requests its HTTP parser cannot read (``srpo-infer serve`` bounds
    them with :mod:`.limits`).

    >>> # from fastapi import FastAPI; outer = FastAPI(); outer.mount("/srpo", create_app(pipe))
    """
    check_acceleration(default_acceleration, "default_acceleration")
    if max_cost is not None and not max_cost > 0:
        raise ValueError(f"max_cost must be > 0 megapixel-steps (or None), got {max_cost}")
    # The backend runs the jobs: our GPU worker thread, or another engine's (Ray Serve's RayBackend).
    worker: Backend = backend if backend is not None else Worker(max_queue)
    if loras is not None and not worker.capabilities.adapters:
        raise ValueError(f"{type(worker).__name__} takes no per-request LoRAs: serve --lora-dir without it")
    store = ImageStore(output_dir, max_age=retention_seconds, max_bytes=retention_bytes)
    served = Served(
        worker,
        store,
        Metrics(),
        ServerState(worker),
        default_acceleration,
        allow_unknown_fields,
        max_cost,
        public_url,
        safety_checker,
        loras,
    )
    app = FastAPI(
        title="srpo_infer",
        version="1",
        description="The flux/srpo image generation API, served by srpo_infer.",
        docs_url="/docs" if docs else None,
        redoc_url=None,  # its script comes from a CDN too; /docs is the one page, when turned on
    )
    # Starlette's trailing-slash redirect builds its Location from the client's Host header: a 404 instead.
    app.router.redirect_slashes = False
    _expose(app, served)
    if pipeline is not None:
        worker.attach(pipeline)
    app.add_middleware(
        Guard, metrics=served.metrics, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout
    )
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_api_route(
        "/v1/images/generations",
        generations,
        methods=["POST"],
        responses=_GENERATION_RESPONSES,
        openapi_extra={"requestBody": _BODY_SCHEMA},
    )
    _document_body(app)
    app.add_api_route("/v1/loras", list_loras, methods=["GET"])
    app.add_api_route("/files/{name}", files, methods=["GET"], response_class=Response, responses=_FILE_RESPONSES)
    app.add_api_route("/health", health, methods=["GET"], responses=_HEALTH_RESPONSES)
    app.add_api_route("/metrics", prometheus, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route("/", playground, methods=["GET"], response_class=HTMLResponse)
    if not docs:
        app.add_api_route("/docs", docs_off, methods=["GET"], include_in_schema=False)
    return app


def _expose(app: FastAPI, served: Served) -> None:
    """What ``serve``, Ray and the tests drive: the pipeline's arrival, a failed load, the drain."""

    def set_pipeline(p) -> None:
        served.worker.attach(p)

    def set_failed(reason: str) -> None:
        served.state.failure = reason

    def drain(timeout: float = 60.0) -> int:
        served.state.draining = True
        return served.worker.stop(timeout)

    app.state.set_pipeline, app.state.set_failed, app.state.drain = set_pipeline, set_failed, drain
    app.state.worker, app.state.metrics, app.state.store = served.worker, served.metrics, served.store
    app.state.server, app.state.served = served.state, served


# The route parses its body itself (once: schema.parse_body), so FastAPI does not see the model; the
# OpenAPI document still names it as the body, with its schema among the components.
_BODY_SCHEMA = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerationBody"}}},
}


def _document_body(app: FastAPI) -> None:
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            body = GenerationBody.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update({**body.pop("$defs", {}), "GenerationBody": body})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _served(request: Request) -> Served:
    return request.app.state.served


async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    refused = unencodable(exc.body)  # before any message quotes the text that cannot be sent
    if refused is not None:
        return refused.response()
    return validation_error(exc.errors(), exc.body, GenerationBody.model_fields)


async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})  # a 405 keeps its Allow header; GET routes answer HEAD too (Guard)
    if "Allow" in headers:
        allowed = [m.strip() for m in headers["Allow"].split(",") if m.strip()]
        allowed += ["HEAD"] if "GET" in allowed else []
        headers["Allow"] = ", ".join(dict.fromkeys(allowed))  # each once: some routes list HEAD already
    return error_response(exc.status_code, str(exc.detail), headers=headers or None)


async def _on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def generations(request: Request):
    """Generate images: the hosted ``flux/srpo`` request and response."""
    served = _served(request)
    raw = await request.body()
    body = parse_body(raw, request.headers.get("content-type"))  # the one parse (its schema: GenerationBody)
    req = served.admit(body)
    if body.stream:
        previews = streamed_job(body)
        job = served.submit(req, **previews.submit)
        return previews.response(job, lambda future: outcome(future, served.state), lambda r: served.finish(r, body))
    job = served.submit(req)
    try:
        result = await wait_for(job, request, served.state)
    finally:
        served.metrics.queue_depth = served.worker.depth
    return await served.respond(result, body, request)


async def list_loras(request: Request):
    """The LoRA adapters requests may name (``serve --lora-dir``), with rank and target model."""
    library = _served(request).loras
    if library is None:
        return {"object": "list", "data": [], "max_loras": 0}
    return library.listing()


async def files(name: str, request: Request):
    """An image stored by an earlier request. Only names this server wrote resolve."""
    data = await asyncio.to_thread(_served(request).store.read, name)
    if data is None:
        return error_response(404, "no such file")
    return Response(data, media_type=CONTENT_TYPES[name.rsplit(".", 1)[1]])


async def health(request: Request):
    """``ok`` (200) when generations can run; ``loading``, ``draining`` or ``degraded`` (503) when
    they cannot yet, or cannot store images; ``failed`` (500, with the reason) after a failed load."""
    served = _served(request)
    state = served.state
    status, body = state.status, {"queue_depth": state.worker.depth}
    if status == "failed":
        return JSONResponse({"status": status, "reason": state.reason, **body}, status_code=500)
    problem = await asyncio.to_thread(served.store.problem)
    if status == "ok" and problem:
        return JSONResponse({"status": "degraded", "problems": [problem], **body}, status_code=503)
    return JSONResponse({"status": status, **body}, status_code=200 if status == "ok" else 503)


async def prometheus(request: Request):
    """Prometheus text format: queue depth, latency histogram, images served, responses by status."""
    served = _served(request)
    served.metrics.queue_depth = served.worker.depth
    return PlainTextResponse(served.metrics.render(), media_type="text/plain; version=0.0.4")


async def docs_off():
    return error_response(
        404,
        "the API docs page is off (it loads Swagger UI from a CDN): start serve with --docs to turn it on; "
        "the schema is at /openapi.json",
    )


async def playground():
    """The playground page."""
    return HTMLResponse(resources.files("srpo_infer.server").joinpath("playground.html").read_text())


async def _image_entries(images: list, body: GenerationBody, store: ImageStore, base_url: str) -> list[dict]:
    """Encode each image; return it inline (OpenAI's ``b64_json``), as a data URI (``sync_mode``) or
    stored and linked as ``base_url/files/NAME``."""
    entries = []
    encoded = await asyncio.to_thread(encode_images, images, body.output_format)
    for image, data in zip(images, encoded, strict=True):
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
