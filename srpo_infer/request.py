"""Request rules of the ``flux/srpo`` API: sizes, presets, ranges and defaults.

Every violation raises :class:`ValueError` naming the field, the value and the allowed range, so a
library caller, the CLI and the HTTP server all report the same message.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields

from .names import suggest_keywords, unknown_names_message

# Presets of the hosted API (width, height).
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

DEFAULT_WIDTH, DEFAULT_HEIGHT = IMAGE_SIZE_PRESETS["landscape_4_3"]
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 512, 1536, 32
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 1, 50, 28
MIN_GUIDANCE, MAX_GUIDANCE, DEFAULT_GUIDANCE = 1.0, 20.0, 4.5
MIN_IMAGES, MAX_IMAGES, DEFAULT_IMAGES = 1, 4, 1
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63  # exclusive; seed + num_images - 1 still fits a torch.Generator (< 2**64)
MAX_SEQUENCE_LENGTH = 512  # T5 tokens, as in the official SRPO settings
ACCELERATIONS = ("none", "regular", "high")  # step caching levels, see srpo_infer.step_cache
OUTPUT_FORMATS = ("jpeg", "png")
MAX_LORAS, MAX_LORA_SCALE = 3, 4.0  # per request: adapters, and |scale|


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(field: str, lo: int, hi: int, value: object) -> int:
    if not _is_int(value):
        raise ValueError(f"{field} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{field} must be in [{lo}, {hi}], got {value}")
    return value


def check_side(field: str, value: object) -> int:
    """The one rule for an image side (``field``: ``width`` or ``height``)."""
    if not _is_int(value) or not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_MULTIPLE:
        raise ValueError(
            f"{field} must be an integer in [{MIN_SIDE}, {MAX_SIDE}] and a multiple of {SIDE_MULTIPLE}, got {value!r}"
        )
    return value


def _check_width(value: object) -> int:
    return check_side("width", value)


def _check_height(value: object) -> int:
    return check_side("height", value)


def resolve_image_size(
    image_size: str | dict | None = None, width: object = None, height: object = None
) -> tuple[int, int]:
    """Turn a preset name, an ``{"width", "height"}`` object or explicit sides into ``(width, height)``.
    The sides' rule is not run here: the request they go into runs it, once (:func:`check_size` for a
    size without a request).

    >>> resolve_image_size("square_hd")
    (1024, 1024)
    >>> resolve_image_size(width=1440, height=512)
    (1440, 512)
    """
    if image_size is not None:
        if width is not None or height is not None:
            raise ValueError("give either image_size or width/height, not both")
        if isinstance(image_size, str):
            sides = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", image_size)  # ASCII digits: no "５１２", no 5000 digits
            if sides:  # OpenAI's "1024x768"
                return int(sides[1]), int(sides[2])
            if image_size == "auto":  # OpenAI's "the default size"
                return DEFAULT_WIDTH, DEFAULT_HEIGHT
            if image_size not in IMAGE_SIZE_PRESETS:
                raise ValueError(
                    f"image_size must be one of {sorted(IMAGE_SIZE_PRESETS)}, 'WIDTHxHEIGHT' (such as 1024x768), "
                    f"'auto' or an object with width and height, got {_short(image_size)}"
                )
            return IMAGE_SIZE_PRESETS[image_size]
        if isinstance(image_size, dict):
            unknown = set(image_size) - {"width", "height"}
            if unknown:
                raise ValueError(f"image_size has unknown fields {sorted(unknown)}; allowed: width, height")
            if set(image_size) != {"width", "height"}:  # half a size is a mistake, not a request for a default
                raise ValueError(f"image_size needs both width and height, got {image_size!r}")
            width, height = image_size["width"], image_size["height"]
        else:
            raise ValueError(f"image_size must be a preset name or an object, got {image_size!r}")
    # A preset name is accepted in the width slot too, so `generate(p, width="square_hd")` works.
    if isinstance(width, str) and height is None:
        return resolve_image_size(width)
    width = DEFAULT_WIDTH if width is None else width
    height = DEFAULT_HEIGHT if height is None else height
    return width, height


def check_size(width: object, height: object) -> tuple[int, int]:
    """The sides' rule for a size that goes into no request yet (warm-up sizes).

    >>> check_size(1440, 512)
    (1440, 512)
    """
    return check_side("width", width), check_side("height", height)


def _short(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to about ``limit`` characters: an error never echoes a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _visible(text: str) -> bool:
    """Whether ``text`` has a character that shows: not whitespace, not a format character (U+FEFF,
    zero-width spaces and joiners) and not a control character.

    >>> _visible("\ufeff \u200b"), _visible("a cat")
    (False, True)
    """
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc") for ch in text)


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string of 1 to {MAX_PROMPT_CHARS} characters, got {prompt!r}")
    if not _visible(prompt):  # spaces, a byte-order mark, zero-width or control characters only
        raise ValueError(f"prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters, got {prompt!r}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)} characters")
    return prompt


def _check_seed(seed: object) -> int | None:
    if seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1] or None, got {seed!r}")
    return seed


def _check_guidance(value: object) -> float:
    lo, hi = MIN_GUIDANCE, MAX_GUIDANCE
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"guidance_scale must be a number in [{lo}, {hi}], got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"guidance_scale must be a finite number in [{lo}, {hi}], got {value}")
    if not lo <= value <= hi:
        raise ValueError(f"guidance_scale must be in [{lo}, {hi}], got {value}")
    return float(value)


def check_acceleration(value: object, name: str = "acceleration") -> str:
    """The one rule for a step caching level (``name``: what the caller calls it)."""
    if value not in ACCELERATIONS:
        raise ValueError(f"{name} must be one of {list(ACCELERATIONS)}, got {value!r}")
    return value


def _check_loras(value: object) -> tuple[tuple[str, float], ...]:
    """``[{"path", "scale"}]`` (or ``(path, scale)`` pairs) → a tuple of ``(path, scale)``."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or len(value) > MAX_LORAS:
        raise ValueError(f"loras must be a list of at most {MAX_LORAS} {{path, scale}} objects, got {value!r:.100}")
    out = []
    for item in value:
        if isinstance(item, dict):
            path, scale = item.get("path"), item.get("scale", 1.0)
        elif isinstance(item, (list, tuple)) and 1 <= len(item) <= 2:
            path, scale = (*item, 1.0)[:2]
        else:
            raise ValueError(f"loras items must be {{path, scale}} objects, got {item!r:.100}")
        if not isinstance(path, str) or not path:
            raise ValueError(f"loras path must be a non-empty string, got {path!r:.100}")
        number = not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale)
        if not number or abs(scale) > MAX_LORA_SCALE:
            limit = f"{MAX_LORA_SCALE:g}"
            raise ValueError(f"loras scale must be a number in [-{limit}, {limit}], got {scale!r}")
        out.append((path, float(scale)))
    return tuple(out)


