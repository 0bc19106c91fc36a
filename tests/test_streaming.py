"""Previews as the image forms: the library's ``previews``/``on_preview``, and ``stream: true`` on the
server (OpenAI's image streaming events), read by the OpenAI SDK; a client that hangs up mid-stream
stops its generation before the next step."""

from __future__ import annotations

import dataclasses
import json
import threading

import httpx
import numpy as np
import pytest
from live_server import LiveServer, wait_until
from PIL import Image

pytest.importorskip("fastapi")
from helpers import pixels

from srpo_infer.pipeline import GenerationCancelled
from srpo_infer.preview import Preview, preview_steps
from srpo_infer.result import GenerationResult
from srpo_infer.server import create_app
from srpo_infer.server.schema import GenerationBody
from srpo_infer.server.streaming import stream_refusal

FOUR = {"num_inference_steps": 4, "image_size": "square", "acceleration": "none"}


def test_preview_steps_are_spread_and_never_the_last():
    assert preview_steps(28, 3) == [6, 13, 20]
    assert preview_steps(4, 2) == [0, 2] and preview_steps(4, 3) == [0, 1, 2]
    assert preview_steps(2, 3) == [0] and preview_steps(1, 2) == [] and preview_steps(10, 0) == []


def test_library_previews_leave_the_image_unchanged(tiny_pipe):
    got: list[Preview] = []
    kw = {"width": 512, "height": 768, "seed": 5, "num_inference_steps": 4}
    plain = tiny_pipe.generate("a lighthouse", **kw)
    streamed = tiny_pipe.generate("a lighthouse", previews=3, on_preview=got.append, **kw)
    assert [(p.index, p.step, p.steps) for p in got] == [(0, 1, 4), (1, 2, 4), (2, 3, 4)]
    assert all(p.images[0].size == (512, 768) for p in got)
    assert not np.array_equal(np.asarray(got[0].images[0]), np.asarray(got[2].images[0]))  # it forms
    assert np.array_equal(np.asarray(streamed.images[0]), np.asarray(plain.images[0]))
    with pytest.raises(ValueError, match="previews=2 needs on_preview"):
        tiny_pipe.generate("a lighthouse", previews=2, **kw)
    with pytest.raises(ValueError, match=r"previews must be an integer in \[0, 50\], got -1"):
        tiny_pipe.generate("a lighthouse", previews=-1, on_preview=print, **kw)


@pytest.fixture(scope="module")
def streaming_server(tiny_pipe, tmp_path_factory):
    with LiveServer(create_app(tiny_pipe, output_dir=tmp_path_factory.mktemp("out"))) as live:
        yield live


