"""The result of one generation call and its ``flux/srpo`` API response shape."""

from __future__ import annotations

import base64
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .request import GenerationRequest, check_output_format

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
# zlib level 1, not Pillow's 6: 2.4x faster on a photo-like image (1440x512: 63 ms against 158; 1536²: 201
# against 494) for 15% more bytes; on noise both cost the same (benchmarks/png_encode.py, results in
# benchmarks/results/cpu-2026-12-07/png-encode.md). PNG stays lossless at every level.
PNG_COMPRESS_LEVEL = 1


def encode_image(image: Image.Image, output_format: str = "jpeg", quality: int = 95) -> bytes:
    """The image as JPEG (``quality``) or PNG (zlib level :data:`PNG_COMPRESS_LEVEL`) bytes."""
    fmt = check_output_format(output_format)
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


class StageClock:
    """Seconds per stage of one request without stopping the GPU between stages: on CUDA, events
    recorded in stream order at each stage's end and read once at the end (one wait, where the caller
    needs the GPU's work anyway); elsewhere, the host's clock.

    >>> clock = StageClock(torch.device("cpu"))
    >>> clock.mark("encode"); clock.mark("denoise")
    >>> sorted(clock.seconds())
    ['denoise', 'encode']
    """

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.marks: list[tuple[str, object]] = [("start", self._now())]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the pipeline's device, whichever is current
        return event

    def mark(self, stage: str) -> None:
        """The end of ``stage`` (and the start of the next)."""
        self.marks.append((stage, self._now()))

    def seconds(self) -> dict[str, float]:
        """Seconds of each marked stage (waits for the last mark's work on a GPU)."""
        if self.cuda:
            self.marks[-1][1].synchronize()
            span = lambda a, b: a.elapsed_time(b) / 1000  # noqa: E731  # milliseconds between events
        else:
            span = lambda a, b: b - a  # noqa: E731
        return {stage: span(self.marks[i][1], mark) for i, (stage, mark) in enumerate(self.marks[1:])}


