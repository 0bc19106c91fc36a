"""Every request rule of the flux/srpo contract, through the public generate() and the validator."""

from __future__ import annotations

import math

import pytest
import torch

from srpo_infer import IMAGE_SIZE_PRESETS, validate_request
from srpo_infer.request import check_output_format, resolve_image_size

BAD = [
    # (kwargs, words the message must contain)
    (dict(width=480), ["width", "480", "[512, 1536]", "32"]),
    (dict(width=1568), ["width", "1568"]),
    (dict(width=1000), ["width", "1000", "multiple of 32"]),
    (dict(height=500), ["height", "500"]),
    (dict(height=1024.0), ["height", "1024.0"]),
    (dict(width=True), ["width", "True"]),
    (dict(num_inference_steps=0), ["num_inference_steps", "0", "[1, 50]"]),
    (dict(num_inference_steps=51), ["num_inference_steps", "51"]),
    (dict(num_inference_steps=2.5), ["num_inference_steps", "2.5"]),
    (dict(guidance_scale=0.5), ["guidance_scale", "0.5", "[1.0, 20.0]"]),
    (dict(guidance_scale=20.5), ["guidance_scale", "20.5"]),
    (dict(guidance_scale=math.nan), ["guidance_scale", "nan"]),
    (dict(guidance_scale="4"), ["guidance_scale", "'4'"]),
    (dict(num_images=0), ["num_images", "0", "[1, 4]"]),
    (dict(num_images=5), ["num_images", "5"]),
    (dict(seed=-1), ["seed", "-1"]),
    (dict(seed=2**63), ["seed", str(2**63)]),
    (dict(seed="7"), ["seed", "'7'"]),
    (dict(acceleration="turbo"), ["acceleration", "turbo"]),
    (dict(image_size="huge"), ["image_size", "huge", "square_hd"]),
    (dict(image_size={"width": 512, "depth": 3}), ["image_size", "depth"]),
    (dict(image_size={"width": 500, "height": 512}), ["width", "500"]),
]


