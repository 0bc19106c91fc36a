"""The server for the people who run it, over real HTTP: failed loads, drains, strict requests,
abandoned jobs, the cost cap, storage that expires and fails loudly, no Host-header reflection."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from live_server import LiveServer, wait_until
from PIL import Image

pytest.importorskip("fastapi")
from helpers import free_port, post

from srpo_infer.pipeline import GenerationCancelled
from srpo_infer.request import GenerationRequest, validate_request
from srpo_infer.result import GenerationResult
from srpo_infer.server import create_app
from srpo_infer.server.storage import ImageStore

FAST = {"num_inference_steps": 2, "image_size": "square"}
SQUARE = {"image_size": "square"}


class SlowPipeline:
    """Takes the server's typed request as the real pipeline does, then ``step_s`` per step, asking
    ``should_stop`` before each one as the real denoising loop does; records what ran and what was stopped."""

    def __init__(self, step_s: float = 0.05):
        self.step_s = step_s
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.finished: list[str] = []

    def generate(self, request, *, progress=None, should_stop=None):
        req = request if request.seed is not None else dataclasses.replace(request, seed=0)
        prompt = req.prompt
        self.started.append(prompt)
        for _ in range(req.num_inference_steps):
            if should_stop is not None and should_stop():
                self.stopped.append(prompt)
                raise GenerationCancelled("stopped")
            time.sleep(self.step_s)
        self.finished.append(prompt)
        return GenerationResult(
            images=[Image.new("RGB", (req.width, req.height))] * req.num_images,
            request=req,
            timings={"inference": 0.0},
            has_nsfw_concepts=[None] * req.num_images,
        )


# ----------------------------------------------------------------------------- loading failures


def test_a_failed_load_shows_in_health_and_every_post(tmp_path):
    app = create_app(None, output_dir=tmp_path)
    with LiveServer(app) as robust_server:
        app.state.set_failed("CheckpointError: model file '/x.safetensors' does not exist")
        health = httpx.get(f"{robust_server.url}/health")
        assert health.status_code == 500
        assert health.json()["status"] == "failed" and "does not exist" in health.json()["reason"]
        r = post(robust_server.url, {"prompt": "a cat", **FAST})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert "does not exist" in r.json()["error"]["message"]


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "srpo_infer.cli",
        "serve",
        "--port",
        str(port),
        "--output-dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc, f"http://127.0.0.1:{port}"


def test_serve_exits_non_zero_when_the_model_cannot_load(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")  # exists, so it passes the early name check
    proc, _ = _serve(tmp_path, "--model", str(broken))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-2000:]
    assert "loading the model" in out and "broken.safetensors" in out


@pytest.mark.parametrize("worth", [False, True])
def test_serve_warms_up_only_what_a_request_reuses(worth, caplog):
    """``serve`` and Ray Serve replicas ask the pipeline whether warm-up leaves anything (its policy,
    tested below) and say so when it does not."""
    from srpo_infer.server.serve import warm_up

    calls = []
    pipe = SimpleNamespace(
        worth_warming_up=lambda: worth,
        warmup=lambda sizes, accelerations: calls.append((sizes, accelerations)),
    )
    with caplog.at_level("INFO", logger="srpo_infer"):
        assert warm_up(pipe, [(1024, 768)], ("none", "regular")) is worth
    assert calls == ([([(1024, 768)], ("none", "regular"))] if worth else [])
    assert ("nothing to warm up" in caplog.text) is not worth


def test_warmup_is_worth_it_for_compiled_graphs_and_kernel_tuning_not_for_an_eager_cpu_pipeline():
    """Compiled graphs and kernel autotuning are kept (and a GPU's lazy set-up); an eager CPU pipeline
    keeps nothing, where warming the real model would spend minutes."""
    import srpo_infer

    def load(**options):
        return srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, **options)

    assert not load().worth_warming_up()
    assert load(compile=True, compile_backend="eager", cache_dir=None).worth_warming_up()
    pytest.importorskip("triton", reason="the [triton] extra")
    assert load(attention="triton").worth_warming_up()


@pytest.mark.slow  # a real server process and 4 × 50 steps (~25 s): CI's slow step; drains' logic is tested in-process
def test_sigterm_drains_every_request_in_flight_then_exits_zero(tmp_path):
    # A drain time no busy machine can outlast: the test waits for the answers, not for a clock.
    proc, url = _serve(tmp_path, "--model", "tiny-random", "--default-acceleration", "none", "--drain-timeout", "3600")
    try:
        wait_until(lambda: _health(url) == 200, timeout=180)
        body = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 50, "seed": 1}
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, url, body, 900) for _ in range(4)]  # the last waits for three
            # All four accepted (one running, three queued) before the signal: a request arriving after
            # it is refused with 503 by design (tested in test_a_drain_that_runs_out_of_time_...).
            wait_until(lambda: _queue_depth(url) >= 3)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]  # a lost request raises here instead
        assert [a.status_code for a in answers] == [200] * 4, [a.text[:200] for a in answers]
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-2000:]
        assert "draining" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def _health(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.TransportError:
        return None


def _queue_depth(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=5).json()["queue_depth"]


def test_a_drain_that_runs_out_of_time_answers_the_rest_with_503(tmp_path):
    pipe = SlowPipeline(step_s=0.05)
    app = create_app(pipe, output_dir=tmp_path, max_queue=8)
    with LiveServer(app) as robust_server, ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(post, robust_server.url, {"prompt": f"job {i}", "num_inference_steps": 50}) for i in range(3)
        ]
        wait_until(lambda: app.state.worker.busy and app.state.worker.depth == 2)
        assert app.state.drain(0.3) == 3  # the running one stopped, two queued ones failed
        answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [503] * 3
        assert all("shut down" in a.json()["error"]["message"] for a in answers)
        assert len(pipe.stopped) == 1 and pipe.started == pipe.stopped and pipe.finished == []  # whichever ran first
        assert httpx.get(f"{robust_server.url}/health").json()["status"] == "draining"
        assert post(robust_server.url, {"prompt": "late", **FAST}).status_code == 503


# ----------------------------------------------------------------------------- strict requests


@pytest.fixture(scope="module")
def robust_server(tmp_path_factory):
    app = create_app(SlowPipeline(step_s=0.0), output_dir=tmp_path_factory.mktemp("out"), max_queue=32)
    with LiveServer(app) as server:
        server.app = app
        yield server


def test_unknown_fields_are_refused_with_the_nearest_name(robust_server):
    r = post(robust_server.url, {"prompt": "a cat", "num_inferance_steps": 1})
    assert r.status_code == 422
    assert r.json()["error"] == {
        "message": "unknown field 'num_inferance_steps': did you mean 'num_inference_steps'?",
        "field": "num_inferance_steps",
        "status": 422,
    }
    r = post(robust_server.url, {"prompt": "a cat", "zzz": 1})
    assert r.status_code == 422 and "known fields: model, prompt" in r.json()["error"]["message"]


def test_unknown_fields_can_be_allowed(tmp_path):
    with LiveServer(create_app(SlowPipeline(0.0), output_dir=tmp_path, allow_unknown_fields=True)) as server:
        assert post(server.url, {"prompt": "a cat", "num_inferance_steps": 1, **FAST}).status_code == 200


# (field, value): refused by the server (422 naming the field) and by the library (ValueError naming it).
WRONG_TYPES = [
    ("seed", True),
    ("seed", "7"),
    ("num_inference_steps", "2"),
    ("num_inference_steps", 2.0),
    ("num_images", True),
    ("guidance_scale", "4.5"),
    ("guidance_scale", True),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES)
def test_types_are_strict_and_the_same_in_server_and_library(robust_server, field, value):
    r = post(robust_server.url, {"prompt": "a cat", **FAST, field: value})
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    with pytest.raises(ValueError, match=field) as refused:
        validate_request("a cat", **{"width": 512, "height": 512, field: value})
    assert r.json()["error"]["message"] == str(refused.value)  # one voice: the same words, from the same code


@pytest.mark.parametrize(
    "change",
    [
        {"num_inference_steps": 0},
        {"guidance_scale": 25.0},
        {"num_images": 9},
        {"image_size": {"width": 500, "height": 512}},
        {"image_size": "huge"},
        {"seed": -1},
        {"acceleration": "fast"},
        {"output_format": "gif"},
    ],
)
def test_range_errors_are_the_librarys_words(robust_server, change):
    r = post(robust_server.url, {"prompt": "a cat", **FAST, **change})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "Input should" not in message and "must" in message, message
    assert r.json()["error"]["field"].endswith(message.split()[0])


@pytest.mark.parametrize("field", ["sync_mode", "enable_safety_checker"])
def test_booleans_are_strict(robust_server, field):
    r = post(robust_server.url, {"prompt": "a cat", **FAST, field: 1})
    assert r.status_code == 422 and r.json()["error"]["field"] == field


def test_duplicate_keys_are_refused(robust_server):
    raw = b'{"prompt": "a cat", "num_inference_steps": 2, "prompt": "a dog"}'
    r = httpx.post(
        f"{robust_server.url}/v1/images/generations", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt"
    assert "duplicate key 'prompt'" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- cost and abandonment


def test_the_cost_cap_refuses_expensive_requests(tmp_path):
    with LiveServer(create_app(SlowPipeline(0.0), output_dir=tmp_path, max_cost=5)) as server:
        r = post(server.url, {"prompt": "a cat", "image_size": "square_hd", "num_inference_steps": 28})
        assert r.status_code == 422 and r.json()["error"]["field"] == "num_inference_steps"
        assert "29.4 megapixel-steps" in r.json()["error"]["message"] and "at most 5" in r.json()["error"]["message"]
        assert post(server.url, {"prompt": "a cat", **FAST}).status_code == 200  # 0.5 megapixel-steps


def test_a_client_that_hangs_up_has_its_jobs_cancelled(tmp_path):
    pipe = SlowPipeline(step_s=0.05)
    app = create_app(pipe, output_dir=tmp_path)
    with LiveServer(app) as server:
        body = {"prompt": "running", "num_inference_steps": 50}  # 2.5 s of work
        first = _send_raw(server.port, body)
        wait_until(lambda: app.state.worker.busy)
        second = _send_raw(server.port, {**body, "prompt": "queued"})
        wait_until(lambda: app.state.worker.depth == 1)
        second.close()  # the queued client hangs up: its job leaves the queue
        wait_until(lambda: app.state.worker.depth == 0)
        first.close()  # then the running one's: its job stops at the next step
        wait_until(lambda: not app.state.worker.busy)
        assert pipe.stopped == ["running"]  # stopped at a step, not run to the end
        assert pipe.started == ["running"]  # the queued job never ran
        time.sleep(0.3)
        assert post(server.url, {"prompt": "next", **FAST}).status_code == 200  # the worker serves on


def _send_raw(port: int, body: dict) -> socket.socket:
    """A POST sent on a socket the test closes when it wants the client to hang up."""
    data = json.dumps(body).encode()
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return conn


def test_hung_up_queued_clients_free_their_queue_slots_at_once(tmp_path, caplog):
    """With --max-queue 3, three queued clients that hang up must not make the next request a 429."""
    import gc
    import logging

    caplog.set_level(logging.INFO, logger="srpo_infer")
    pipe = SlowPipeline(step_s=0.05)
    app = create_app(pipe, output_dir=tmp_path, max_queue=3)
    with LiveServer(app) as server, ThreadPoolExecutor(5) as pool:
        running = pool.submit(post, server.url, {"prompt": "running", "num_inference_steps": 50, **SQUARE})
        wait_until(lambda: app.state.worker.busy)
        # Three clients queue a request each and hang up once all three are queued (events, not timeouts).
        clients = [_send_raw(server.port, {"prompt": f"gone {i}", **FAST}) for i in range(3)]
        wait_until(lambda: app.state.worker.depth == 3)
        for client in clients:
            client.close()
        wait_until(lambda: app.state.worker.depth == 0)  # withdrawn while the first job still runs
        assert app.state.worker.busy
        assert post(server.url, {"prompt": "next", **FAST}).status_code == 200  # accepted, not 429
        assert running.result().status_code == 200
        assert httpx.get(f"{server.url}/health").json()["queue_depth"] == 0
    gc.collect()  # an unread future's exception is logged when it is collected
    assert pipe.started == ["running", "next"]
    assert not [r for r in caplog.records if r.exc_info or "never retrieved" in r.getMessage()]
    assert sum("client hung up" in r.getMessage() for r in caplog.records) == 3  # one line per hang-up


def test_a_mounted_app_still_requires_its_api_key(tmp_path):
    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/srpo", create_app(SlowPipeline(0.0), output_dir=tmp_path, api_key="k3y"))
    with LiveServer(outer) as server:
        assert post(f"{server.url}/srpo", {"prompt": "a cat", **FAST}).status_code == 401
        ok = post(f"{server.url}/srpo", {"prompt": "a cat", **FAST}, headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and ok.json()["images"][0]["url"].startswith("/srpo/files/")


# ----------------------------------------------------------------------------- storage and URLs


def test_image_urls_never_reflect_the_host_header(tmp_path):
    with LiveServer(create_app(SlowPipeline(0.0), output_dir=tmp_path)) as server:
        r = post(server.url, {"prompt": "a cat", **FAST}, headers={"Host": "evil.example"})
        url = r.json()["images"][0]["url"]
        assert r.status_code == 200 and url.startswith("/files/") and "evil" not in url
    app = create_app(SlowPipeline(0.0), output_dir=tmp_path, public_url="https://cdn.example.com/srpo/")
    with LiveServer(app) as server:
        r = post(server.url, {"prompt": "a cat", **FAST}, headers={"Host": "evil.example"})
        assert r.json()["images"][0]["url"].startswith("https://cdn.example.com/srpo/files/")


def test_an_unwritable_output_folder_shows_in_health_and_answers_503(tmp_path):
    out = tmp_path / "out"
    with LiveServer(create_app(SlowPipeline(0.0), output_dir=out)) as server:
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        shutil.rmtree(out)
        out.write_text("a file where the folder was")  # unwritable even for root
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "not writable" in health.json()["problems"][0]
        r = post(server.url, {"prompt": "a cat", **FAST})
        assert r.status_code == 503 and "sync_mode" in r.json()["error"]["message"]
        assert post(server.url, {"prompt": "a cat", **FAST, "sync_mode": True}).status_code == 200


def test_stored_images_expire_by_age_and_by_total_size(tmp_path):
    store = ImageStore(tmp_path, max_age=3600, max_bytes=3000, sweep_every=None)
    names = [store.save(bytes(1000), "png") for _ in range(5)]
    (tmp_path / "notes.txt").write_text("not ours: never deleted")
    # The size cap holds at write time: the 4th and 5th writes each removed the oldest image.
    assert [store.read(n) is not None for n in names] == [False, False, True, True, True]
    now = time.time()
    for i, name in enumerate(names[2:]):  # 2 hours, 50 and 40 minutes old
        age = (7200, 3000, 2400)[i]
        os.utime(tmp_path / name, (now - age, now - age))
    assert store.sweep(now) == 1  # names[2] by age
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".srpo")) == sorted(
        [*names[3:], "notes.txt"]
    )
    assert store.read(names[2]) is None and store.read(names[3]) == bytes(1000)
    assert store.read("../notes.txt") is None and store.read("notes.txt") is None  # only names it writes


def test_the_store_serves_and_deletes_only_regular_files_it_wrote(tmp_path):
    """A symlink, a directory, a symlink loop and a foreign file, each at a name the store would write."""
    out = tmp_path / "out"
    store = ImageStore(out, max_age=60, max_bytes=None, sweep_every=None)
    mine = store.save(b"\xff\xd8 mine", "jpeg")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    link, folder, loop, foreign = (f"{c * 32}.jpeg" for c in "abcd")
    (out / link).symlink_to(secret)
    (out / f"{link}.srpo").write_text("")  # even marked as ours, a link is never followed
    (out / folder).mkdir()
    (out / f"{folder}.srpo").write_text("")
    (out / loop).symlink_to(out / loop)
    (out / f"{loop}.srpo").write_text("")
    (out / foreign).write_bytes(b"someone else's")  # no marker: not ours
    for name in (link, folder, loop, foreign):
        assert store.read(name) is None, name
    with LiveServer(create_app(SlowPipeline(0.0), output_dir=out)) as server:
        for name in (link, folder, loop, foreign):
            assert httpx.get(f"{server.url}/files/{name}").status_code == 404, name
        assert httpx.get(f"{server.url}/files/{mine}").content == b"\xff\xd8 mine"
    store.clock = lambda: time.time() + 3600  # an hour later: everything is past its 60 s
    assert store.read(mine) is None  # refused at once, before any sweep
    assert store.sweep() == 1  # only its own image; the bad entries are skipped, not fatal
    assert (out / foreign).read_bytes() == b"someone else's" and secret.read_text() == "root:x:0:0"
    assert os.path.islink(out / link) and (out / folder).is_dir()


def test_an_idle_server_stops_serving_an_expired_image(tmp_path):
    """No write needed: an image past its retention is refused on read, and the timer's sweep removes it."""
    app = create_app(SlowPipeline(0.0), output_dir=tmp_path, retention_seconds=60)
    with LiveServer(app) as server:
        url = post(server.url, {"prompt": "a cat", **FAST}).json()["images"][0]["url"]
        assert httpx.get(server.url + url).status_code == 200
        app.state.store.clock = lambda: time.time() + 61
        assert httpx.get(server.url + url).status_code == 404


def test_retention_limits_are_checked():
    with pytest.raises(ValueError, match="retention age must be > 0"):
        ImageStore("/tmp/srpo-retention-check", max_age=0)


def test_retry_after_is_within_one_and_a_half_times_the_queues_real_time():
    """Jobs of known cost take known time (a fixed part plus a part per megapixel-step, on a clock the test
    moves): after a few jobs, the Retry-After of a full queue is within 1.5× of the time the queue
    then actually takes to drain."""
    from srpo_infer.server.worker import Worker

    now = [0.0]
    seconds = lambda cost: 4.0 + 0.8 * cost  # noqa: E731  # encode/decode plus the steps
    gates: dict[str, threading.Event] = {}
    done: list[str] = []

    class Timed:
        def generate(self, request, **_kw):
            gate = gates.get(request.prompt)
            if gate is not None:
                gate.wait(60)
            jitter = 1 + 0.15 * math.sin(len(done))  # no job takes exactly what the model says
            done.append(request.prompt)
            now[0] += seconds(request.cost) * jitter

    worker = Worker(max_queue=3, clock=lambda: now[0])
    worker.pipeline = Timed()
    sizes = [(512, 512, 4), (1024, 1024, 8), (768, 512, 28), (1024, 768, 2)]
    for w, h, steps in sizes:  # what the worker learns from
        worker.submit(GenerationRequest("learn", w, h, num_inference_steps=steps)).future.result(30)
    gates["block"] = threading.Event()
    queued = [(1024, 1024, 28), (512, 512, 4), (1536, 640, 16)]
    jobs = [worker.submit(GenerationRequest("block", 1024, 768, num_inference_steps=28))]
    wait_until(lambda: worker.busy)
    jobs += [worker.submit(GenerationRequest("q", w, h, num_inference_steps=s)) for w, h, s in queued]
    start = now[0]
    estimate = worker.expected_wait()  # what a 429 would say now
    gates["block"].set()
    for job in jobs:
        job.future.result(30)
    actual = now[0] - start
    assert actual / 1.5 <= estimate <= actual * 1.5, (estimate, actual)
    assert worker.stop(5) == 0


def test_an_fsspec_output_store_serves_and_expires_images():
    """``output_dir`` as an fsspec URL (memory:// here; s3://, gs:// alike), as replicas on several
    machines would share it."""
    import fsspec

    app = create_app(SlowPipeline(0.0), output_dir="memory://srpo-test/images")
    with LiveServer(app) as server:
        r = post(server.url, {"prompt": "a cat", **FAST})
        url = r.json()["images"][0]["url"]
        assert r.status_code == 200 and url.startswith("/files/")
        fetched = httpx.get(server.url + url)
        assert fetched.status_code == 200 and fetched.content[:2] == b"\xff\xd8"
        assert httpx.get(server.url + "/files/" + "0" * 32 + ".jpeg").status_code == 404
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/srpo-test/images/" + url.rsplit("/", 1)[1])[:2] == b"\xff\xd8"
    store = ImageStore("memory://srpo-sweep", max_age=None, max_bytes=2500, sweep_every=None)
    names = [store.save(bytes(1000), "png") for _ in range(4)]
    fs.pipe_file("/srpo-sweep/notes.txt", b"not ours")
    fs.pipe_file(f"/srpo-sweep/{'e' * 32}.png", b"not ours either")  # a matching name without our marker
    assert sum(store.read(n) is not None for n in names) == 2  # the cap held at each write: 2000 bytes
    assert store.sweep() == 0 and fs.cat_file(f"/srpo-sweep/{'e' * 32}.png") == b"not ours either"
    assert fs.cat_file("/srpo-sweep/notes.txt") == b"not ours"


class _NeverFinishing:
    """A backend (server.backend.Backend) whose jobs never finish: the request's fate is the handler's."""

    def __init__(self):
        from srpo_infer.server.backend import Capabilities, Job

        self.job = Job(GenerationRequest("a cat"))
        self.submitted = threading.Event()
        self.ready, self.depth, self.busy = True, 0, False
        self.capabilities = Capabilities(streams=False, adapters=False)

    def attach(self, pipeline) -> None:
        pass

    def expected_wait(self) -> float:
        return 0.0

    def submit(self, request, previews=0, on_preview=None):
        self.submitted.set()
        return self.job

    def cancel(self, job) -> None:
        job.cancel()

    def stop(self, drain_timeout: float = 60.0) -> int:
        return 0


def test_a_server_that_cancels_the_handler_on_hang_up_cancels_the_job(tmp_path):
    """Ray Serve's proxy (unlike uvicorn) cancels the request's task when its client hangs up, and no
    ``http.disconnect`` ever arrives: the job must be stopped then too."""
    import asyncio

    backend = _NeverFinishing()
    app = create_app(backend=backend, output_dir=tmp_path)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            request = asyncio.create_task(client.post("/v1/images/generations", json={"prompt": "a cat"}))
            while not backend.submitted.is_set():
                await asyncio.sleep(0.01)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(scenario())
    assert backend.job.stop.is_set() and backend.job.future.cancelled()


def test_the_size_cap_counts_what_a_restarted_store_already_holds(tmp_path):
    first = ImageStore(tmp_path, max_age=None, max_bytes=3000, sweep_every=None)
    old = [first.save(bytes(1000), "png") for _ in range(3)]
    restarted = ImageStore(tmp_path, max_age=None, max_bytes=3000, sweep_every=None)
    new = restarted.save(bytes(1000), "png")  # 4000 bytes: the oldest goes at this write, not a timer later
    assert sum(restarted.read(n) is not None for n in [*old, new]) == 3 and restarted.read(new) is not None
