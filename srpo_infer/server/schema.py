"""The HTTP body of ``POST /v1/images/generations``: the hosted ``flux/srpo`` request, plus OpenAI's
images API on the same path.

Pydantic checks types only (strictly: no bool as an integer, no numeric strings, no 2.0 steps); the
ranges are the library's, checked once when :meth:`GenerationBody.to_request` builds the
:class:`~srpo_infer.request.GenerationRequest`, so a range error reads as in the library and the CLI.
The JSON schema still states every range, for clients and for schema-driven tests.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

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
    MIN_IMAGES,
    MIN_SIDE,
    MIN_STEPS,
    OUTPUT_FORMATS,
    GenerationRequest,
    check_output_format,
    resolve_image_size,
)
from .errors import ApiError, unencodable, validation_refusal
from .streaming import MAX_PARTIAL_IMAGES

MODEL_NAMES = ("flux/srpo",)


def _documented(kind: type, **schema) -> object:
    """A strict ``kind`` whose range the JSON schema states and the library checks."""
    return Annotated[kind, Strict(), Field(json_schema_extra=schema)]


Side = _documented(int, minimum=MIN_SIDE, maximum=MAX_SIDE, multipleOf=32)
Steps = _documented(int, minimum=MIN_STEPS, maximum=MAX_STEPS)
Images = _documented(int, minimum=MIN_IMAGES, maximum=MAX_IMAGES)
Preset = Literal[tuple(IMAGE_SIZE_PRESETS)]  # type: ignore[valid-type]


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: Side  # both required: half a size is a mistake, not a request for the default
    height: Side


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Annotated[str, Strict(), Field(min_length=1, max_length=255)]  # a name in the server's --lora-dir
    scale: _documented(float, minimum=-MAX_LORA_SCALE, maximum=MAX_LORA_SCALE) = 1.0


# OpenAI image-API fields with no flux/srpo meaning. Their default value is accepted (an SDK may send
# it) and does nothing; any other value is refused with what to do instead.
OPENAI_ONLY = {
    "quality": ("auto", "use num_inference_steps for more or less detail"),
    "background": ("auto", "flux/srpo images are opaque"),
    "moderation": ("auto", "use enable_safety_checker"),
    "style": (None, "describe the style in the prompt"),
    "output_compression": (None, "output_format jpeg is written at quality 95"),
}


class GenerationBody(BaseModel):
    """The request body: the hosted ``flux/srpo`` API, and OpenAI's images API on the same path
    (``n``, ``size``, ``response_format``, ``user``), so OpenAI's SDKs and the tools built on them work.

    Unknown fields are kept aside (``model_extra``) so the app can name them, with the nearest known
    field, in its 422. :meth:`to_request` turns a body into the library's
    :class:`~srpo_infer.request.GenerationRequest`, the one typed request a job carries to the pipeline.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})
    # Any string parses (an unknown model is a 404, not a 422); the schema lists the served ones.
    model: Annotated[str, Strict()] = Field("flux/srpo", json_schema_extra={"enum": list(MODEL_NAMES)})
    prompt: _documented(str, minLength=1, maxLength=MAX_PROMPT_CHARS)
    image_size: ImageSize | Preset = "landscape_4_3"
    num_inference_steps: Steps = DEFAULT_STEPS
    guidance_scale: _documented(float, minimum=MIN_GUIDANCE, maximum=MAX_GUIDANCE) = DEFAULT_GUIDANCE
    seed: _documented(int, minimum=0, exclusiveMaximum=MAX_SEED) | None = None
    num_images: Images = 1
    sync_mode: Annotated[bool, Strict()] = False
    enable_safety_checker: Annotated[bool, Strict()] = True
    output_format: Literal[(*OUTPUT_FORMATS, "jpg")] = "jpeg"  # type: ignore[valid-type]  # jpg: as the library
    acceleration: Literal[ACCELERATIONS] | None = None  # type: ignore[valid-type]  # None: the server's default
    # OpenAI's names: n = num_images, size "WxH" or "auto" = image_size; b64_json returns the bytes inline.
    n: Images | None = None
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
    loras: Annotated[list[LoraRef], Field(json_schema_extra={"maxItems": MAX_LORAS})] | None = None

    @field_validator("output_format")
    @classmethod
    def _jpeg(cls, value: str) -> str:
        return check_output_format(value)  # "jpg" is "jpeg" from here on, as in the library

    def to_request(self, default_acceleration: str = "none") -> GenerationRequest:
        """The library's request, built once (its rules, its messages), OpenAI's twins resolved.

        Raises :class:`~srpo_infer.server.errors.ApiError` (422) naming the field as the client sent it.
        """
        self._refuse_openai_only()
        try:
            width, height = self._size()
            return GenerationRequest(
                self.prompt,
                width=width,
                height=height,
                seed=self.seed,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                num_images=self.n if self.n is not None else self.num_images,
                acceleration=self.acceleration or default_acceleration,
                loras=tuple((lora.path, lora.scale) for lora in self.loras or ()),
            )
        except ValueError as exc:
            raise ApiError.from_library(str(exc), sent_n=self.n is not None, size_in=self._size_in()) from None

    def _refuse_openai_only(self) -> None:
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

    def _size(self) -> tuple[int, int]:
        """``size`` or ``image_size`` as (width, height); both sent must agree."""
        own = self.image_size if isinstance(self.image_size, str) else self.image_size.model_dump()
        own = resolve_image_size(own)
        if self.size is None:
            return own
        size = resolve_image_size(self.size)
        if "image_size" in self.model_fields_set and size != own:
            raise ApiError(
                422, f"size ({self.size}) and image_size ({own[0]}x{own[1]}) disagree: send one of them", "size"
            )
        return size

    def _size_in(self) -> str | None:
        """Where the client put the sides: ``size``, an ``image_size`` object, or nowhere (a preset)."""
        if self.size is not None:
            return "size"
        return "image_size" if isinstance(self.image_size, ImageSize) else None


def parse_body(raw: bytes, content_type: str | None = None) -> GenerationBody:
    """The generations body, parsed once: the JSON text into Python (a key sent twice refused: which
    one a parser keeps is not the client's choice to guess; text that cannot be encoded refused), then
    that object checked against :class:`GenerationBody`'s types. ``content_type``: the request's header;
    none (curl -d without -H) is taken as JSON, another type refused. Raises :class:`ApiError` (400, 415,
    422)."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), got Content-Type {media!r}")
    try:
        data = json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
        refused = unencodable(data)  # before any message quotes the text that cannot be sent
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"malformed JSON body: {getattr(exc, 'msg', exc)}") from None
    except RecursionError:  # arrays or objects nested thousands deep: no request field is
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    if refused is not None:
        raise refused
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object with at least a prompt")
    try:
        return GenerationBody.model_validate(data)
    except ValidationError as exc:
        raise validation_refusal(exc.errors(), data, GenerationBody.model_fields) from None


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ApiError(422, f"duplicate key {key!r} in the JSON body: send each field once", key)
        seen.add(key)
    return dict(pairs)
