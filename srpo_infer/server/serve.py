"""``srpo-infer serve``: uvicorn in front of :func:`create_app`, with the model loading in the
background so ``/health`` can say "loading" (503) until it is warm.

- A model that fails to load is logged with its reason, ``/health`` says ``failed`` (500) and the
  process exits with status 1, so a supervisor sees it and restarts it.
- SIGTERM or SIGINT drains: no new requests (uvicorn closes the socket; requests on open connections
  get 503), every queued and running request is answered within ``drain_timeout`` seconds (those
  still waiting then get a clear 503), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import threading

from .app import create_app
from .limits import ConnectionLimits, quiet_loop_errors, uvicorn_config

log = logging.getLogger(__name__)

LOAD_FAILED_EXIT_CODE = 1


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
    default_acceleration: str | None = None,
    warmup_sizes: list[tuple[int, int]] | None = None,
    drain_timeout: float = 60.0,
    limits: ConnectionLimits | None = None,
    app_options: dict | None = None,
    lora_dir: str | None = None,
    **pipeline_options,
) -> int:
    """Start the server; blocks until it stops and returns the process exit code (0 after a clean
    drain, 1 when the model failed to load). ``app_options`` go to :func:`create_app`,
    ``pipeline_options`` to :func:`load_pipeline`. ``default_acceleration``: ``regular`` (the hosted API's),
    ``none`` with ``context_parallel`` (which does not cache steps yet). ``limits``: the connection cap and
    the header and body deadlines (:class:`~srpo_infer.server.limits.ConnectionLimits`; its defaults
    when None). ``lora_dir``: the folder of LoRA adapters requests may name (:mod:`.loras`); with it the
    pipeline keeps QKV unfused and, compiled, gets a hotswap slot before warm-up.

    With ``context_parallel=N`` every one of the N processes ``torchrun`` starts calls this: rank 0 serves
    HTTP, the others load the same pipeline and run each request with it (:mod:`.parallel`)."""
    parallel = pipeline_options.get("context_parallel", 1) > 1
    default_acceleration = resolve_default_acceleration(default_acceleration, parallel)
    warm = (warmup_sizes or [(1024, 768)], tuple(dict.fromkeys(("none", default_acceleration))))
    if parallel and int(os.environ.get("RANK", "0")) != 0:
        return _follow(model, pipeline_options, *warm)
    limits = limits or ConnectionLimits()
    sock = listen_socket(host, port)  # first: a busy port fails in one line, before anything loads or logs
    api_key = api_key or os.environ.get("SRPO_API_KEY") or None
    library = _lora_library(lora_dir, pipeline_options)
    app = create_app(
        None,
        loras=library,
        api_key=api_key,
        output_dir=output_dir,
        public_url=public_url or default_public_url(host, port),
        max_queue=max_queue,
        safety_checker=_safety_checker(safety_checker, pipeline_options),
        default_acceleration=default_acceleration,
        body_timeout=limits.body_timeout,
        **(app_options or {}),
    )
    config = uvicorn_config(
        app, host=host, port=port, limits=limits, log_level="info", timeout_graceful_shutdown=drain_timeout + 10
    )
    server = _draining_server(config, app, drain_timeout)

    def load() -> None:
        if _load(app, model, pipeline_options, library, *warm):
            log.info("model %s loaded; ready on http://%s:%d", model, host, port)
        else:
            server.exit_code, server.should_exit = LOAD_FAILED_EXIT_CODE, True

    threading.Thread(target=load, name="srpo-loader", daemon=True).start()
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can generate", host)
    server.run(sockets=[sock])
    return _exit_code(app, server.exit_code)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn to listen on, or a one-line ``ValueError`` naming the
    address and ``--port`` (uvicorn binds only after the app's start-up, and then logs six lines)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "another process is listening there: stop it or choose another with --port"
        if exc.errno != errno.EADDRINUSE:
            hint = "choose another address with --host or another port with --port"
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}): {hint}") from None
    return sock


def _follow(model: str, pipeline_options: dict, sizes: list, accelerations: tuple) -> int:
    """A context-parallel rank other than 0: load, warm up in step with rank 0, then run its requests."""
    from ..loading import load_pipeline
    from .parallel import follow

    pipe = load_pipeline(model, progress=False, **pipeline_options)
    warm_up(pipe, sizes, accelerations)
    return follow(pipe)


def _safety_checker(name: str | None, pipeline_options: dict):
    """The checker is small (CLIP-L vision); it runs where the model runs."""
    if not name:
        return None
    from ..config import resolve_device
    from .safety import SafetyChecker

    return SafetyChecker.load(name, resolve_device(pipeline_options.get("device")))


def _lora_library(lora_dir: str | None, pipeline_options: dict):
    """``--lora-dir``'s adapters, and the pipeline's ``lora_slot`` on the layers they target (QKV then
    stays unfused: they sit on to_q / to_k / to_v)."""
    if lora_dir is None:
        return None
    from .loras import LoraLibrary

    if pipeline_options.get("lora") is not None:
        raise ValueError("--lora and --lora-dir do not go together: put the LoRA in the folder and name it in requests")
    library = LoraLibrary(lora_dir)
    pipeline_options["lora_slot"] = library.slot_layers()  # installed in the ordered optimization function
    return library


def _draining_server(config, app, drain_timeout: float):
    """uvicorn's server, but a signal drains the queue first and the process then exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        exit_code = 0

        async def startup(self, sockets=None) -> None:
            quiet_loop_errors(asyncio.get_running_loop())  # a descriptor shortage logs once per interval
            await super().startup(sockets)

        def handle_exit(self, sig, frame) -> None:
            # Not uvicorn's own: it re-raises the signal after shutting down, so a drained server would
            # die of SIGTERM instead of exiting 0. A second SIGINT still forces the exit.
            if self.should_exit:
                self.force_exit = self.force_exit or sig == signal.SIGINT
                return
            log.info("signal %s: draining (up to %.0f s), then exiting", sig, drain_timeout)
            # Answer every queued and running request while uvicorn waits for open connections.
            threading.Thread(target=app.state.drain, args=(drain_timeout,), name="srpo-drain").start()
            self.should_exit = True

    return Server(config)


def _load(app, model: str, pipeline_options: dict, library, sizes: list, accelerations: tuple) -> bool:
    """Load and warm the pipeline, then hand it to the app; a failure is logged and shown in /health."""
    from ..loading import load_pipeline
    from .parallel import Leader

    try:
        pipe = load_pipeline(model, progress=False, **pipeline_options)
        if library is not None:
            library.install(pipe)  # the adapters checked against the transformer, kept in its host cache
        warm_up(pipe, sizes, accelerations)
        pipe.preview_decoder()  # fitted now, so the first stream: true request does not pay for it
        if pipe.context_parallel is not None:
            pipe = Leader(pipe)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("loading the model %r failed: %s", model, reason)
        app.state.set_failed(reason)
        return False
    app.state.set_pipeline(pipe)
    return True


def warm_up(pipe, sizes: list, accelerations: tuple) -> bool:
    """Warm up where a request reuses what warm-up leaves: compiled graphs, the Triton kernels' tuning,
    a GPU's lazy set-up; True if it did. An eager pipeline on a CPU keeps none of it, and there warming
    the real model would delay readiness by minutes (the tiny one by seconds) for nothing. Every
    context-parallel rank and Ray Serve replica decides the same, from the same options."""
    if pipe.worth_warming_up():
        pipe.warmup(sizes, accelerations=accelerations)
        return True
    log.info("eager on a CPU: nothing to warm up")
    return False


def _exit_code(app, code: int) -> int:
    """1 after a lost context-parallel peer (a supervisor should restart the group), else the server's."""
    from .parallel import Leader

    leader = app.state.worker.pipeline
    if isinstance(leader, Leader):
        leader.close()
        if leader.broken is not None:
            return 1
    return code


def resolve_default_acceleration(chosen: str | None, context_parallel: bool = False) -> str:
    """What requests that name no ``acceleration`` get: ``regular`` (the hosted API's default), ``none``
    under context parallelism (which does not cache steps yet), or what the operator chose.

    >>> resolve_default_acceleration(None), resolve_default_acceleration(None, context_parallel=True)
    ('regular', 'none')
    """
    if chosen is None:
        return "none" if context_parallel else "regular"
    if context_parallel and chosen != "none":
        raise ValueError(
            f"--default-acceleration {chosen} (first-block caching) does not run with context "
            "parallelism yet: use --default-acceleration none"
        )
    return chosen


def default_public_url(host: str, port: int) -> str:
    """The base of image links when ``--public-url`` is not given: the address the server listens on.

    Bound to every interface (``0.0.0.0``, ``::``), that address reaches nobody, so the machine's fully
    qualified host name stands in: right on a LAN or a cluster with DNS; behind a proxy or a CDN, pass
    ``--public-url``. Never built from a request's ``Host`` header, which a client controls.

    >>> default_public_url("127.0.0.1", 8000)
    'http://127.0.0.1:8000'
    >>> default_public_url("::1", 8000)
    'http://[::1]:8000'
    """

    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
