"""``srpo-infer serve``: the flux/srpo HTTP API, in this process or on Ray Serve replicas."""

from __future__ import annotations

import argparse

from ..request import ACCELERATIONS
from ..server import SERVER_EXTRA
from ..server.limits import ConnectionLimits, default_max_connections
from .options import DefaultsHelp, add_load_options, load_options


def add_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the flux/srpo HTTP API (needs the [server] extra)",
        description="Starts an HTTP server with the hosted flux/srpo API at POST /v1/images/generations, "
        "a playground page at /, /health and /metrics. The model loads and warms in the background; "
        "/health answers 503 until it is ready.",
        formatter_class=DefaultsHelp,
    )
    _add_address(s)
    _add_request_rules(s)
    _add_replicas(s)
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM/SIGINT, seconds to finish queued and running requests before answering the rest 503",
    )
    _add_limits(s)
    add_load_options(s)
    _compile_by_default(s)


def _add_address(s: argparse.ArgumentParser) -> None:
    """Where it listens, who may call it, and where the images go."""
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' [default: $SRPO_API_KEY]")
    s.add_argument("--output-dir", default="outputs", help="where generated images are stored and served from")
    s.add_argument(
        "--public-url",
        default=None,
        help="base URL for image links, e.g. https://cdn.example.com/srpo [default: the address serve "
        "listens on, http://HOST:PORT (the machine's name when HOST is 0.0.0.0); never built from the "
        "client's Host header]",
    )
    s.add_argument("--max-queue", type=int, default=16, help="waiting requests before 429")
    s.add_argument(
        "--docs",
        action="store_true",
        help="serve the Swagger UI page at /docs (it loads its script from a public CDN; off: /docs says so)",
    )


def _add_request_rules(s: argparse.ArgumentParser) -> None:
    """What a request gets: checks, defaults, a cost cap, how long its images are kept, the LoRAs it may name."""
    s.add_argument(
        "--safety-checker",
        default=None,
        help="StableDiffusionSafetyChecker repo id or folder (or tiny-random); none: no check",
    )
    s.add_argument(
        "--default-acceleration",
        default=None,
        choices=list(ACCELERATIONS),
        help="acceleration for requests that do not say [default: regular, the hosted API's; none with "
        "--context-parallel, which does not cache steps yet]",
    )
    s.add_argument(
        "--allow-unknown-fields",
        action="store_true",
        help="ignore unknown request fields instead of answering 422 (for lenient clients)",
    )
    s.add_argument(
        "--max-cost",
        type=float,
        default=None,
        help="refuse (422) requests over this many megapixel-steps, width×height×steps×images/10⁶ "
        "(1024², 28 steps = 29.4; 1536², 50 steps, 4 images = 472) [default: no cap]",
    )
    s.add_argument(
        "--retention-hours", type=float, default=24.0, help="delete stored images older than this; 0 keeps them"
    )
    s.add_argument(
        "--retention-gb",
        type=float,
        default=2.0,
        help="delete the oldest stored images beyond this total size; 0: no size limit",
    )
    s.add_argument(
        "--lora-dir",
        default=None,
        help="a folder of LoRA .safetensors files requests may name in loras: [{path, scale}] "
        "(GET /v1/loras lists them); nothing else is loaded",
    )


def _add_replicas(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="model replicas, one GPU each; more than 1 runs on Ray Serve (pip install 'srpo-infer[ray]')",
    )
    s.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        help="autoscale between --replicas and this on ongoing requests (Ray Serve)",
    )
    s.add_argument(
        "--ray-address",
        default=None,
        help="an existing Ray cluster to deploy on (e.g. ray://head:10001 or auto) [default: a local Ray]",
    )


def _add_limits(s: argparse.ArgumentParser) -> None:
    limits = s.add_argument_group("connection limits (for the internet, put a reverse proxy in front too: README)")
    limits.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections at once; at the cap the oldest connection still sending headers is "
        "closed, else the new one gets a 503 [default: half the file-descriptor limit, at most "
        f"1024: {default_max_connections()} here]",
    )
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=ConnectionLimits.header_timeout,
        help="seconds a connection has to send a request's headers before it is closed",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=ConnectionLimits.body_timeout,
        help="seconds a request has to send its whole body (at most 64 KB) before a 408",
    )
    limits.add_argument(
        "--max-header-bytes",
        type=int,
        default=ConnectionLimits.max_header_bytes,
        help="largest header block a request may send, request line included; past it: 431 and the "
        "connection is closed",
    )
    limits.add_argument(
        "--send-timeout",
        type=float,
        default=ConnectionLimits.send_timeout,
        help="seconds an answer may make no progress to a client that stopped reading before its "
        "connection is dropped (a slow link that still reads keeps going)",
    )


