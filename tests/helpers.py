"""Small helpers the test modules share: a free port, a POST to the generations route, an image's
pixels, the standard request. One definition each (issue 41's test hygiene)."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import time
from collections.abc import Sequence

import httpx
import numpy as np
from PIL import Image

from srpo_infer import GenerationRequest


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(server, body: dict, timeout: float = 120, **kw) -> httpx.Response:
    """``POST /v1/images/generations`` with ``body`` as JSON; ``server``: a URL or anything with ``.url``."""
    url = server if isinstance(server, str) else server.url
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout, **kw)


def pixels(image) -> np.ndarray:
    """An image's RGB pixels as int16 (differences do not wrap): a PIL image or base64 bytes of one."""
    if isinstance(image, str | bytes):
        image = Image.open(io.BytesIO(base64.b64decode(image)))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def standard_request(**changes) -> GenerationRequest:
    """The tests' usual request: small, seeded, two steps; ``changes`` replace fields."""
    fields = dict(prompt="a red fox in snow", width=512, height=512, seed=3, num_inference_steps=2)
    return GenerationRequest(**(fields | changes))


def wait_healthy(url: str, processes: Sequence[subprocess.Popen] = (), timeout: float | None = None) -> None:
    """Until ``url``'s ``/health`` answers 200. A process in ``processes`` that ends fails it at once,
    with its output; ``timeout`` in seconds (None: no clock, a failed start ends a process)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        for p in processes:
            assert p.poll() is None, p.stdout.read()[-3000:] if p.stdout else f"exited {p.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not become healthy in {timeout} s")


# torch.compile with the "eager" backend: dynamo's capture and graph count as with Inductor, no C++ build.
EAGER_COMPILE = dict(compile=True, compile_backend="eager")


def load_tiny(**options):
    """``tiny-random`` on the CPU, no progress bars, no compile cache on disk; ``options`` as load_pipeline's."""
    import srpo_infer

    return srpo_infer.load_pipeline(
        "tiny-random", **({"device": "cpu", "progress": False, "cache_dir": None} | options)
    )