def pil_images(decoded: torch.Tensor) -> list[Image.Image]:
    """The VAE's output ``(n, 3, H, W)`` in [-1, 1] → PIL images, the pixels diffusers'
    ``VaeImageProcessor.postprocess(decoded, "pil")`` makes (denormalised in the decoder's dtype, then
    ×255 in float32, rounded), computed on the tensor's device: the host copies uint8 (half of bf16's
    bytes, from pinned memory on a GPU) and does no float work per pixel.
    """
    pixels = ((decoded * 0.5 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
    return [Image.fromarray(array) for array in host_pixels(pixels)]


def host_pixels(pixels: torch.Tensor):
    """uint8 ``(n, C, H, W)`` on any device → a ``(n, H, W, C)`` numpy array on the host, laid out for
    PIL on the device and copied through pinned memory from a GPU (waiting only for this copy's
    stream, never for the whole device)."""
    pixels = pixels.permute(0, 2, 3, 1).contiguous()
    if pixels.device.type == "cuda":
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        torch.cuda.current_stream(pixels.device).synchronize()  # PIL reads the bytes next
        pixels = host
    return pixels.numpy()


def encode_images(images: list[Image.Image], output_format: str = "jpeg", quality: int = 95) -> list[bytes]:
    """:func:`encode_image` for each image, in parallel threads (Pillow's encoders release the GIL), in
    order: a request's 4 PNGs take about as long as its slowest one on a machine with 4 free cores."""
    if len(images) <= 1:
        return [encode_image(image, output_format, quality) for image in images]
    check_output_format(output_format)
    workers = min(len(images), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="srpo-encode") as pool:
        return list(pool.map(lambda image: encode_image(image, output_format, quality), images))


def data_uri(image: Image.Image | bytes, output_format: str = "jpeg") -> str:
    """A ``data:`` URI holding the image (what the API returns with ``sync_mode``); ``image`` may be a
    PIL image or bytes already encoded in ``output_format``."""
    fmt = check_output_format(output_format)
    data = image if isinstance(image, bytes) else encode_image(image, fmt)
    return f"data:{CONTENT_TYPES[fmt]};base64," + base64.b64encode(data).decode("ascii")


@dataclass
class GenerationResult:
    """Images and facts of one :meth:`SRPOPipeline.generate` call, with the request that made them.

    ``request`` is the request as run (its seed drawn when none was given); ``seed``, ``seeds``,
    ``prompt``, ``width``, ``height``, ``num_inference_steps`` and ``guidance_scale`` read from it
    (``seeds[i]`` is the seed of ``images[i]``, ``seed + i``). ``timings`` holds seconds only: per stage
    (``encode``, ``denoise``, ``decode``) and ``inference`` (their sum). ``transformer_evaluations``
    counts full transformer evaluations (fewer than the steps when step caching skipped some).
    ``has_nsfw_concepts`` holds ``None`` per image when no safety checker ran:
    ``None`` means "not checked", never "safe".
    """

    images: list[Image.Image]
    request: GenerationRequest
    timings: dict[str, float]
    has_nsfw_concepts: list[bool | None] = field(default_factory=list)
    tokens_used: int = 0
    transformer_evaluations: int = 0
    replica: str | None = None  # which replica made the images, when several serve (Ray Serve)
    urls: list[str] | None = None
    output_format: str = "jpeg"

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def seeds(self) -> list[int]:
        return self.request.seeds

    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def width(self) -> int:
        return self.request.width

    @property
    def height(self) -> int:
        return self.request.height

    @property
    def num_inference_steps(self) -> int:
        return self.request.num_inference_steps

    @property
    def guidance_scale(self) -> float:
        return self.request.guidance_scale

    def save(self, target: str | Path, output_format: str | None = None) -> list[Path]:
        """Write the images and remember their paths as URLs for :meth:`to_dict`.

        ``target`` is a folder (files ``srpo_<seed>.<ext>`` go in it) or, for one image, a file name.
        """
        fmt = check_output_format(output_format or self.output_format)
        ext = "jpg" if fmt == "jpeg" else "png"
        check_image_file_name(target, fmt)
        folder = names_a_folder(target)
        target = Path(target)
        if not folder and len(self.images) == 1:
            paths = [target]
        elif not folder:
            paths = [target.with_name(f"{target.stem}_{i}{target.suffix}") for i in range(len(self.images))]
        else:
            paths = [target / f"srpo_{s}.{ext}" for s in self.seeds]
        for path, data in zip(paths, encode_images(self.images, fmt), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_whole(path, data)
        self.urls = [str(p) for p in paths]
        self.output_format = fmt
        return paths

    def to_dict(self, output_format: str | None = None) -> dict:
        """The ``flux/srpo`` response: ``images``, ``timings``, ``seed``, ``has_nsfw_concepts``, ``prompt``,
        ``data``, ``meta``. URLs are the saved paths, or data URIs when nothing was saved.

        ``meta.usage.tokens_used`` is ours: image tokens (width·height/256 per image) plus prompt tokens.
        """
        # Saved files keep the format they were written in.
        fmt = self.output_format if self.urls else check_output_format(output_format or self.output_format)
        urls = self.urls or [data_uri(data, fmt) for data in encode_images(self.images, fmt)]
        images = [
            {"url": u, "width": im.width, "height": im.height, "content_type": CONTENT_TYPES[fmt]}
            for u, im in zip(urls, self.images, strict=True)
        ]
        return {**api_response(self, images, self.has_nsfw_concepts), "seeds": list(self.seeds)}


def write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so the file is either whole or not there: a Ctrl-C or a full disk
    mid-write leaves neither a truncated image nor the temporary file."""
    part = path.with_name(f".{path.name}.part")
    try:
        part.write_bytes(data)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def api_response(result: GenerationResult, images: list[dict], has_nsfw_concepts: list[bool | None]) -> dict:
    """The ``flux/srpo`` response body for ``result`` with the given image entries (url, width, height,
    content_type) and safety flags: the one definition the library and the server share.

    ``timings`` holds seconds only; ``transformer_evaluations`` is ours (the hosted API has no such field).
    """
    return {
        "created": int(time.time()),  # OpenAI's images API: Unix seconds
        "images": images,
        "timings": dict(result.timings),
        "seed": result.seed,
        "has_nsfw_concepts": list(has_nsfw_concepts),
        "prompt": result.prompt,
        "data": [dict(i) for i in images],
        "meta": {"usage": {"tokens_used": result.tokens_used}}
        | ({"replica": result.replica} if result.replica is not None else {}),
        "transformer_evaluations": result.transformer_evaluations,
    }


IMAGE_SUFFIXES = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}


def names_a_folder(target: str | Path) -> bool:
    """Whether ``target`` names a folder for the images: an existing directory (``run.v2`` included), a
    name ending in a slash, or a name without an extension.

    >>> names_a_folder("outputs"), names_a_folder("run.v2/"), names_a_folder("out.png")
    (True, True, False)
    """
    text = os.fspath(target)
    return text.endswith(("/", os.sep)) or not Path(text).suffix or Path(text).is_dir()


def check_image_file_name(target: str | Path, output_format: str) -> None:
    """A file name's extension must say the format written into it (a folder is fine: :func:`names_a_folder`).

    >>> check_image_file_name("out.gif", "jpeg")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: output file 'out.gif' must end in .jpg, .jpeg or .png (or name a folder): ...
    """
    if names_a_folder(target):
        return
    suffix = Path(target).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(
            f"output file {str(target)!r} must end in .jpg, .jpeg or .png (or name a folder): images "
            "are written as jpeg or png"
        )
    if IMAGE_SUFFIXES[suffix] != check_output_format(output_format):
        raise ValueError(
            f"output file {str(target)!r} and output format {output_format!r} disagree: name a "
            f"{'.png' if output_format == 'png' else '.jpg'} file or drop the format"
        )
