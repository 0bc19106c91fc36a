"""The server's error responses: JSON ``{"error": {"message", "field"?, "status"}}``, and the mapping of
the library's and pydantic's refusals onto them."""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

from ..request import IMAGE_SIZE_PRESETS, REQUEST_FIELDS, check_output_format, validate_request


class ApiError(Exception):
    """An error response: raised anywhere in a request, answered as the JSON error body."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers

    @classmethod
    def from_library(cls, message: str, *, sent_n: bool = False, size_in: str | None = None) -> ApiError:
        """A 422 with the library's sentence, its field named where the client put it (``n`` for
        ``num_images`` when it sent ``n``; a side inside ``size_in``: ``"size"``, or ``"image_size"``
        for a size object)."""
        field = field_of(message)
        if sent_n and field == "num_images":
            message, field = "n" + message[len("num_images") :], "n"
        if size_in is not None and field in ("width", "height"):
            field = "size" if size_in == "size" else f"image_size.{field}"
        return cls(422, message, field)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.field, self.headers)


def error_response(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "status": status}
    if field:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def unencodable(value: Any, field: str = "") -> ApiError | None:
    """A 422 naming the first field (or key) of a parsed JSON body whose text cannot be encoded: JSON's
    ``\\ud800`` escapes (and UTF-8 bytes for a surrogate) parse into lone surrogates, which are not
    text; left in, they fail later, wherever the string is first encoded (a response, a log line)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            shown = field or "the body"
            return ApiError(
                422,
                f"{shown}: a lone surrogate ({value[exc.start]!r} at character {exc.start}) is not text: "
                "send valid Unicode (a surrogate pair, or the character itself as UTF-8)",
                field or None,
            )
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = f"{field}.{key}" if field else str(key)
        if isinstance(key, str):
            safe = key.encode("utf-8", "backslashreplace").decode("utf-8")
            if safe != key:  # the key itself: named with its escapes, so the 422 can be sent
                return unencodable(key, f"{field}.{safe}" if field else safe)
        found = unencodable(item, name)
        if found is not None:
            return found
    return None


def field_of(message: str) -> str | None:
    """The field a library message is about: its first word."""
    match = re.match(r"^(\w+) ", message)
    return match.group(1) if match else None


def validation_error(errors: list[dict], body: object, fields: dict) -> JSONResponse:
    """:func:`validation_refusal` as the response."""
    return validation_refusal(errors, body, fields).response()


def validation_refusal(errors: list[dict], body: object, fields: dict) -> ApiError:
    """pydantic's type errors → our error. A field the library's rules also refuse gets the library's
    message (the CLI and ``generate()`` say the same for the same mistake); pydantic's wording is the
    fallback for what only the schema knows (the first error that explains the input).
    ``fields``: the body model's fields."""
    errors = errors or [{}]
    if errors[0].get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {errors[0].get('ctx', {}).get('error', 'cannot parse')}")
    if tuple(errors[0].get("loc", ())) in (("body",), ()):
        return ApiError(400, "the body must be a JSON object with at least a prompt")
    refused = _library_refusal(body, fields)
    if refused is not None:
        return refused
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
    return ApiError(422, f"{field}: {message} (got {shown[:100]})", field)


def _library_refusal(body: object, fields: dict) -> ApiError | None:
    """What the library says of a body pydantic refused, if the library refuses it too."""
    if not isinstance(body, dict):
        return None
    request = {name: body[name] for name in REQUEST_FIELDS if name in body and name in fields}
    request["prompt"] = body.get("prompt")
    request["num_images"] = body.get("n", body.get("num_images", 1))
    request["acceleration"] = body.get("acceleration") or "none"
    try:
        validate_request(**request, image_size=body.get("size") or body.get("image_size", "landscape_4_3"))
        check_output_format(body.get("output_format", "jpeg"))
    except ValueError as exc:
        return ApiError.from_library(str(exc), sent_n="n" in body, size_in=_size_in(body))
    return None


def _size_in(body: dict) -> str | None:
    if body.get("size") is not None:
        return "size"
    return "image_size" if isinstance(body.get("image_size"), dict) else None