@pytest.mark.parametrize("kwargs, words", BAD, ids=[str(k) for k, _ in BAD])
def test_invalid_fields_name_field_value_and_range(kwargs, words):
    with pytest.raises(ValueError) as err:
        validate_request("a cat", **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize(
    "prompt, word", [("", "non-empty"), ("   ", "non-empty"), (None, "string"), ("x" * 4001, "4001")]
)
def test_prompt_rules(prompt, word):
    with pytest.raises(ValueError, match="prompt") as err:
        validate_request(prompt)
    assert word in str(err.value)


def test_limits_are_inclusive():
    r = validate_request(
        "x" * 4000, width=512, height=1536, seed=2**63 - 1, num_inference_steps=50, guidance_scale=20, num_images=4
    )
    assert (r.width, r.height, r.num_inference_steps, r.guidance_scale, r.num_images) == (512, 1536, 50, 20.0, 4)
    r = validate_request("x", width=1536, height=512, seed=0, num_inference_steps=1, guidance_scale=1)
    assert (r.width, r.height, r.seed) == (1536, 512, 0)


def test_defaults_follow_the_api():
    r = validate_request("a cat")
    assert (r.width, r.height) == (1024, 768)
    assert (r.num_inference_steps, r.guidance_scale, r.num_images, r.seed) == (28, 4.5, 1, None)


@pytest.mark.parametrize("name, size", sorted(IMAGE_SIZE_PRESETS.items()))
def test_presets(name, size):
    assert resolve_image_size(name) == size
    assert (validate_request("a", image_size=name).width, validate_request("a", image_size=name).height) == size
    assert resolve_image_size(width=name) == size  # a preset in the width slot


def test_presets_match_the_api_table():
    assert IMAGE_SIZE_PRESETS == {
        "square_hd": (1024, 1024),
        "square": (512, 512),
        "portrait_4_3": (768, 1024),
        "portrait_16_9": (576, 1024),
        "landscape_4_3": (1024, 768),
        "landscape_16_9": (1024, 576),
    }


def test_image_size_object_and_sides_are_exclusive():
    assert resolve_image_size({"width": 1440, "height": 512}) == (1440, 512)
    with pytest.raises(ValueError, match="not both"):
        resolve_image_size("square", width=512)


def test_every_valid_size_is_accepted():
    sides = range(512, 1537, 32)
    assert len(sides) ** 2 == 1089
    for w in sides:
        validate_request("a", width=w, height=1536 + 512 - w)


@pytest.mark.parametrize("fmt, want", [("jpeg", "jpeg"), ("JPG", "jpeg"), ("png", "png")])
def test_output_format(fmt, want):
    assert check_output_format(fmt) == want


def test_output_format_rejects_others():
    with pytest.raises(ValueError, match=r"output_format.*webp"):
        check_output_format("webp")


def test_png_is_lossless_at_the_fast_zlib_level():
    """PNG at zlib level 1 (benchmarks/png_encode.py: 2.4x faster than Pillow's 6 on a photo-like
    1440x512): the pixels come back exactly, and the zlib header says the fastest level was used."""
    import io

    import numpy as np
    from PIL import Image

    from srpo_infer.result import encode_image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    pixels[:, :36] = 128  # a flat half, so compression has something to do
    data = encode_image(Image.fromarray(pixels), "png")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    idat = data.index(b"IDAT") + 4
    assert data[idat] & 0x0F == 8 and data[idat + 1] >> 6 == 0  # deflate, FLEVEL 0: the fastest levels (0-1)


def test_a_requests_images_are_encoded_in_parallel_and_in_order(monkeypatch):
    """encode_images gives what encode_image gives, image by image, with the encodes overlapping: two
    encodes meet at a barrier, which one thread alone would never pass."""
    import threading

    import numpy as np
    from PIL import Image

    from srpo_infer import result

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(3)]
    want = [result.encode_image(image, "png") for image in images]
    monkeypatch.setattr(result.os, "cpu_count", lambda: 2)
    barrier, encode = threading.Barrier(2, timeout=120), result.encode_image

    def meeting(image, *args):
        if image is not images[2]:
            barrier.wait()  # the first two must run at the same time
        return encode(image, *args)

    monkeypatch.setattr(result, "encode_image", meeting)
    assert result.encode_images(images, "png") == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decoded_images_become_the_pixels_diffusers_postprocess_makes(dtype):
    """pil_images (uint8 on the decoder's device) against VaeImageProcessor.postprocess(…, "pil") on
    fresh random decoder outputs of an awkward size, out-of-range values and exact half-levels included."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    from srpo_infer.result import pil_images

    g = torch.Generator().manual_seed(int(dtype.itemsize))
    decoded = (torch.randn(2, 3, 24, 40, generator=g) * 0.8).to(dtype)
    decoded[0, 0, 0, :5] = torch.tensor([-3.0, 3.0, 1 / 255 - 1, 0.0, 2 * 128.5 / 255 - 1]).to(dtype)
    want = VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="pil")
    got = pil_images(decoded)
    assert [im.size for im in got] == [(40, 24)] * 2 and all(im.mode == "RGB" for im in got)
    for g_image, w_image in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g_image), np.asarray(w_image))


def test_every_rule_sentence_is_defined_in_one_module():
    """Each "<name> must be …" a library error starts with comes from one module: one rule, one place
    (before: the acceleration levels' sentence stood in request.py and step_cache.py)."""
    import ast
    import collections
    import re
    from pathlib import Path

    import srpo_infer

    defined = collections.defaultdict(set)
    for path in Path(srpo_infer.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            elif isinstance(node, ast.JoinedStr):
                text = ast.unparse(node)[2:-1]  # f"…" as its template: "{name} must be one of {…}"
            else:
                continue
            sentence = re.match(r"(\{[^}]*\}|[A-Za-z_]+) must be (.*)", text)
            if sentence:  # a named field's rule by its name; a rule for any name by its whole template
                defined[sentence[0] if sentence[1].startswith("{") else sentence[1]].add(path.name)
    assert "guidance_scale" in defined and any("ACCELERATIONS" in key for key in defined)  # the scan sees them
    assert {name: sorted(m) for name, m in defined.items() if len(m) > 1} == {}


def test_each_side_is_checked_once_per_request_on_the_library_and_http_paths(tiny_pipe, monkeypatch, tmp_path):
    """The size rule runs at the boundary where a request is built, once per side: not again when the
    seed is drawn, the LoRAs resolved or the size parsed (before: up to 4 times)."""
    pytest.importorskip("fastapi", reason="the [server] extra")
    from fastapi.testclient import TestClient

    from srpo_infer import request
    from srpo_infer.server import create_app

    checked = []
    real = request.check_side
    monkeypatch.setattr(request, "check_side", lambda field, value: checked.append(field) or real(field, value))
    tiny_pipe.generate("a kite", image_size="512x512", num_inference_steps=1)
    assert checked == ["width", "height"], checked
    checked.clear()
    with TestClient(create_app(tiny_pipe, output_dir=tmp_path)) as client:
        r = client.post(
            "/v1/images/generations", json={"prompt": "a kite", "image_size": "square", "num_inference_steps": 1}
        )
    assert r.status_code == 200, r.text
    assert checked == ["width", "height"], checked
