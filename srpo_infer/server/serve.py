"""``srpo-infer serve``: uvicorn in front of :func:`create_app`, with the model loading in the
background so ``/health`` can say "loading" (503) until it is warm."""

from __future__ import annotations

import logging
import os
import threading

from .app import create_app

log = logging.getLogger(__name__)


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    output_dir: str = "outputs",
    public_url: str | None = None,
    max_queue: int = 16,
    safety_checker: str | None = None,
    default_acceleration: str = "regular",
    warmup_sizes: list[tuple[int, int]] | None = None,
    **pipeline_options,
) -> None:
    """Start the server; blocks until it stops. ``pipeline_options`` go to :func:`load_pipeline`."""
    import uvicorn

    from ..config import resolve_device
    from ..loading import load_pipeline
    from .safety import SafetyChecker

    api_key = api_key or os.environ.get("SRPO_API_KEY") or None
    # The checker is small (CLIP-L vision); it runs where the model runs.
    checker = (
        SafetyChecker.load(safety_checker, resolve_device(pipeline_options.get("device"))) if safety_checker else None
    )
    app = create_app(None, api_key=api_key, output_dir=output_dir, public_url=public_url, max_queue=max_queue,
                     safety_checker=checker, default_acceleration=default_acceleration)  # fmt: skip

    def load() -> None:
        try:
            pipe = load_pipeline(model, progress=False, **pipeline_options)
            pipe.warmup(warmup_sizes or [(1024, 768)], accelerations=tuple({"none", default_acceleration}))
        except Exception:
            log.exception("loading the model failed; the server keeps answering 503")
            return
        app.state.set_pipeline(pipe)
        log.info("model %s loaded and warm; ready on http://%s:%d", model, host, port)

    threading.Thread(target=load, name="srpo-loader", daemon=True).start()
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can generate", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