def test_the_openai_sdk_streams_two_previews_then_the_image(streaming_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{streaming_server.url}/v1", api_key="unused", max_retries=0)
    extra = {"num_inference_steps": 4, "seed": 11, "acceleration": "none"}
    events = list(
        client.images.generate(
            model="flux/srpo", prompt="a lighthouse", size="512x768", stream=True, partial_images=2, extra_body=extra
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert pixels(event.b64_json).shape == (768, 512, 3) and event.size == "512x768"
        assert event.output_format == "jpeg" and isinstance(event.created_at, int)
    assert events[-1].usage.output_tokens == 512 * 768 // 256
    plain = client.images.generate(
        model="flux/srpo", prompt="a lighthouse", size="512x768", response_format="b64_json", extra_body=extra
    )
    assert np.array_equal(pixels(events[-1].b64_json), pixels(plain.data[0].b64_json))


def test_partial_images_zero_sends_only_the_completed_event(streaming_server):
    with httpx.stream(
        "POST",
        f"{streaming_server.url}/v1/images/generations",
        timeout=120,
        json={"prompt": "a cat", "stream": True, "partial_images": 0, **FOUR},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert events == ["image_generation.completed"]


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"n": 2}, "n", "n/num_images must be 1, got 2"),
        ({"num_images": 3}, "n", "n/num_images must be 1, got 3"),
        ({"response_format": "url"}, "response_format", "response_format must be b64_json"),
        ({"sync_mode": True}, "sync_mode", "sync_mode must be false"),
        ({"stream": False, "partial_images": 2}, "partial_images", "partial_images (2) needs stream: true"),
        ({"partial_images": 4}, "partial_images", "less than or equal to 3"),
    ],
)
def test_stream_combinations_that_cannot_work_are_refused_in_one_line(streaming_server, change, field, words):
    body = {"prompt": "a cat", "stream": True, **FOUR, **change}
    r = httpx.post(f"{streaming_server.url}/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    assert words in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]


def test_backends_that_cannot_stream_and_checked_previews_are_refused():
    body = GenerationBody(prompt="a cat", stream=True, partial_images=1)
    message, field = stream_refusal(body, streams=False, checks_safety=False)
    assert field == "stream" and "Ray Serve" in message
    message, field = stream_refusal(body, streams=True, checks_safety=True)
    assert field == "partial_images" and "previews are not checked" in message
    off = GenerationBody(prompt="a cat", stream=True, partial_images=1, enable_safety_checker=False)
    assert stream_refusal(off, streams=True, checks_safety=True) is None


class GatedPipeline:
    """Runs a step only when the test releases one (``gate``), asking ``should_stop`` before each step
    as the real loop does, and sends previews at the real loop's steps."""

    def __init__(self):
        self.gate = threading.Semaphore(0)
        self.ran = 0
        self.stopped_at: int | None = None
        self.should_stop = None

    def generate(self, request, *, progress=None, should_stop=None, previews=0, on_preview=None):
        req = request
        self.should_stop, steps = should_stop, preview_steps(req.num_inference_steps, previews)
        for step in range(req.num_inference_steps):
            self.gate.acquire()
            if should_stop():
                self.stopped_at = step
                raise GenerationCancelled("stopped")
            self.ran += 1
            if step in steps:
                image = Image.new("RGB", (req.width, req.height), (step * 20, 0, 0))
                on_preview(Preview(steps.index(step), step + 1, req.num_inference_steps, [image]))
        return GenerationResult(
            images=[Image.new("RGB", (req.width, req.height))],
            request=dataclasses.replace(req, seed=req.seed or 0),
            timings={"inference": 0.0},
            has_nsfw_concepts=[None],
        )


def test_a_client_that_hangs_up_mid_stream_frees_the_worker_before_the_next_step(tmp_path):
    pipe = GatedPipeline()
    app = create_app(pipe, output_dir=tmp_path)
    body = {"prompt": "a cat", "stream": True, "partial_images": 3, "num_inference_steps": 8, "image_size": "square"}
    with LiveServer(app) as live:
        with httpx.stream("POST", f"{live.url}/v1/images/generations", json=body, timeout=60) as r:
            assert r.status_code == 200
            pipe.gate.release(2)  # steps 0 and 1: the first preview comes after step 1 (steps 1, 3, 5 of 8)
            lines = r.iter_lines()
            assert next(lines) == "event: image_generation.partial_image"
            event = json.loads(next(lines)[len("data: ") :])
            assert event["partial_image_index"] == 0 and pixels(event["b64_json"]).shape == (512, 512, 3)
        # The client closed the connection with the generation waiting before step 2.
        wait_until(lambda: pipe.should_stop())  # the server saw the hang-up and cancelled the job
        pipe.gate.release(1)
        wait_until(lambda: not app.state.worker.busy)
        assert pipe.ran == 2 and pipe.stopped_at == 2  # stopped before its next step: no step ran after
        pipe.gate.release(100)  # the worker is free: the next request runs
        r = httpx.post(f"{live.url}/v1/images/generations", json={"prompt": "a dog", **FOUR}, timeout=60)
        assert r.status_code == 200, r.text


def test_a_drain_mid_stream_ends_it_with_an_error_event(tmp_path):
    pipe = GatedPipeline()
    app = create_app(pipe, output_dir=tmp_path)
    body = {"prompt": "a cat", "stream": True, "partial_images": 1, "num_inference_steps": 4, "image_size": "square"}
    with LiveServer(app) as live:
        with httpx.stream("POST", f"{live.url}/v1/images/generations", json=body, timeout=60) as r:
            pipe.gate.release(2)  # the preview after step 1 of 4
            lines = r.iter_lines()
            assert next(lines) == "event: image_generation.partial_image"
            drain = threading.Thread(target=app.state.drain, args=(0,))  # stop the running job now
            drain.start()
            wait_until(lambda: pipe.should_stop())
            pipe.gate.release(1)
            rest = [line for line in lines if line]
        drain.join()
    assert rest[1] == "event: error", rest
    error = json.loads(rest[2][len("data: ") :])["error"]
    assert error["status"] == 503 and "shut down" in error["message"]