def _field(default=MISSING, rule: Callable | None = None):
    """A request field: its default and the rule that checks it (and returns the value in its one form)."""
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request, checked when built: a request that breaks the ``flux/srpo`` rules cannot
    exist, so whoever receives one (the worker, :meth:`SRPOPipeline.generate
    <srpo_infer.SRPOPipeline.generate>`, the denoising loop) trusts it. Immutable: change a field with
    :func:`dataclasses.replace`, which checks again.

    The one definition of the request's fields, their defaults and their rules (in the library's
    sentences, which the CLI and the server repeat): :func:`validate_request` and ``generate``'s
    keywords are built from it; the HTTP body (``srpo_infer.server.schema.GenerationBody``) lists them
    for the API's shape, and ``srpo-infer generate``'s flags (``srpo_infer.cli.generate``) name them.

    >>> GenerationRequest("a cat", width=1440, height=512, seed=7).image_tokens
    2880
    >>> GenerationRequest("a cat", num_inference_steps=51)
    Traceback (most recent call last):
    ...
    ValueError: num_inference_steps must be in [1, 50], got 51
    """

    prompt: str = _field(rule=_check_prompt)
    width: int = _field(DEFAULT_WIDTH, _check_width)
    height: int = _field(DEFAULT_HEIGHT, _check_height)
    seed: int | None = _field(None, _check_seed)
    num_inference_steps: int = _field(
        DEFAULT_STEPS, functools.partial(_check_int, "num_inference_steps", MIN_STEPS, MAX_STEPS)
    )
    guidance_scale: float = _field(DEFAULT_GUIDANCE, _check_guidance)
    num_images: int = _field(DEFAULT_IMAGES, functools.partial(_check_int, "num_images", MIN_IMAGES, MAX_IMAGES))
    acceleration: str = _field("none", check_acceleration)
    loras: tuple[tuple[str, float], ...] = _field((), _check_loras)

    def __post_init__(self) -> None:
        for f in fields(self):  # each rule returns the value in its one form (a float guidance, a tuple of loras)
            object.__setattr__(self, f.name, f.metadata["rule"](getattr(self, f.name)))

    def with_fields(self, **changes) -> GenerationRequest:
        """This request with ``changes``, only their rules run (every other field was checked when this
        request was built; :func:`dataclasses.replace` checks every field again).

        >>> GenerationRequest("a cat").with_fields(seed=7).seed
        7
        """
        rules = {f.name: f.metadata["rule"] for f in fields(self)}
        unknown = [name for name in changes if name not in rules]
        if unknown:
            raise TypeError(f"with_fields(): {unknown_names_message(unknown, rules, 'field')}")
        copy = object.__new__(GenerationRequest)
        copy.__dict__.update(self.__dict__)
        for name, value in changes.items():
            object.__setattr__(copy, name, rules[name](value))
        return copy

    @property
    def image_tokens(self) -> int:
        """Number of packed latent tokens the transformer sees for one image (16×16 pixels each)."""
        return (self.width // 16) * (self.height // 16)

    @property
    def seeds(self) -> list[int]:
        """Image ``i``'s seed, ``seed + i`` (empty while the seed is not drawn yet)."""
        return [] if self.seed is None else [self.seed + i for i in range(self.num_images)]

    @property
    def cost(self) -> float:
        """Megapixel-steps, width·height·steps·images / 10⁶: what a server's queue and cost cap count
        (1024², 28 steps, one image = 29.4).

        >>> round(GenerationRequest("a cat", width=1024, height=1024).cost, 1)
        29.4
        """
        return self.width * self.height * self.num_inference_steps * self.num_images / 1e6


