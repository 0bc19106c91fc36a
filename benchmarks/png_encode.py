"""PNG encode time and size per zlib compression level, side by side on the same images (issue 42).

Pillow writes PNG at zlib level 6 by default. At the API's sizes that can cost as much as the hosted
API's whole 0.747 s inference, so the level is chosen by this measurement. Two images per size: a
photo-like one (smooth light and shapes, fine grain: what a photo compresses like) and uniform noise
(the tiny random model's output, the worst case). JPEG q95 for reference. Medians of ``--repeats``.

    python benchmarks/png_encode.py --out benchmarks/results/cpu-2026-12-07/png-encode.md
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((1440, 512), (1536, 1536))
LEVELS = (0, 1, 2, 3, 6, 9)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 0.5 + 0.3 * np.sin(x / width * 3.1 + 0.5)[..., None] * np.cos(y / height * 2.3)[..., None]
    shapes = np.zeros((height, width, 3), np.float32)
    for _ in range(40):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 200)
        shapes += ((x - cx) ** 2 + (y - cy) ** 2 < r * r)[..., None] * rng.uniform(-0.15, 0.15, 3)
    grain = rng.normal(0, 3 / 255, (height, width, 3))
    pixels = np.clip(light + shapes + grain, 0, 1) * 255
    return Image.fromarray(pixels.astype(np.uint8))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode_seconds(image: Image.Image, repeats: int, **save) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeats):
        buf = io.BytesIO()
        start = time.perf_counter()
        image.save(buf, **save)
        times.append(time.perf_counter() - start)
        size = buf.tell()
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    import PIL

    lines = [
        f"PNG encode, Pillow {PIL.__version__}, {platform.processor() or platform.machine()}, one thread, "
        f"median of {args.repeats} ({time.strftime('%Y-%m-%d')})",
        "",
        "| image | format | ms | KB | vs level 6 |",
        "|---|---|---:|---:|---:|",
    ]
    for width, height in SIZES:
        for kind, make in (("photo-like", photo_like), ("noise", noise)):
            image = make(width, height)
            default, _ = encode_seconds(image, args.repeats, format="PNG")
            for level in LEVELS:
                seconds, size = encode_seconds(image, args.repeats, format="PNG", compress_level=level)
                lines.append(
                    f"| {width}×{height} {kind} | PNG level {level}{' (Pillow default)' if level == 6 else ''} "
                    f"| {seconds * 1e3:.0f} | {size / 1e3:.0f} | {seconds / default:.2f}× |"
                )
            seconds, size = encode_seconds(image, args.repeats, format="JPEG", quality=95)
            lines.append(f"| {width}×{height} {kind} | JPEG q95 | {seconds * 1e3:.0f} | {size / 1e3:.0f} | |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
