"""A real uvicorn server on a loopback port, in a background thread, for the HTTP tests."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time

import pytest

# uvicorn's two HTTP parsers: the server's limits must hold under each (h11 with the plain [server]
# extra; httptools, which uvicorn picks by itself once installed, as [dev] and uvicorn[standard] do).
PARSERS = [
    "h11",
    pytest.param(
        "httptools",
        marks=pytest.mark.skipif(not importlib.util.find_spec("httptools"), reason="httptools not installed"),
    ),
]


class LiveServer:
    """``LiveServer(app)``, or ``LiveServer(make_app=lambda url: create_app(..., public_url=url))`` for an
    app that must know its own address (absolute image URLs)."""

    def __init__(self, app=None, make_app=None, limits=None, http: str = "auto"):
        import uvicorn

        from srpo_infer.server.limits import ConnectionLimits, uvicorn_config

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = app if make_app is None else make_app(self.url)
        # The protocol `srpo-infer serve` runs: uvicorn's, with our connection limits.
        config = uvicorn_config(
            app,
            host="127.0.0.1",
            port=self.port,
            limits=limits or ConnectionLimits(),
            http=http,
            log_level="warning",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until(predicate, timeout: float = 120.0) -> None:
    """Until ``predicate()``: for an event the test has caused. The timeout only turns a hang into a
    failure, so it is generous enough for a busy machine."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
