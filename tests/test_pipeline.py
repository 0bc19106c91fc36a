"""generate() on the tiny model: determinism, seeds, agreement with diffusers, the result schema."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flux_pipelines import count_calls
from helpers import pixels

import srpo_infer
from srpo_infer import GenerationRequest, PromptTruncatedWarning

SEED_DOC = Path(__file__).resolve().parents[2] / "shared" / "seed" / "000_c8be228e0ff0d73b.txt"
SEED_DOC_MISSING = "needs the hosted API's seed document (../shared/seed/), which only the project's checkouts have"
STEPS = 2


def test_same_seed_same_pixels_different_seed_different(tiny_pipe):
    a = tiny_pipe.generate("a red fox", width=512, height=576, seed=11, num_inference_steps=STEPS)
    b = tiny_pipe.generate("a red fox", width=512, height=576, seed=11, num_inference_steps=STEPS)
    c = tiny_pipe.generate("a red fox", width=512, height=576, seed=12, num_inference_steps=STEPS)
    assert a.images[0].size == (512, 576)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert np.abs(pixels(a.images[0]) - pixels(c.images[0])).mean() > 1.0


def test_prompt_changes_the_image(tiny_pipe):
    a = tiny_pipe.generate("a red fox", width=512, height=512, seed=5, num_inference_steps=STEPS)
    b = tiny_pipe.generate("a blue whale", width=512, height=512, seed=5, num_inference_steps=STEPS)
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_num_images_uses_consecutive_seeds_and_matches_single_runs(tiny_pipe):
    req = GenerationRequest("a lighthouse", 512, 512, seed=40, num_inference_steps=STEPS, num_images=3)
    batch = tiny_pipe.generate_latents(req)
    assert batch.shape[0] == 3
    for i in range(3):
        single = tiny_pipe.generate_latents(
            GenerationRequest("a lighthouse", 512, 512, seed=40 + i, num_inference_steps=STEPS)
        )
        torch.testing.assert_close(batch[i : i + 1], single, rtol=1e-4, atol=1e-4)
    r = tiny_pipe.generate("a lighthouse", width=512, height=512, seed=40, num_images=3, num_inference_steps=1)
    assert r.seeds == [40, 41, 42] and r.seed == 40 and len(r.images) == 3
    assert r.to_dict()["seeds"] == [40, 41, 42]
    # The README's claim: each image's pixels are within 1/255 of the single run's.
    single = tiny_pipe.generate("a lighthouse", width=512, height=512, seed=41, num_inference_steps=1)
    diff = np.abs(pixels(r.images[1]) - pixels(single.images[0]))
    assert diff.max() <= 1, diff.max()


def test_noise_is_device_and_dtype_independent(tiny_pipe):
    noise = tiny_pipe.prepare_noise([3], 512, 512)
    again = torch.randn((4, 64, 64), generator=torch.Generator("cpu").manual_seed(3))
    packed = again.view(4, 32, 2, 32, 2).permute(1, 3, 0, 2, 4).reshape(32 * 32, 16)  # Flux's 2×2 patches
    assert torch.equal(noise[0], packed)
    # Other dtypes (and devices, where there is a GPU) get the same float32 draw, cast and moved.
    others = [("cpu", "bfloat16"), *([("cuda", "bfloat16"), ("cuda", "float32")] if torch.cuda.is_available() else [])]
    for device, dtype in others:
        pipe = srpo_infer.load_pipeline("tiny-random", device=device, dtype=dtype, progress=False)
        got = pipe.prepare_noise([3], 512, 512)
        assert got.device.type == device and got.dtype == getattr(torch, dtype)
        assert torch.equal(got.cpu(), noise.to(got.dtype)), (device, dtype)


def test_random_seed_is_reported_and_reproduces(tiny_pipe):
    r = tiny_pipe.generate("a tree", width=512, height=512, num_inference_steps=1)
    assert isinstance(r.seed, int) and 0 <= r.seed < 2**63
    again = tiny_pipe.generate("a tree", width=512, height=512, seed=r.seed, num_inference_steps=1)
    assert np.array_equal(pixels(r.images[0]), pixels(again.images[0]))


def test_our_loop_matches_diffusers_flux_pipeline(tiny_pipe):
    """The same noise through FluxPipeline.__call__ and through our loop gives the same latents."""
    req = GenerationRequest("a castle at dawn", 640, 512, seed=9, num_inference_steps=3, guidance_scale=3.5)
    ours = tiny_pipe.generate_latents(req)
    noise = tiny_pipe.prepare_noise([9], 640, 512)
    with torch.inference_mode():
        ref = tiny_pipe.flux(
            "a castle at dawn",
            height=512,
            width=640,
            num_inference_steps=3,
            guidance_scale=3.5,
            latents=noise,
            output_type="latent",
            max_sequence_length=512,
        ).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_timings_and_sizes(tiny_pipe):
    r = tiny_pipe.generate("a T-Rex", image_size="landscape_16_9", seed=1, num_inference_steps=STEPS)
    assert r.images[0].size == (1024, 576)
    assert set(r.timings) >= {"inference", "encode", "denoise", "decode"}
    assert all(v > 0 for v in r.timings.values())
    assert r.timings["inference"] == pytest.approx(r.timings["encode"] + r.timings["denoise"] + r.timings["decode"])


def _seed_example() -> dict:
    text = SEED_DOC.read_text()
    block = text.split("```json5", 1)[1].split("```", 1)[0]
    return json.loads(block)


def _schema(value):
    """The shape of a JSON value: dict keys and element types, recursively."""
    if isinstance(value, dict):
        return {k: _schema(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_schema(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


@pytest.mark.skipif(not SEED_DOC.exists(), reason=SEED_DOC_MISSING)
def test_to_dict_has_the_seed_docs_response_shape(tiny_pipe, tmp_path):
    example = _seed_example()
    r = tiny_pipe.generate(example["prompt"], width=1440, height=512, seed=example["seed"], num_inference_steps=1)
    got = r.to_dict()
    want = _schema(example)
    have = _schema(got)
    for key, shape in want.items():
        assert key in have, key
        if key == "has_nsfw_concepts":
            continue  # null per image: no safety checker ran (see GenerationResult)
        if key == "timings":  # seconds only, per stage and in all
            assert set(got[key]) == {"encode", "denoise", "decode", "inference"}
            assert all(type(v) is float and v >= 0 for v in got[key].values()), got[key]
            continue
        assert have[key] == shape, (key, have[key], shape)
    assert got["images"][0] | {"url": None} == example["images"][0] | {"url": None}
    assert got["data"] == got["images"]
    assert got["seed"] == example["seed"] and got["prompt"] == example["prompt"]
    assert got["has_nsfw_concepts"] == [None]
    assert got["transformer_evaluations"] == r.transformer_evaluations == 1  # counts live outside timings
    assert got["images"][0]["url"].startswith("data:image/jpeg;base64,")
    # After saving, URLs are the files and the content type follows their format.
    paths = r.save(tmp_path, "png")
    d = r.to_dict()
    assert d["images"][0]["url"] == str(paths[0]) and d["images"][0]["content_type"] == "image/png"
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_truncation_warning_for_long_prompts(tiny_pipe):
    with pytest.warns(PromptTruncatedWarning, match="only the first 512"):
        tiny_pipe.generate("y" * 600, width=512, height=512, seed=1, num_inference_steps=1)


def test_invalid_request_raises_before_any_work(tiny_pipe):
    with pytest.raises(ValueError, match="width must be"):
        tiny_pipe.generate("a", width=100, height=512)


def test_module_level_generate_uses_srpo_model(monkeypatch):
    monkeypatch.setenv("SRPO_MODEL", "tiny-random")
    r = srpo_infer.generate("a cat", width=512, height=512, seed=3, num_inference_steps=1, progress=False)
    assert r.seed == 3 and r.images[0].size == (512, 512)
    assert srpo_infer.default_pipeline() is srpo_infer.default_pipeline()


def test_pipeline_config_is_resolved(tiny_pipe):
    cfg = tiny_pipe.config
    assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32 and cfg.base == "tiny-random"
    assert cfg.describe()["dtype"] == "float32"


def test_bad_device_and_dtype_are_clear():
    with pytest.raises(ValueError, match="dtype must be one of"):
        srpo_infer.load_pipeline("tiny-random", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            srpo_infer.load_pipeline("tiny-random", device="cuda")


def test_on_step_sees_every_step_and_a_long_prompt_says_so_once(tiny_pipe, caplog):
    import logging
    import warnings

    from srpo_infer import PromptTruncatedWarning

    steps = []
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        tiny_pipe.generate(
            " ".join(["word"] * 700),
            image_size="square",
            num_inference_steps=3,
            seed=1,
            on_step=lambda i, latents: steps.append((i, tuple(latents.shape))),
        )
    c = tiny_pipe.transformer.config.in_channels
    assert steps == [(0, (1, 1024, c)), (1, (1, 1024, c)), (2, (1, 1024, c))]
    assert [w.category for w in caught] == [PromptTruncatedWarning]
    assert "word word word" not in caplog.text  # transformers and diffusers would print the dropped text


def test_the_same_prompt_twice_runs_t5_once_and_makes_the_same_image():
    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False)
    calls = count_calls(pipe.flux.text_encoder_2)
    request = GenerationRequest("a lighthouse at dusk", 512, 512, seed=3, num_inference_steps=2)
    first, again = pipe.run(request), pipe.run(request)
    assert calls[0] == 1 and pipe.prompt_cache.hits == 1
    torch.testing.assert_close(again.latents, first.latents, rtol=0, atol=0)
    two = pipe.run(dataclasses.replace(request, num_images=2))  # the cached embeddings repeated per image
    assert calls[0] == 1
    torch.testing.assert_close(two.latents[:1], first.latents, rtol=0, atol=1e-4)  # batch-of-2 rounding
    pipe.run(GenerationRequest("a lighthouse at dawn", 512, 512, seed=3, num_inference_steps=2))
    assert calls[0] == 2


def test_prompt_cache_off_encodes_every_time_and_a_bad_size_is_named():
    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, prompt_cache_mb=0)
    calls = count_calls(pipe.flux.text_encoder_2)
    for _ in range(2):
        pipe.run(GenerationRequest("a lighthouse at dusk", 512, 512, seed=3, num_inference_steps=1))
    assert calls[0] == 2
    with pytest.raises(ValueError, match=r"prompt_cache_mb must be an integer >= 0 \(0: off\), got -1"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, prompt_cache_mb=-1)


def test_request_timing_waits_for_the_gpu_once_at_the_end(monkeypatch):
    """On CUDA, StageClock records an event per stage and waits only on the last one (before: a
    device-wide synchronize after every stage); a fake event stands in for CUDA's here."""
    from srpo_infer.result import StageClock

    waits, clock_ms = [], iter([0.0, 12.0, 500.0, 530.0])

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self, stream=None):
            self.at = next(clock_ms)

        def synchronize(self):
            waits.append(self.at)

        def elapsed_time(self, other):
            return other.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("a device-wide synchronize"))
    clock = StageClock(torch.device("cuda"))
    for stage in ("encode", "denoise", "decode"):
        clock.mark(stage)
    assert clock.seconds() == pytest.approx({"encode": 0.012, "denoise": 0.488, "decode": 0.030})
    assert waits == [530.0]


def test_generate_reports_each_stage_and_their_sum(tiny_pipe):
    r = tiny_pipe.generate("a kite", width=512, height=512, seed=1, num_inference_steps=2)
    assert set(r.timings) == {"encode", "denoise", "decode", "inference"}
    assert all(v > 0 for v in r.timings.values())
    assert r.timings["inference"] == pytest.approx(r.timings["encode"] + r.timings["denoise"] + r.timings["decode"])
    assert set(tiny_pipe.run(r.request).timings) == {"encode", "denoise"}
