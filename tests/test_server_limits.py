"""What one client may hold of the server, over raw sockets, under both of uvicorn's HTTP parsers:
smuggled and oversized bodies refused before they are read, half-open and trickling connections
closed within their limits while /health answers, the connection cap, and requests that must never
get a 500, a Host-built Location or a leaked internal."""

from __future__ import annotations

import logging
import socket
import threading

import httpx
import pytest
from live_server import LiveServer

pytest.importorskip("fastapi")
from srpo_infer.server import create_app
from srpo_infer.server.limits import ConnectionLimits, quiet_loop_errors

WAIT_S = 60  # how long a socket read may wait for the server: far past every limit under test


def _connect(live: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=WAIT_S)
    return sock


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and everything the server sent until it closed the connection (or WAIT_S)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


def _closed(sock: socket.socket) -> bool:
    """True when the server closed the connection (a read returns nothing or is reset) within WAIT_S."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _live(tmp_path, parser: str, **limits) -> LiveServer:
    return LiveServer(
        create_app(None, output_dir=tmp_path, body_timeout=limits.pop("body_timeout", 30.0)),
        limits=ConnectionLimits(**limits),
        http=parser,
    )


HEAD = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_content_length_with_chunked_is_refused_before_the_body_is_read(tmp_path, parser):
    with _live(tmp_path, parser) as live, _connect(live) as sock:
        # Declares 10 bytes, sends a chunked stream that would go on for 200 MB: only its first chunk is sent.
        sock.sendall(HEAD + b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n" + b"4000\r\n" + b"x" * 0x4000)
        status, data = _response(sock)
    assert status == 400, data[:300]  # ours under h11; httptools' own parser refuses it as well


def test_an_oversized_chunked_body_is_refused_at_the_limit(tmp_path, parser):
    with _live(tmp_path, parser) as live, _connect(live) as sock:
        sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):  # 80 KB of a body that claims to go on: the answer comes after the first 64 KB
            sock.sendall(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
        status, data = _response(sock)
    assert status == 413 and b"over 65536 bytes" in data


def test_a_declared_length_over_the_limit_is_refused_before_reading(tmp_path, parser):
    with _live(tmp_path, parser) as live, _connect(live) as sock:
        sock.sendall(HEAD + b"Content-Length: 209715200\r\n\r\n" + b"{")
        status, _ = _response(sock)
    assert status == 413


def test_half_open_connections_are_closed_and_health_answers_meanwhile(tmp_path, parser):
    with _live(tmp_path, parser, header_timeout=1.0) as live:
        socks = [_connect(live) for _ in range(20)]
        for sock in socks:
            sock.sendall(b"GET /hea")  # half a request line, then nothing
        assert httpx.get(f"{live.url}/health", timeout=WAIT_S).status_code == 503  # loading: but answered
        assert all(_closed(sock) for sock in socks)
        for sock in socks:
            sock.close()


def test_a_trickling_body_gets_408(tmp_path, parser):
    with _live(tmp_path, parser, body_timeout=1.0) as live, _connect(live) as sock:
        sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')  # and the rest never comes
        status, data = _response(sock)
    assert status == 408 and b"did not arrive within 1 s" in data


def test_at_the_cap_the_oldest_half_open_connection_makes_room(tmp_path, parser):
    with _live(tmp_path, parser, max_connections=8, header_timeout=600.0) as live:
        socks = [_connect(live) for _ in range(8)]
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # headers never finished
        # At the cap, /health still answers: its connection evicts the oldest half-open one.
        assert httpx.get(f"{live.url}/health", timeout=WAIT_S).status_code == 503
        assert _closed(socks[0])
        for sock in socks:
            sock.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_a_503(tmp_path, parser):
    with _live(tmp_path, parser, max_connections=4, body_timeout=600.0) as live:
        busy = [_connect(live) for _ in range(4)]
        for sock in busy:  # complete headers, a body still to come: real requests in progress
            sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n{")
        # Wait (on the server's own state, not a clock) until it has read every request's headers: before
        # that, a new connection would rightly evict one still sending them.
        connections = live.server.server_state.connections
        while sum(getattr(c, "cycle", None) is not None for c in list(connections)) < 4:
            threading.Event().wait(0.02)
        with _connect(live) as probe:
            status, data = _response(probe)
        assert status == 503 and b"too many open connections" in data
        for sock in busy:
            sock.close()


def test_a_resource_shortage_is_logged_once_per_interval(caplog):
    import asyncio
    import errno

    loop = asyncio.new_event_loop()
    try:
        quiet_loop_errors(loop)
        with caplog.at_level(logging.WARNING, logger="srpo_infer.server.limits"):
            for _ in range(1000):  # what a loop says on every failed accept() once descriptors run out
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
    finally:
        loop.close()
    lines = [r for r in caplog.records if "accept() failed" in r.getMessage()]
    assert len(lines) == 1 and "Too many open files" in lines[0].getMessage()


# ----------------------------------------------------------------------------- what a client sees

HEX = "0123456789abcdef0123456789abcdef"
ODD_PATHS = [
    f"/files/{HEX}.jpeg%0A",
    f"/files/{HEX}.jpeg\n",
    "/files/%00",
    "/files/..%2f..%2fetc%2fpasswd",
    "/files/" + "a" * 5000,
    "/files/x.jpeg/",
    "/health/",
    "/v1/images/generations/",
    "/%ff%fe",
    "/files/%c0%ae%c0%ae/",
    "/files/ＡＢＣ.png",
    "//files//x",
]


@pytest.mark.parametrize("path", ODD_PATHS)
def test_no_request_path_gets_a_500_or_a_redirect_built_from_host(tmp_path, path):
    with LiveServer(create_app(None, output_dir=tmp_path)) as live, _connect(live) as sock:
        target = path.encode("utf-8", "surrogateescape").replace(b"\n", b"%0A")
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        status, data = _response(sock)
    assert 400 <= status < 500, data[:300]
    assert b"evil.example" not in data and b"location:" not in data.lower()


def test_405_says_what_is_allowed_and_head_is_answered(tmp_path):
    with LiveServer(create_app(None, output_dir=tmp_path)) as live:
        r = httpx.post(f"{live.url}/health")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        r = httpx.get(f"{live.url}/v1/images/generations")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        head = httpx.head(f"{live.url}/health")
        assert head.status_code == 503 and head.content == b"" and int(head.headers["content-length"]) > 0
        assert httpx.head(f"{live.url}/files/0123456789abcdef0123456789abcdef.png").status_code == 404


def test_thousands_of_unknown_fields_cost_little_and_answer_briefly(tmp_path):
    body = {"prompt": "a cat", **{f"field_{i}": i for i in range(3000)}}
    with LiveServer(create_app(None, output_dir=tmp_path)) as live:
        r = httpx.post(f"{live.url}/v1/images/generations", json=body)
    assert r.status_code == 422 and len(r.content) < 4096
    assert "(and 2990 more)" in r.json()["error"]["message"]


def test_the_openapi_schema_says_what_files_and_health_return(tmp_path):
    schema = create_app(None, output_dir=tmp_path).openapi()
    files = schema["paths"]["/files/{name}"]["get"]["responses"]
    assert set(files["200"]["content"]) == {"image/jpeg", "image/png"} and "404" in files
    assert {"200", "500", "503"} <= set(schema["paths"]["/health"]["get"]["responses"])


def test_a_lost_context_parallel_peer_reaches_clients_without_internals(tmp_path):
    from srpo_infer.context_parallel import ContextParallelError

    internals = "[/opt/pytorch/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.1.2.3]:29500"

    class Broken:
        def generate(self, *_a, **_kw):
            raise ContextParallelError(internals)

    app = create_app(Broken(), output_dir=tmp_path)
    with LiveServer(app) as live:
        r = httpx.post(f"{live.url}/v1/images/generations", json={"prompt": "a cat"}, timeout=WAIT_S)
        health = httpx.get(f"{live.url}/health")
    assert r.status_code == 503 and health.status_code == 500
    for text in (r.text, health.text):
        assert "10.1.2.3" not in text and "pair.cc" not in text and "context-parallel group failed or is gone" in text


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"size": "５１２x５１２"}, 422, "size"),
        ({"size": "1" * 5000 + "x512"}, 422, "size"),
        ({"prompt": "\ufeff"}, 422, "non-empty"),
        ({"prompt": "\u200b \u200d"}, 422, "non-empty"),
    ],
)
def test_odd_values_are_refused_briefly(tmp_path, change, status, words):
    with LiveServer(create_app(None, output_dir=tmp_path)) as live:
        r = httpx.post(f"{live.url}/v1/images/generations", json={"prompt": "a cat", **change})
    assert r.status_code == status and words in r.json()["error"]["message"] and len(r.content) < 1024


def test_jpg_is_jpeg_on_the_server_as_in_the_library(tmp_path):
    from srpo_infer.request import check_output_format
    from srpo_infer.server.schema import GenerationBody

    assert check_output_format("jpg") == "jpeg"
    assert GenerationBody(prompt="a cat", output_format="jpg").output_format == "jpeg"


def test_orphan_markers_are_swept(tmp_path):
    from srpo_infer.server.storage import ImageStore

    store = ImageStore(tmp_path, sweep_every=None)
    name = store.save(b"\xff\xd8 not really a jpeg", "jpeg")
    (tmp_path / name).unlink()  # the image removed by hand: its marker is left
    (tmp_path / "notes.txt.srpo").write_text("not ours")  # a foreign file with the suffix stays
    store.sweep()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt.srpo"]
    assert store.read(store.save(b"x", "png")) == b"x"
