"""The flux/srpo HTTP API, driven over real HTTP on a loopback port with the tiny model."""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from live_server import LiveServer
from PIL import Image

pytest.importorskip("fastapi")
from helpers import post

from srpo_infer import GenerationRequest
from srpo_infer.server import SafetyChecker, create_app
from srpo_infer.server.worker import ServiceTimes, Worker

SEED_DOC = Path(__file__).resolve().parents[2] / "shared" / "seed" / "000_c8be228e0ff0d73b.txt"
SEED_DOC_MISSING = "needs the hosted API's seed document (../shared/seed/), which only the project's checkouts have"
FAST = {"num_inference_steps": 2, "image_size": "square"}


@pytest.fixture(scope="module")
def server(tiny_pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    (out.parent / "secret.txt").write_text("do not serve me")
    with LiveServer(make_app=lambda url: create_app(tiny_pipe, output_dir=out, max_queue=32, public_url=url)) as live:
        live.out = out
        yield live


def test_seed_example_body(server):
    body = {
        "model": "flux/srpo",
        "prompt": "A T-Rex relaxing on a beach, lying on a sun lounger and wearing sunglasses.",
        "image_size": {"width": 1440, "height": 512},
        "num_inference_steps": 3,
    }
    r = post(server, body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) >= {"images", "timings", "seed", "has_nsfw_concepts", "prompt", "data", "meta"}
    image = data["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (1440, 512, "image/jpeg")
    assert data["data"] == data["images"] and data["prompt"] == body["prompt"]
    assert isinstance(data["timings"]["inference"], float) and isinstance(data["seed"], int)
    assert data["has_nsfw_concepts"] == [None]  # no checker configured: null, never false
    assert isinstance(data["meta"]["usage"]["tokens_used"], int)
    assert image["url"].startswith(f"{server.url}/files/")  # absolute, from the server's own address
    fetched = httpx.get(image["url"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).size == (1440, 512)


@pytest.mark.skipif(not SEED_DOC.exists(), reason=SEED_DOC_MISSING)
def test_the_seed_docs_python_example_runs_unchanged_but_for_the_url(server, capsys):
    pytest.importorskip("requests")
    code = SEED_DOC.read_text().split("```python", 1)[1].split("```", 1)[0]
    code = code.replace("https://api.aimlapi.com", server.url)
    exec(compile(code, "seed_example.py", "exec"), {"__name__": "__main__"})
    data = json.loads(capsys.readouterr().out)
    assert data["images"][0]["width"] == 1440 and data["images"][0]["height"] == 512
    import requests  # what the example's user does next: download the image they were given

    fetched = requests.get(data["images"][0]["url"], timeout=30)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (1440, 512)


@pytest.mark.parametrize(
    "change, status, field",
    [
        ({"image_size": {"width": 1000, "height": 512}}, 422, "image_size.ImageSize.width"),
        ({"image_size": {"width": 512, "height": 2048}}, 422, "image_size.ImageSize.height"),
        ({"image_size": "huge"}, 422, "image_size"),
        ({"image_size": {"width": 512, "height": 512, "depth": 1}}, 422, "image_size"),
        ({"num_inference_steps": 0}, 422, "num_inference_steps"),
        ({"num_inference_steps": 51}, 422, "num_inference_steps"),
        ({"guidance_scale": 0.5}, 422, "guidance_scale"),
        ({"guidance_scale": 21}, 422, "guidance_scale"),
        ({"num_images": 5}, 422, "num_images"),
        ({"seed": -1}, 422, "seed"),
        ({"seed": 2**63}, 422, "seed"),
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "   "}, 422, "prompt"),
        ({"prompt": "x" * 4001}, 422, "prompt"),
        ({"output_format": "webp"}, 422, "output_format"),
        ({"acceleration": "turbo"}, 422, "acceleration"),
        ({"model": "flux/dev"}, 404, "model"),
    ],
)
def test_invalid_fields(server, change, status, field):
    r = post(server, {"prompt": "a cat", **FAST, **change})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status
    assert error.get("field", "").startswith(field.split(".")[0]), error
    assert field.split(".")[-1] in error["message"] or field.split(".")[-1] in error.get("field", "")


@pytest.mark.parametrize(
    "preset, size", [("square_hd", (1024, 1024)), ("portrait_16_9", (576, 1024)), ("landscape_16_9", (1024, 576))]
)
def test_presets(server, preset, size):
    r = post(server, {"prompt": "a cat", "num_inference_steps": 1, "image_size": preset})
    assert r.status_code == 200, r.text
    assert (r.json()["images"][0]["width"], r.json()["images"][0]["height"]) == size


def test_sync_mode_returns_data_uris_and_png(server):
    r = post(
        server, {"prompt": "a cat", **FAST, "sync_mode": True, "output_format": "png", "num_images": 2, "seed": 77}
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["seed"] == 77 and len(data["images"]) == 2
    for image in data["images"]:
        assert image["url"].startswith("data:image/png;base64,") and image["content_type"] == "image/png"
        png = base64.b64decode(image["url"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).format == "PNG"


def test_malformed_json_and_non_object_bodies(server):
    r = httpx.post(
        f"{server.url}/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/images/generations", json=[1, 2])
    assert r.status_code == 400
    r = httpx.post(f"{server.url}/v1/images/generations", json={})
    assert r.status_code in (400, 422) and "prompt" in r.json()["error"]["message"]


def test_oversized_bodies_get_413(server):
    big = {"prompt": "a" * 100_000}
    assert post(server, big).status_code == 413

    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    r = httpx.post(
        f"{server.url}/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


def test_twenty_concurrent_clients_all_answered(server):
    def one(i):
        return post(server, {"prompt": f"a cat number {i}", **FAST, "num_inference_steps": 1, "seed": 1000 + i})

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(one, range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    seeds = sorted(r.json()["seed"] for r in responses)
    assert seeds == list(range(1000, 1020))
    names = {Path(r.json()["images"][0]["url"]).name for r in responses}
    assert len(names) == 20 and all((server.out / n).is_file() for n in names)


@pytest.mark.parametrize(
    "path",
    [
        "/files/..%2fsecret.txt",
        "/files/%2e%2e%2fsecret.txt",
        "/files/../secret.txt",
        "/files/..%5csecret.txt",
        "/files/secret.txt",
        "/files/%2fetc%2fpasswd",
        "/files/" + "0" * 32 + ".png",
        "/files/.",
    ],
)
def test_no_path_outside_the_output_folder(server, path):
    r = httpx.get(server.url + path)
    assert r.status_code == 404
    assert b"do not serve me" not in r.content and b"root:" not in r.content


def test_health_metrics_and_playground(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    post(server, {"prompt": "a cat", **FAST})
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "srpo_queue_depth",
        "srpo_images_served_total",
        "srpo_generation_seconds_bucket",
        'srpo_responses_total{code="200"}',
    ):
        assert name in text
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "v1/images/generations" in page.text and 'id="prompt"' in page.text


class Wrapped:
    """The tiny pipeline with a hook before each generation (block, fail, …)."""

    def __init__(self, pipe, before):
        self.pipe, self.before = pipe, before

    def generate(self, *args, **kwargs):
        self.before()
        return self.pipe.generate(*args, **kwargs)


def test_auth(tiny_pipe, tmp_path):
    with LiveServer(create_app(tiny_pipe, output_dir=tmp_path, api_key="s3cret")) as live:
        body = {"prompt": "a cat", **FAST}
        assert post(live, body).status_code == 401
        r = post(live, body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert post(live, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{live.url}/health").status_code == 200  # probes need no key


def test_queue_full_gets_429_with_retry_after(tiny_pipe, tmp_path):
    gate = threading.Event()
    # A clock that stands still: the running job has used none of its time, whatever the machine's speed.
    worker = Worker(max_queue=1, clock=lambda: 0.0)
    worker.times = ServiceTimes(initial=10.0)  # as if measured: 10 s per megapixel-step
    app = create_app(backend=worker, output_dir=tmp_path)
    app.state.set_pipeline(Wrapped(tiny_pipe, lambda: gate.wait(60)))
    with LiveServer(app) as live, ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, live, {"prompt": "first", **FAST})
        while not app.state.worker.busy:
            threading.Event().wait(0.01)
        queued = pool.submit(post, live, {"prompt": "second", **FAST})
        while app.state.worker.depth < 1:
            threading.Event().wait(0.01)
        refused = post(live, {"prompt": "third", **FAST})
        # Two 512², 2-step jobs ahead (0.52 megapixel-steps each) at 10 s each: 11 s, rounded up.
        assert refused.status_code == 429 and refused.headers["retry-after"] == "11"
        assert "about 11 s of work ahead" in refused.json()["error"]["message"]
        gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_the_worker_releases_cached_gpu_memory_after_an_out_of_memory_error_only(monkeypatch):
    """Cached blocks let the next request allocate without cudaMalloc: kept after a job that succeeded
    or failed otherwise, given back after an out-of-memory error."""
    import torch

    from srpo_infer.server import worker as worker_module

    released = []
    monkeypatch.setattr(worker_module, "release_cuda_cache", lambda: released.append(1))

    class Failing:
        def generate(self, request, **_):
            if request.prompt == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if request.prompt == "bad":
                raise ValueError("not memory")
            return "done"

    worker = Worker(max_queue=4)
    worker.pipeline = Failing()
    assert worker.submit(GenerationRequest("fine", 512, 512)).future.result(30) == "done"
    with pytest.raises(ValueError):
        worker.submit(GenerationRequest("bad", 512, 512)).future.result(30)
    assert released == []
    with pytest.raises(torch.OutOfMemoryError):
        worker.submit(GenerationRequest("oom", 512, 512)).future.result(30)
    assert worker.stop(5) == 0 and released == [1]


def test_out_of_memory_fails_one_request_and_the_server_keeps_serving(tiny_pipe, tmp_path):
    failures = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")]

    def maybe_fail():
        if failures:
            raise failures.pop()

    with LiveServer(create_app(Wrapped(tiny_pipe, maybe_fail), output_dir=tmp_path)) as live:
        r = post(live, {"prompt": "a cat", **FAST})
        assert r.status_code == 503 and "out of memory" in r.json()["error"]["message"]
        assert "Traceback" not in r.text
        assert post(live, {"prompt": "a cat", **FAST}).status_code == 200


def test_internal_errors_leak_no_details(tiny_pipe, tmp_path):
    def boom():
        raise RuntimeError("secret internals at /srv/model.py line 42")

    with LiveServer(create_app(Wrapped(tiny_pipe, boom), output_dir=tmp_path)) as live:
        r = post(live, {"prompt": "a cat", **FAST})
        assert r.status_code == 500 and r.json() == {"error": {"message": "internal server error", "status": 500}}


def test_loading_state_answers_503(tiny_pipe, tmp_path):
    app = create_app(None, output_dir=tmp_path)
    with LiveServer(app) as live:
        assert httpx.get(f"{live.url}/health").status_code == 503
        r = post(live, {"prompt": "a cat", **FAST})
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
        app.state.set_pipeline(tiny_pipe)
        assert post(live, {"prompt": "a cat", **FAST}).status_code == 200


def test_safety_checker_blacks_out_flagged_images(tiny_pipe, tmp_path):
    checker = SafetyChecker.load("tiny-random")
    with torch.no_grad():
        checker.model.concept_embeds_weights.fill_(-1.0)  # every image scores above its threshold
    with LiveServer(create_app(tiny_pipe, output_dir=tmp_path, safety_checker=checker)) as live:
        r = post(live, {"prompt": "a cat", **FAST, "sync_mode": True, "num_images": 2})
        assert r.json()["has_nsfw_concepts"] == [True, True]
        png = base64.b64decode(r.json()["images"][0]["url"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).convert("L").getextrema() == (0, 0)
        r = post(live, {"prompt": "a cat", **FAST, "enable_safety_checker": False})
        assert r.json()["has_nsfw_concepts"] == [None]  # not checked, said so


def test_safety_checker_passes_clean_images(tiny_pipe, tmp_path):
    checker = SafetyChecker.load("tiny-random")
    with torch.no_grad():
        checker.model.concept_embeds_weights.fill_(10.0)  # nothing scores that high
        checker.model.special_care_embeds_weights.fill_(10.0)
    with LiveServer(create_app(tiny_pipe, output_dir=tmp_path, safety_checker=checker)) as live:
        r = post(live, {"prompt": "a cat", **FAST})
        assert r.json()["has_nsfw_concepts"] == [False]


def test_mount_inside_another_fastapi_app(tiny_pipe, tmp_path):
    from fastapi import FastAPI

    outer = FastAPI()

    @outer.get("/ping")
    def ping():
        return {"pong": True}

    outer.mount("/srpo", create_app(tiny_pipe, output_dir=tmp_path))
    with LiveServer(outer) as live:
        assert httpx.get(f"{live.url}/ping").json() == {"pong": True}
        r = httpx.post(f"{live.url}/srpo/v1/images/generations", json={"prompt": "a cat", **FAST}, timeout=60)
        assert r.status_code == 200
        url = r.json()["images"][0]["url"]
        assert url.startswith("/srpo/files/") and httpx.get(live.url + url).status_code == 200


@pytest.mark.slow  # a second server process (~15 s); the README's serve command runs in the main suite
def test_serve_command_end_to_end(tmp_path):
    """srpo-infer serve: /health says loading, then ok; the API answers; an API key is enforced."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time

    exe = shutil.which("srpo-infer") or str(Path(sys.executable).parent / "srpo-infer")
    if not Path(exe).exists():
        pytest.skip("srpo-infer is not installed in this environment")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SRPO_API_KEY": "k3y", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [exe, "serve", "--model", "tiny-random", "--port", str(port), "--output-dir", str(tmp_path), "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        statuses = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(f"{url}/health", timeout=5).status_code)
            except httpx.TransportError:
                pass
            if statuses and statuses[-1] == 200:
                break
            time.sleep(0.2)
        assert statuses and statuses[-1] == 200, statuses
        body = {"prompt": "a cat", **FAST}
        assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 401
        r = httpx.post(f"{url}/v1/images/generations", json=body, headers={"Authorization": "Bearer k3y"}, timeout=60)
        image_url = r.json()["images"][0]["url"]
        assert r.status_code == 200 and image_url.startswith(url + "/files/")  # absolute: the listen address
        assert httpx.get(image_url).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------- OpenAI's images API


def test_the_openai_sdk_gets_images(server):
    """OpenAI's own Python SDK pointed at the server: b64_json and url responses, and a bad size."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    steps = {"num_inference_steps": 1}  # flux/srpo's own fields ride along as extra_body
    r = client.images.generate(
        model="flux/srpo", prompt="a lighthouse", size="768x512", n=2, response_format="b64_json", extra_body=steps
    )
    assert isinstance(r.created, int) and r.created > 0 and len(r.data) == 2
    for item in r.data:
        assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (768, 512)
        assert item.url is None
    r = client.images.generate(
        model="flux/srpo", prompt="a lighthouse", size="768x512", response_format="url", extra_body=steps
    )
    assert r.data[0].url.startswith(f"{server.url}/files/")
    assert Image.open(io.BytesIO(httpx.get(r.data[0].url).content)).size == (768, 512)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.images.generate(model="flux/srpo", prompt="x", size="1000x768", extra_body=steps)
    assert "width must be an integer in [512, 1536] and a multiple of 32, got 1000" in str(refused.value)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"n": 2, "num_images": 3}, "n (2) and num_images (3) disagree"),
        ({"size": "512x512", "image_size": "square_hd"}, "size (512x512) and image_size (1024x1024) disagree"),
        ({"quality": "hd"}, "quality is an OpenAI image-API option flux/srpo has no equivalent for"),
        ({"style": "vivid"}, "describe the style in the prompt"),
        ({"image_size": {"width": 512}}, "image_size needs both width and height"),
        ({"n": 9}, "n must be in [1, 4], got 9"),
        ({"size": "huge"}, "size"),
    ],
)
def test_openai_fields_and_their_flux_twins(server, change, words):
    r = post(server, {"prompt": "a cat", "num_inference_steps": 2, **change})
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text


def test_openai_defaults_and_agreeing_twins_are_accepted(server):
    body = {
        "prompt": "a cat",
        "num_inference_steps": 2,
        "size": "512x512",
        "image_size": "square",
        "n": 1,
        "num_images": 1,
        "quality": "auto",
        "user": "someone",
        "response_format": "url",
    }
    r = post(server, body)
    assert r.status_code == 200, r.text
    assert (r.json()["images"][0]["width"], r.json()["images"][0]["height"]) == (512, 512)
    assert isinstance(r.json()["created"], int)


def test_every_unknown_field_is_named_at_once(server):
    r = post(server, {"prompt": "a cat", "num_inferance_steps": 2, "sead": 3, **FAST})
    message = r.json()["error"]["message"]
    assert r.status_code == 422, r.text
    assert "'num_inferance_steps' (did you mean 'num_inference_steps'?)" in message
    assert "'sead' (did you mean 'seed'?)" in message


def test_nan_and_infinity_are_not_numbers_here(server):
    for raw in ("NaN", "Infinity"):
        r = httpx.post(
            f"{server.url}/v1/images/generations",
            timeout=60,
            headers={"content-type": "application/json"},
            content=f'{{"prompt": "a cat", "guidance_scale": {raw}}}',
        )
        assert r.status_code == 422 and "must be a finite number" in r.json()["error"]["message"], r.text


def test_metrics_time_generations_and_count_refusals(tiny_pipe, tmp_path):
    with LiveServer(create_app(tiny_pipe, output_dir=tmp_path)) as live:
        assert post(live, {"prompt": "a cat", **FAST}).status_code == 200
        for _ in range(3):
            assert post(live, {"prompt": "a cat", "num_inference_steps": 0}).status_code == 422
        text = httpx.get(f"{live.url}/metrics").text
    assert "srpo_generation_seconds_count 1\n" in text  # the generation, not the refusals
    assert 'srpo_responses_total{code="422"} 3' in text and 'srpo_responses_total{code="200"} 1' in text


def test_a_generations_body_is_parsed_once(tiny_pipe, tmp_path, monkeypatch):
    """The JSON text becomes Python once (duplicate keys and lone surrogates refused in that parse) and
    that object is checked against the schema once: no second parse by the framework or by us."""
    from fastapi.testclient import TestClient

    from srpo_infer.server.schema import GenerationBody

    raw = json.dumps({"prompt": "a kite", "image_size": "square", "num_inference_steps": 1}).encode()
    parses, validations = [], []
    real_loads, real_validate = json.loads, GenerationBody.model_validate.__func__

    def loads(text, *args, **kwargs):
        if text in (raw, raw.decode()):
            parses.append(1)
        return real_loads(text, *args, **kwargs)

    def validate(cls, *args, **kwargs):
        validations.append(1)
        return real_validate(cls, *args, **kwargs)

    monkeypatch.setattr(json, "loads", loads)
    monkeypatch.setattr(GenerationBody, "model_validate", classmethod(validate))
    monkeypatch.setattr(
        GenerationBody, "model_validate_json", classmethod(lambda *a, **k: pytest.fail("a second parse"))
    )
    with TestClient(create_app(tiny_pipe, output_dir=tmp_path)) as client:
        r = client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert (len(parses), len(validations)) == (1, 1)
    body = create_app(tiny_pipe, output_dir=tmp_path).openapi()["paths"]["/v1/images/generations"]["post"]
    assert body["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerationBody")


def test_deeply_nested_or_non_json_bodies_are_refused_not_a_500(tiny_pipe, tmp_path):
    from fastapi.testclient import TestClient

    url = "/v1/images/generations"
    with TestClient(create_app(tiny_pipe, output_dir=tmp_path)) as client:
        json_type = {"content-type": "application/json"}
        deep = client.post(url, content=b"[" * 5000 + b"]" * 5000, headers=json_type)
        assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
        inner = client.post(url, content=b'{"prompt":"a","x":' + b"[" * 5000 + b"]" * 5000 + b"}", headers=json_type)
        assert inner.status_code == 400, inner.text
        text = client.post(url, content=b'{"prompt": "a"}', headers={"content-type": "text/plain"})
        assert text.status_code == 415 and "Content-Type: application/json" in text.json()["error"]["message"]
        bare = client.post(url, content=json.dumps({"prompt": "a", "num_inference_steps": 1, "image_size": "square"}))
        assert bare.status_code == 200, bare.text  # curl -d without -H sends no JSON type: taken as JSON