REQUEST_FIELDS = tuple(f.name for f in fields(GenerationRequest))


def request_from_fields(prompt: object, *, image_size: str | dict | None = None, **request) -> GenerationRequest:
    """:func:`validate_request` for a caller that checked the keywords' names at its own boundary
    (``SRPOPipeline.generate``): each field's rule runs once, in :class:`GenerationRequest`."""
    width, height = resolve_image_size(image_size, request.pop("width", None), request.pop("height", None))
    return GenerationRequest(prompt, width=width, height=height, **request)


def validate_request(prompt: object, *, image_size: str | dict | None = None, **request) -> GenerationRequest:
    """Check every field of a request against the ``flux/srpo`` rules and return it validated.

    Keywords: the fields of :class:`GenerationRequest` (``width``, ``height``, ``seed``,
    ``num_inference_steps``, ``guidance_scale``, ``num_images``, ``acceleration``, ``loras``), or
    ``image_size`` (a preset name, ``"WIDTHxHEIGHT"``, ``"auto"`` or ``{"width", "height"}``) instead of
    the sides: :class:`GenerationRequest` itself, plus the size forms of the API.

    >>> validate_request("a cat", width=1440, height=512, seed=7).image_tokens
    2880
    >>> validate_request("a cat", num_inference_steps=0)
    Traceback (most recent call last):
    ...
    ValueError: num_inference_steps must be in [1, 50], got 0
    """
    return request_from_fields(prompt, image_size=image_size, **request)


def takes_request_fields(fn: Callable) -> Callable:
    """Decorator for ``fn(self?, prompt, *, ..., **request)``: its signature shows the request's fields as
    keywords (``help()``, IDEs), and a misspelled keyword is a ``TypeError`` naming the nearest one."""
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = next((i for i, p in enumerate(own) if p.kind is inspect.Parameter.KEYWORD_ONLY), len(own))
    sides = {"width": None, "height": None}  # None: from image_size, else the default size
    added = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=sides.get(f.name, f.default), annotation=f.type
        )
        for f in fields(GenerationRequest)
        if f.name != "prompt"
    ]
    fn.__signature__ = signature.replace(parameters=[*own[:at], *added, *own[at:]])
    return suggest_keywords(fn)


def check_output_format(output_format: object) -> str:
    """Return ``"jpeg"`` or ``"png"``; ``"jpg"`` is accepted as ``"jpeg"``."""
    fmt = output_format.lower() if isinstance(output_format, str) else output_format
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
    return fmt


validate_request = takes_request_fields(validate_request)  # here: its decorator is defined above