def _compile_by_default(s: argparse.ArgumentParser) -> None:
    """The server warms up before it takes requests anyway, so on a GPU it compiles by default (regional:
    3 small graphs, every size); load_pipeline's own default stays off. --compile off / --no-compile."""
    s.set_defaults(compile="auto-serve")
    compile_flag = next(a for a in s._actions if a.dest == "compile")
    compile_flag.choices = ["auto-serve", *compile_flag.choices]
    compile_flag.help = (
        "torch.compile the transformer (auto-serve: on with a CUDA GPU, where serve warms up "
        "before taking requests anyway; off on a CPU. load_pipeline's own default stays off)"
    )
    s.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const="off",
        default=argparse.SUPPRESS,
        help="same as --compile off",
    )


def run_command(args: argparse.Namespace) -> int:
    try:
        from ..server import serve
    except ImportError as exc:  # srpo_infer.server names the extra already when fastapi or uvicorn is missing
        raise ValueError(str(exc) if "srpo-infer[server]" in str(exc) else f"{SERVER_EXTRA} ({exc})") from exc
    _check(args)
    limits = ConnectionLimits(
        args.header_timeout,
        args.body_timeout,
        args.max_connections,
        max_header_bytes=args.max_header_bytes,
        send_timeout=args.send_timeout,
    )
    app_options = dict(
        docs=args.docs,
        allow_unknown_fields=args.allow_unknown_fields,
        max_cost=args.max_cost,
        retention_seconds=args.retention_hours * 3600 or None,
        retention_bytes=int(args.retention_gb * 2**30) or None,
    )
    pipeline_options = load_options(args)
    model = pipeline_options.pop("model")
    if pipeline_options["compile"] == "auto-serve":
        from ..config import resolve_device

        pipeline_options["compile"] = resolve_device(pipeline_options.get("device")).type == "cuda"
    if args.replicas > 1 or args.ray_address or args.max_replicas:
        if pipeline_options["context_parallel"] > 1:
            raise ValueError(
                "--context-parallel does not run on Ray Serve replicas yet (a replica would have to "
                "start its own processes): use it without --replicas, under torchrun"
            )
        if args.lora_dir is not None:
            raise ValueError("--lora-dir does not run on Ray Serve replicas yet: serve LoRAs without --replicas")
        return _serve_on_ray(args, model, app_options, pipeline_options)
    return serve(
        model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        output_dir=args.output_dir,
        public_url=args.public_url,
        max_queue=args.max_queue,
        safety_checker=args.safety_checker,
        default_acceleration=args.default_acceleration,
        drain_timeout=args.drain_timeout,
        limits=limits,
        app_options=app_options,
        lora_dir=args.lora_dir,
        **pipeline_options,
    )


def _check(args: argparse.Namespace) -> None:
    """The serve flags' ranges, before anything loads."""
    for flag, value in (("--max-cost", args.max_cost), ("--drain-timeout", args.drain_timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    for flag, value in (("--retention-hours", args.retention_hours), ("--retention-gb", args.retention_gb)):
        if not value >= 0:
            raise ValueError(f"{flag} must be >= 0 (0: no limit), got {value}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")


def _serve_on_ray(args: argparse.Namespace, model: str, app_options: dict, pipeline_options: dict) -> int:
    import os

    from ..config import resolve_device
    from ..server.ray_serve import require_ray, serve_replicas
    from ..server.serve import default_public_url

    require_ray()  # a one-line error naming the extra when Ray is missing
    # Absolute image links, as one process serves them: the address Ray's proxy listens on.
    public_url = args.public_url or default_public_url(args.host, args.port)
    app_options |= dict(
        api_key=args.api_key or os.environ.get("SRPO_API_KEY") or None,
        output_dir=args.output_dir,
        public_url=public_url,
        max_queue=args.max_queue,
    )
    return serve_replicas(
        model,
        host=args.host,
        port=args.port,
        ray_address=args.ray_address,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        use_gpu=resolve_device(pipeline_options.get("device")).type == "cuda",
        pipeline_options=pipeline_options,
        app_options=app_options,
        default_acceleration=args.default_acceleration,
    )
