"""The server under hostile clients, on both of uvicorn's HTTP parsers (#37): bounded header blocks,
slow readers that cannot hold the connection cap, text that cannot be encoded, exact routes, a LoRA
folder holding a FIFO or a link out, hang-ups that leave no pending task, JSON parser errors, a
Retry-After that follows the machine's measured pace, one Allow per method, and /docs off by default."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import PARSERS, LiveServer, wait_until
from PIL import Image

pytest.importorskip("fastapi")
from srpo_infer.pipeline import GenerationCancelled
from srpo_infer.request import GenerationRequest
from srpo_infer.result import GenerationResult
from srpo_infer.server import create_app
from srpo_infer.server.limits import ConnectionLimits

WAIT_S = 60  # how long a socket read or a condition may take: far past every limit under test


class Gated:
    """A pipeline that runs a step only when the test releases one, asking ``should_stop`` before each
    step as the real loop does; ``stream: true`` previews are not sent (none are asked for here)."""

    def __init__(self, open_gate: bool = False):
        self.gate = None if open_gate else threading.Semaphore(0)
        self.should_stop = None

    def generate(self, request, *, progress=None, should_stop=None, previews=0, on_preview=None):
        self.should_stop = should_stop
        for _ in range(request.num_inference_steps):
            if self.gate is not None:
                self.gate.acquire()
            if should_stop is not None and should_stop():
                raise GenerationCancelled("stopped")
        return GenerationResult(
            images=[Image.new("RGB", (request.width, request.height))] * request.num_images,
            request=dataclasses.replace(request, seed=request.seed or 0),
            timings={"inference": 0.0},
            has_nsfw_concepts=[None] * request.num_images,
        )


@pytest.fixture(scope="module", params=PARSERS)
def hostile_server(request, tmp_path_factory):
    """One server per parser for the tests that change nothing in it."""
    app = create_app(Gated(open_gate=True), output_dir=tmp_path_factory.mktemp("out"))
    with LiveServer(app, http=request.param) as server:
        yield server


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # set before connecting: the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT_S)
    sock.connect(("127.0.0.1", port))
    return sock


def _response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of what the server sent until it closed the connection (or WAIT_S)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1]) if lines[0].startswith(b"HTTP/1.1 ") else 0
    headers = dict(line.decode().lower().split(": ", 1) for line in lines[1:] if b": " in line)
    return status, headers, body


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- 1. header blocks


def test_a_completed_header_block_over_the_limit_gets_431_json_and_is_closed(tmp_path, parser):
    with LiveServer(create_app(None, output_dir=tmp_path), http=parser) as hostile_server:
        with _connect(hostile_server.port) as sock:  # a 15 KB block is under the 16 KB default: answered
            pad = b"X-Pad: " + b"a" * 15000 + b"\r\n"
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + pad + b"Connection: close\r\n\r\n")
            assert _response(sock)[0] == 503  # loading: but read and answered
        with _connect(hostile_server.port) as sock:
            block = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 2_000_000 + b"\r\n\r\n"
            try:
                sock.sendall(block)  # 2 MB that does end: refused at its 16th KB
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before the client finished sending
            status, headers, body = _response(sock)
    assert status == 431 and headers["content-type"] == "application/json", (status, body[:200])
    assert json.loads(body)["error"]["message"] == "request headers over 16384 bytes (request line included)"


def test_a_header_flood_costs_the_server_little_memory(tmp_path, parser):
    """4 connections each try to stream 48 MB of 8 KB header lines that never end the block; each gets a
    431 after its first 16 KB and the server grows by well under 150 MB (it grew by 1.2 GB under
    httptools). Bounded: the loop stops after its 48 MB, or at the first refused send."""
    line = b"X-Flood: " + b"f" * 8180 + b"\r\n"
    limits = ConnectionLimits(header_timeout=600.0)
    with LiveServer(create_app(None, output_dir=tmp_path), limits=limits, http=parser) as hostile_server:
        before, peak = _rss_bytes(), 0
        socks = [_connect(hostile_server.port) for _ in range(4)]
        open_ = set(range(4))
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(48 * 1024 * 1024 // len(line)):
            for i in list(open_):
                try:
                    socks[i].sendall(line)
                except OSError:  # reset by the server after its 431
                    open_.discard(i)
            peak = max(peak, _rss_bytes())
            if not open_:
                break
        assert not open_, f"the server read all {48 * len(socks)} MB of headers without refusing them"
        statuses = [_response(sock)[0] for sock in socks]
        for sock in socks:
            sock.close()
    assert statuses == [431] * 4
    assert peak - before < 150 * 2**20, f"grew by {(peak - before) / 2**20:.0f} MB"


# ----------------------------------------------------------------------------- 2. slow readers


def test_slow_readers_cannot_hold_the_connection_cap(tmp_path, parser):
    """3 clients that read nothing of a 12 MB image hold all 3 connections; with a 1 s send timeout
    they are dropped and /health answers 200 again (it stayed 503 for minutes without one)."""
    app = create_app(Gated(open_gate=True), output_dir=tmp_path)
    name = app.state.store.save(bytes(12 * 2**20), "png")  # more than the kernel's socket buffers hold
    limits = ConnectionLimits(max_connections=3, send_timeout=1.0)
    with LiveServer(app, limits=limits, http=parser) as hostile_server:
        readers = [_connect(hostile_server.port, rcvbuf=4096) for _ in range(3)]
        for sock in readers:
            sock.sendall(f"GET /files/{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        connections, answering = hostile_server.server.server_state.connections, set()

        def all_three_answered() -> bool:  # seen over time: on a slow machine one may be dropped already
            answering.update(id(c) for c in list(connections) if getattr(c, "cycle", None) is not None)
            return len(answering) >= 3

        wait_until(all_three_answered, WAIT_S)
        # All three took a slot: until the send timeout drops them, a new connection is refused. Then
        # /health is 200 again, well within the margin.
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if httpx.get(f"{hostile_server.url}/health", timeout=WAIT_S).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the slow readers still hold every connection"
            time.sleep(0.1)
        for sock in readers:
            sock.close()


# ----------------------------------------------------------------------------- 3. lone surrogates

SURROGATE = '"\\ud800"'  # JSON's escape: it parses into a lone surrogate, which is not text
SURROGATE_BODIES = {
    "plain": ('{"prompt": %s, "num_inference_steps": 1, "image_size": "square", "sync_mode": true}', "prompt"),
    "openai": ('{"prompt": "a cat", "user": %s, "n": 1, "size": "512x512", "response_format": "b64_json"}', "user"),
    "stream": ('{"prompt": %s, "stream": true, "response_format": "b64_json", "image_size": "square"}', "prompt"),
    "lora": ('{"prompt": "a cat", "loras": [{"path": %s}]}', "loras.0.path"),
    "key": ('{"prompt": "a cat", %s: 1}', "\\ud800"),
}


@pytest.mark.parametrize("shape", list(SURROGATE_BODIES))
def test_a_lone_surrogate_in_any_field_is_a_422_naming_it(hostile_server, shape):
    template, field = SURROGATE_BODIES[shape]
    r = httpx.post(
        f"{hostile_server.url}/v1/images/generations",
        content=(template % SURROGATE).encode(),
        headers={"content-type": "application/json"},
        timeout=WAIT_S,
    )
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text[:300]
    error = r.json()["error"]
    assert error["field"] == field and "lone surrogate" in error["message"]


# ----------------------------------------------------------------------------- 4. exact routes


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health%0A"),
        ("GET", "/metrics%0A"),
        ("GET", "/v1/loras%0A"),
        ("POST", "/v1/images/generations%0A"),
        ("GET", "/health%0D%0A"),
        ("GET", "/metrics%09"),
        ("GET", "/health%00"),
    ],
)
def test_a_control_character_in_the_path_is_a_404(hostile_server, method, path):
    body = {"prompt": "a cat", "num_inference_steps": 1, "image_size": "square", "sync_mode": True}
    r = httpx.request(method, hostile_server.url + path, json=body if method == "POST" else None, timeout=WAIT_S)
    assert r.status_code == 404 and r.json()["error"]["status"] == 404, r.text[:200]


# ----------------------------------------------------------------------------- 5, 6. the LoRA folder


def _lora_folder(tmp_path: Path) -> tuple[Path, int]:
    """A LoRA folder with a file, a link to it, a folder, and links out (to another folder's file and to
    a system file); returns it and the size of the outside file."""
    from safetensors.torch import save_file

    torch = pytest.importorskip("torch")
    folder, outside = tmp_path / "loras", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    save_file({"x": torch.zeros(3)}, folder / "own.safetensors")  # not a LoRA: listed with the loader's sentence
    save_file({"x": torch.zeros(1000)}, outside / "secret.safetensors")
    (folder / "out.safetensors").symlink_to(outside / "secret.safetensors")
    (folder / "system.safetensors").symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/etc/passwd")
    (folder / "alias.safetensors").symlink_to(folder / "own.safetensors")  # inside: the same file
    (folder / "dir.safetensors").mkdir()
    return folder, (outside / "secret.safetensors").stat().st_size


def test_a_fifo_in_the_lora_folder_does_not_block_start_up(tmp_path):
    folder, _ = _lora_folder(tmp_path)
    os.mkfifo(folder / "pipe.safetensors")
    # A blocking open() of the FIFO holds the GIL (safetensors opens files in Rust), so the start-up
    # runs in a process of its own that a timeout can end.
    script = "import sys; from srpo_infer.server.loras import LoraLibrary; print(LoraLibrary(sys.argv[1]).refused)"
    try:
        command = [sys.executable, "-c", script, str(folder)]
        done = subprocess.run(command, cwd=tmp_path, timeout=WAIT_S / 2, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("start-up blocked on the FIFO in the LoRA folder")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'pipe.safetensors': 'not a regular file (a FIFO)'" in done.stdout
    assert "not serving pipe.safetensors: not a regular file (a FIFO)" in done.stderr


def test_links_out_of_the_lora_folder_are_refused_and_their_size_not_shown(tmp_path, caplog):
    from srpo_infer.server.loras import LoraLibrary

    folder, secret_size = _lora_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="srpo_infer.server.loras"):
        library = LoraLibrary(folder)
    listing = library.listing()
    assert {entry["name"] for entry in listing["data"]} == {"own.safetensors", "alias.safetensors"}
    assert secret_size not in {entry["bytes"] for entry in listing["data"]}
    log = caplog.text
    assert "out.safetensors: a symlink that leads out of the LoRA folder" in log
    assert "system.safetensors: a symlink that leads out" in log and "dir.safetensors: not a regular file" in log
    assert "2 adapters (alias.safetensors, own.safetensors), 3 refused" in log
    with pytest.raises(ValueError, match=r"'out\.safetensors' is not served: a symlink that leads out"):
        library.resolve("out.safetensors")


# ----------------------------------------------------------------------------- 7. hang-ups


def test_a_hang_up_mid_stream_leaves_no_pending_task(tmp_path, parser, caplog):
    """The stream's wait for the next preview is a task of its own: left pending at the hang-up, asyncio
    logged it as destroyed whenever the garbage collector found it. Checked both ways: no such task is
    alive after the hang-up, and none was destroyed pending."""
    pipe = Gated()
    app = create_app(pipe, output_dir=tmp_path)
    body = {"prompt": "a cat", "stream": True, "response_format": "b64_json", "num_inference_steps": 8}
    with caplog.at_level(logging.ERROR), LiveServer(app, http=parser) as hostile_server:
        with httpx.stream(
            "POST", f"{hostile_server.url}/v1/images/generations", json={**body, "image_size": "square"}
        ) as r:
            assert r.status_code == 200
            pipe.gate.release(1)
            wait_until(lambda: app.state.worker.busy, WAIT_S)
            loop = next(iter(hostile_server.server.server_state.connections)).loop
        # The client hung up with the generation waiting before a step.
        wait_until(lambda: pipe.should_stop is not None and pipe.should_stop(), WAIT_S)
        pipe.gate.release(100)
        wait_until(lambda: not app.state.worker.busy, WAIT_S)
        assert httpx.get(f"{hostile_server.url}/health", timeout=WAIT_S).status_code == 200  # the slot is free

        async def waiting_reads() -> list:
            await asyncio.sleep(0.05)  # a cancelled task finishes on one of the loop's next turns
            return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "Queue.get"]

        left = asyncio.run_coroutine_threadsafe(waiting_reads(), loop).result(WAIT_S)
        gc.collect()  # what the garbage collector would find later, found now
    destroyed = [rec for rec in caplog.records if "Task was destroyed but it is pending" in rec.getMessage()]
    assert not left and not destroyed, (left, destroyed[:1])


# ----------------------------------------------------------------------------- 8. the smaller ones


def test_a_request_the_parser_cannot_read_gets_a_json_400(hostile_server):
    with _connect(hostile_server.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n")
        status, headers, body = _response(sock)
    assert status == 400 and headers["content-type"] == "application/json", body[:200]
    assert json.loads(body)["error"]["message"].startswith("malformed HTTP request")


def test_allow_lists_each_method_once(hostile_server):
    r = httpx.request("OPTIONS", f"{hostile_server.url}/openapi.json")
    assert r.status_code == 405 and sorted(r.headers["allow"].split(", ")) == ["GET", "HEAD"]
    r = httpx.post(f"{hostile_server.url}/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


def test_docs_are_off_by_default_and_say_how_to_turn_them_on(hostile_server, tmp_path):
    r = httpx.get(f"{hostile_server.url}/docs")
    assert r.status_code == 404 and "--docs" in r.json()["error"]["message"]
    assert httpx.get(f"{hostile_server.url}/openapi.json").status_code == 200
    schema = httpx.get(f"{hostile_server.url}/openapi.json").json()
    assert "/docs" not in schema["paths"]
    assert httpx.get(f"{hostile_server.url}/redoc").status_code == 404
    on = create_app(None, output_dir=tmp_path, docs=True)
    assert any(getattr(route, "path", None) == "/docs" for route in on.routes)


def test_retry_after_follows_the_measured_pace_of_a_busy_machine():
    """Fake step times (a clock the test moves, no sleeping): the worker learns the jobs' times, then
    the machine gets 1.8× slower (another process takes the cores). The running job's measured steps
    show it at once, so the wait a 429 would announce is within 1.5× of the time the queue then takes."""
    from srpo_infer.server.worker import Worker

    now = [0.0]
    slowdown = [1.0]
    gate = threading.Event()
    paused_at = threading.Event()

    class Timed:
        def generate(self, request, *, should_stop=None, **_kw):
            now[0] += 2.0 * slowdown[0]  # the text encoder
            for step in range(request.num_inference_steps):
                if request.prompt == "block" and step == 10:
                    paused_at.set()
                    gate.wait(WAIT_S)
                should_stop()
                now[0] += 0.3 * request.cost / request.num_inference_steps * slowdown[0]
            now[0] += 1.0 * slowdown[0]  # the decoder

    worker = Worker(max_queue=3, clock=lambda: now[0])
    worker.pipeline = Timed()
    for w, h, steps in [(512, 512, 4), (1024, 1024, 8), (768, 512, 28), (1024, 768, 2)]:
        worker.submit(GenerationRequest("learn", w, h, num_inference_steps=steps)).future.result(WAIT_S)
    slowdown[0] = 1.8
    jobs = [worker.submit(GenerationRequest("block", 1024, 768, num_inference_steps=28))]
    assert paused_at.wait(WAIT_S)
    jobs += [worker.submit(GenerationRequest("q", w, h, num_inference_steps=s)) for w, h, s in [(1024, 1024, 28)] * 3]
    start = now[0]
    estimate = worker.expected_wait()
    gate.set()
    for job in jobs:
        job.future.result(WAIT_S)
    actual = now[0] - start
    assert actual / 1.5 <= estimate <= actual * 1.5, (estimate, actual)
    assert worker.stop(5) == 0


def test_the_send_timeout_and_header_limit_are_checked():
    with pytest.raises(ValueError, match="send_timeout must be > 0 seconds"):
        ConnectionLimits(send_timeout=0)
    with pytest.raises(ValueError, match="max_header_bytes must be >= 1024"):
        ConnectionLimits(max_header_bytes=100)


def test_the_pending_preview_read_is_cancelled_with_its_stream():
    """The small seam under the hang-up test: a stream cancelled while it waits for the next preview
    leaves no task behind (the one left pending was what asyncio later logged as destroyed)."""
    from srpo_infer.server.streaming import PreviewQueue, previews_then_result

    async def scenario():
        queue, future = PreviewQueue(), asyncio.get_running_loop().create_future()

        async def consume():
            async for _ in previews_then_result(queue, future):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)  # a cancelled task finishes on the loop's next turn
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(scenario()) == []
