"""``srpo-infer``: generate images from the command line.

srpo-infer generate "a T-Rex on a beach" --model tiny-random --width 1440 --height 512 --seed 7
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import tempfile
from pathlib import Path

from .request import ACCELERATIONS, IMAGE_SIZE_PRESETS
from .server.limits import ConnectionLimits, default_max_connections


def _request_flags() -> list:
    """The fields of :class:`GenerationRequest` that are ``generate`` flags (their flag, help, argparse options)."""
    from dataclasses import fields

    from .request import GenerationRequest

    return [f for f in fields(GenerationRequest) if f.metadata["flag"]]


def _as_flags(message: str) -> str:
    """``num_inference_steps must be in [1, 50], got 0`` → ``--steps must be in [1, 50], got 0``: errors
    name what the user typed."""
    flags = {f.name: f.metadata["flag"] for f in _request_flags()} | {
        "image_size": "--image-size",
        "prompt": "the prompt",
    }
    field, _, rest = message.partition(" ")
    return f"{flags[field]} {rest}" if field in flags else message


class _Help(argparse.HelpFormatter):
    """One style for defaults: ``[default: X]`` after the help, once. A help text that explains its own
    default (``[default: cuda if available]``) keeps it; ``None`` defaults show nothing more."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "[default:" in text or action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
            return text
        return f"{text} [default: {_shown(action.default)}]"


def _shown(value) -> str:
    """A default as a user types it: on/off/none for True/False/None, lists space-separated."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(_shown, value))
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    return str(value)


class _Parser(argparse.ArgumentParser):
    """argparse's own mistakes (``--steps two``, ``--format gif``) in the same one line and exit code 2
    as ours, without the usage block."""

    def error(self, message: str):
        retired = re.match(r"argument --attention: invalid choice: '([^']*)'", message)
        if retired:  # a backend we retired: name its replacement, as the library does
            from .config import RETIRED_BACKENDS

            if retired[1] in RETIRED_BACKENDS:
                message = f"--attention {retired[1]} was replaced by {RETIRED_BACKENDS[retired[1]]}"
        self.exit(2, f"srpo-infer: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="srpo-infer",
        description="Fast inference for Tencent's SRPO text-to-image model (FLUX.1-dev fine-tune).",
        epilog="Try it without a GPU or a download (seconds on a CPU):\n"
        "  srpo-infer generate 'a cat' --model tiny-random --image-size square --steps 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"srpo-infer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_bench, _add_warmup, _add_serve):
        add(sub)
    return parser


def _load_fields() -> list:
    """The :class:`PipelineConfig` fields every loading command offers as flags (one definition)."""
    from dataclasses import fields

    from .config import PipelineConfig

    return [f for f in fields(PipelineConfig) if f.metadata.get("cli")]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_load_options(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """What to load and how to run it: a flag per :class:`PipelineConfig` field, with that field's
    help, allowed values and default (``defaults`` overrides a command's own)."""
    defaults = defaults or {}
    group = p.add_argument_group("loading and speed (the library's load_pipeline options)")
    for f in _load_fields():
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        choices = f.metadata["choices"]
        if isinstance(default, bool) and choices is None:  # a plain switch: --lora-fuse / --no-lora-fuse
            group.add_argument(
                _flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{f.metadata['help']} [default: {_shown(default)}]",
            )
            continue
        kind = type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else str
        shown = choices is not None and default in choices  # else None: "not given", the help says what then
        group.add_argument(
            _flag(f.name),
            default=_shown(default) if shown else default,
            type=kind,
            choices=[_shown(c) for c in choices] if choices else None,
            metavar=None if choices else f.name.upper(),
            help=f.metadata["help"],
        )


def _load_options(args: argparse.Namespace) -> dict:
    """The parsed load flags as :func:`~srpo_infer.load_pipeline` keywords (on/off/none → True/False/None)."""
    options = {}
    for f in _load_fields():
        value = getattr(args, f.name)
        if f.metadata["choices"] is not None and value is not None:
            value = {_shown(c): c for c in f.metadata["choices"]}.get(value, value)  # serve's auto-serve stays
        options[f.name] = value
    if options.get("cache_dir") is None:
        del options["cache_dir"]  # the config's own default ($SRPO_CACHE_DIR/compile)
    from .checkpoint import check_model_name

    # Before the heavy imports and any download: a typo or a missing path is one line in a second or two.
    check_model_name(options["model"], "--model")
    if options.get("base") is not None:
        check_model_name(options["base"], "--base")
    return options


def _add_generate(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="generate image(s) from a prompt and print the flux/srpo API response as JSON",
        description="Generate image(s), write them to --output and print the API-shaped JSON "
        "(url = local file path). The progress bar goes to stderr, the JSON to stdout.",
        formatter_class=_Help,
    )
    g.add_argument("prompt", help="what to draw (1 to 4000 characters)")
    g.add_argument("--image-size", choices=sorted(IMAGE_SIZE_PRESETS), help="a preset instead of --width/--height")
    for f in _request_flags():  # from GenerationRequest: the one definition of the request's fields
        options = dict(f.metadata["cli"])
        default = options.pop("flag_default", f.default)
        if "choices" not in options:  # --steps STEPS, not --steps NUM_INFERENCE_STEPS
            options["metavar"] = f.metadata["flag"].lstrip("-").upper().replace("-", "_")
        g.add_argument(f.metadata["flag"], dest=f.name, default=default, help=f.metadata["help"], **options)
    g.add_argument(
        "--output",
        "-o",
        default="outputs",
        help="folder for the images, or a file name such as out.png (numbered when several)",
    )
    g.add_argument(
        "--format",
        dest="output_format",
        default=None,
        choices=["jpeg", "png"],
        help="image format [default: from --output's extension, else jpeg]",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    _add_load_options(g)


def _add_bench(sub) -> None:
    from .bench import CPU_DEFAULTS, CPU_DEFAULTS_SECONDS, CPU_SMOKE, GPU_DEFAULTS

    gpu, cpu = GPU_DEFAULTS, CPU_DEFAULTS
    b = sub.add_parser(
        "bench",
        help="benchmark diffusers vs our pipeline, one optimization at a time (JSON, Markdown, PNG)",
        description="Runs stock diffusers FluxPipeline (baseline) and our pipeline with each optimization "
        "added one at a time, on the same weights, prompt and seed, in one process. On a GPU: the whole "
        "table at the real settings. On a CPU: " + ", ".join(c.name for c in CPU_SMOKE) + f" on the tiny "
        f"model at {' '.join(cpu.sizes)}, {cpu.steps} steps ({CPU_DEFAULTS_SECONDS} s on an idle 2-core machine).",
        formatter_class=_Help,
    )
    b.add_argument(
        "--model",
        default=None,
        help="full-random (FLUX.1-dev sizes, random, GPU), tiny-random, or real weights "
        "[default: full-random on CUDA, tiny-random on CPU]",
    )
    b.add_argument("--base", default=None, help="base components for real weights [default: FLUX.1-dev]")
    b.add_argument("--device", default=None, help="cpu, cuda … [default: cuda if available]")
    b.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        help=f"WIDTHxHEIGHT … [default: {' '.join(gpu.sizes)} on a GPU, {' '.join(cpu.sizes)} on a CPU]",
    )
    b.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps per image [default: {gpu.steps} on a GPU, {cpu.steps} on a CPU]",
    )
    b.add_argument(
        "--official",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the official SRPO setting: 1024x1024, 50 steps [default: on a GPU only]",
    )
    b.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="these configurations, in this order (put diffusers first: deviations are measured "
        "against it) [default: the device's whole table]",
    )
    b.add_argument(
        "--config-timeout",
        type=float,
        default=None,
        help="seconds per configuration (all its sizes); past it the configuration becomes an error "
        "row and the next one runs [default: no limit]",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per setting, after one warm-up [default: {gpu.repeats} on a GPU, {cpu.repeats} on a CPU]",
    )
    b.add_argument("--compile-backend", default="inductor", help="torch.compile backend for compiled configs")
    b.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        help="split each image over this many processes (GPUs) in every configuration but the "
        "diffusers baseline; run under torchrun --nproc-per-node N (rank 0 reports)",
    )
    b.add_argument(
        "--out",
        default=None,
        help="folder for bench.json, bench.md, bench.png [default: a new folder in the system's temp "
        "directory, printed at the end]",
    )


def _add_warmup(sub) -> None:
    w = sub.add_parser(
        "warmup",
        help="compile for the given sizes, save the compile cache, print a cold/warm start report",
        description="Loads the pipeline with torch.compile, warms it up at --sizes (saving the compiled "
        "artifacts to --cache-dir, so later processes start warm), then generates once at each of "
        "--check-sizes and counts the graphs compiled after warm-up. Prints the report as JSON. Run it "
        "twice: the second process shows compile-cache hits instead of misses.",
        formatter_class=_Help,
    )
    w.add_argument("--sizes", nargs="+", default=["1024x768"], help="WIDTHxHEIGHT sizes to warm up")
    w.add_argument("--check-sizes", nargs="*", default=[], help="WIDTHxHEIGHT sizes to generate after warm-up")
    w.add_argument(
        "--acceleration",
        nargs="+",
        default=["none"],
        choices=list(ACCELERATIONS),
        help="step-caching levels to warm up",
    )
    w.add_argument("--out", default=None, help="also write the JSON report to this file")
    _add_load_options(w, defaults={"compile": True})


def _add_serve(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the flux/srpo HTTP API (needs the [server] extra)",
        description="Starts an HTTP server with the hosted flux/srpo API at POST /v1/images/generations, "
        "a playground page at /, /health and /metrics. The model loads and warms in the background; "
        "/health answers 503 until it is ready.",
        formatter_class=_Help,
    )
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
    s.add_argument(
        "--lora-dir",
        default=None,
        help="a folder of LoRA .safetensors files requests may name in loras: [{path, scale}] "
        "(GET /v1/loras lists them); nothing else is loaded",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM/SIGINT, seconds to finish queued and running requests before answering the rest 503",
    )
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
    _add_load_options(s)
    # The server warms up before it takes requests anyway, so on a GPU it compiles by default (regional:
    # 3 small graphs, every size); load_pipeline's own default stays off. --compile off / --no-compile.
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


def _generate(args: argparse.Namespace) -> int:
    from .loading import load_pipeline

    # Check the request before the (possibly long) model load, so a typo fails in a second.
    from .request import validate_request
    from .result import IMAGE_SUFFIXES, check_image_file_name

    if args.image_size and (args.width is not None or args.height is not None):
        raise ValueError("give either --image-size or --width/--height, not both")
    try:
        request = {f.name: getattr(args, f.name) for f in _request_flags()}
        req = validate_request(args.prompt, image_size=args.image_size, **request)
    except ValueError as exc:
        raise ValueError(_as_flags(str(exc))) from None
    output = Path(args.output)
    fmt = args.output_format
    if fmt is None:
        fmt = IMAGE_SUFFIXES.get(output.suffix.lower(), "jpeg")
    try:
        check_image_file_name(output, fmt)
    except ValueError as exc:
        raise ValueError(str(exc).replace("output file", "-o").replace("output format", "--format")) from None
    options = _load_options(args)
    leader = _rank() == 0  # with --context-parallel every rank generates; rank 0 alone writes and prints
    pipe = load_pipeline(**options, progress=not args.quiet and leader)
    result = pipe.generate(req)
    if leader:
        result.save(output, fmt)
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    return 0


def _rank() -> int:
    """This process's rank under torchrun (0 when started alone)."""
    import os

    return int(os.environ.get("RANK", "0"))


def _sizes(texts: list[str], flag: str) -> list[tuple[int, int]]:
    from .request import resolve_image_size

    sizes = []
    for text in texts:
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"{flag} takes WIDTHxHEIGHT values such as 1024x768, got {text!r}") from None
        sizes.append(resolve_image_size(width=w, height=h))
    return sizes


def _warmup(args: argparse.Namespace) -> int:
    from .warm_start import warm_start_report

    options = {**_load_options(args), "progress": False}
    report = warm_start_report(
        _sizes(args.sizes, "--sizes"), _sizes(args.check_sizes, "--check-sizes"), tuple(args.acceleration), **options
    )
    if _rank() != 0:  # with --context-parallel every rank warms up; rank 0 reports
        return 0
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _bench(args: argparse.Namespace) -> int:

    from .bench import (
        CPU_DEFAULTS,
        GPU_DEFAULTS,
        BenchArgs,
        Setting,
        markdown_header,
        markdown_notes,
        markdown_row,
        run_benchmark,
        write_reports,
    )
    from .config import resolve_device

    on_gpu = resolve_device(args.device).type == "cuda"
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    steps = args.steps if args.steps is not None else defaults.steps
    settings = [Setting(w, h, steps) for w, h in _sizes(args.sizes or list(defaults.sizes), "--sizes")]
    if args.official if args.official is not None else defaults.official:
        settings.append(Setting(1024, 1024, 50))
    model = args.model or ("full-random" if on_gpu else "tiny-random")
    leader = _rank() == 0  # with --context-parallel every rank benchmarks; rank 0 alone reports
    out = Path(args.out) if args.out or not leader else Path(tempfile.mkdtemp(prefix="srpo-bench-"))

    def on_row(row: dict, partial: dict) -> None:  # print each row as it lands; keep the reports current
        if leader:
            print(markdown_row(row), flush=True)
            write_reports(partial, out)

    if args.context_parallel < 1:
        raise ValueError(f"--context-parallel must be >= 1, got {args.context_parallel}")
    if leader:
        from .bench import skipped_configs

        for name, why in skipped_configs(args.configs, resolve_device(args.device)).items():
            print(f"skipping {name}: {why}", file=sys.stderr)
        print(markdown_header(), flush=True)
    result = run_benchmark(
        BenchArgs(
            model=model,
            base=args.base,
            device=args.device,
            settings=settings,
            configs=args.configs,
            repeats=args.repeats or defaults.repeats,
            compile_backend=args.compile_backend,
            config_timeout=args.config_timeout,
            context_parallel=args.context_parallel,
        ),
        on_row=on_row,
    )
    if not leader:
        return 0
    paths = write_reports(result, out)
    print()  # the rows were printed as they landed: the notes below them, then where the reports are
    print("\n".join(markdown_notes(result)))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        raise ValueError(f"the server needs its extra: pip install 'srpo-infer[server]' ({exc})") from exc
    for flag, value in (("--max-cost", args.max_cost), ("--drain-timeout", args.drain_timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    for flag, value in (("--retention-hours", args.retention_hours), ("--retention-gb", args.retention_gb)):
        if not value >= 0:
            raise ValueError(f"{flag} must be >= 0 (0: no limit), got {value}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    limits = ConnectionLimits(args.header_timeout, args.body_timeout, args.max_connections)
    app_options = dict(
        allow_unknown_fields=args.allow_unknown_fields,
        max_cost=args.max_cost,
        retention_seconds=args.retention_hours * 3600 or None,
        retention_bytes=int(args.retention_gb * 2**30) or None,
    )
    pipeline_options = _load_options(args)
    model = pipeline_options.pop("model")
    if pipeline_options["compile"] == "auto-serve":
        from .config import resolve_device

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


def _serve_on_ray(args: argparse.Namespace, model: str, app_options: dict, pipeline_options: dict) -> int:
    import os

    from .config import resolve_device
    from .server.ray_serve import require_ray, serve_replicas
    from .server.serve import default_public_url

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


def _in_flags(message: str) -> str:
    """The library's ``quantize='fp8-weight'`` / ``compile=False`` as the flags a command-line user types
    (``--quantize fp8-weight`` / ``--compile off``).

    >>> _in_flags("use compile=False and quantize='fp8-weight', or memory='gpu'")
    'use --compile off and --quantize fp8-weight, or --memory gpu'
    """
    names = {f.name for f in _load_fields()}

    def flag(match: re.Match) -> str:
        name, value = match[1], match[2]
        if name not in names:
            return match[0]
        value = {"True": "on", "False": "off", "None": "none"}.get(value, value.strip("'\""))
        return f"{_flag(name)} {value}"

    return re.sub(r"\b([a-z_]+)=('[^']*'|\"[^\"]*\"|[\w.-]+)", flag, message)


def _unknown_flags(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """``unknown option '--stpes': did you mean '--steps'?``, in the words the server and library use."""
    from .request import unknown_names_message

    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = [o for a in commands.choices[command]._actions for o in a.option_strings if o.startswith("--")]
    flags = [u.split("=")[0] for u in unknown if u.startswith("-")]
    if not flags:
        return f"unexpected arguments: {' '.join(unknown)} (quote a prompt that has spaces)"
    return unknown_names_message(flags, known, what="option")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``srpo-infer`` command; returns the exit code.

    Errors the user can fix (bad arguments, bad checkpoints) print one line, not a traceback.
    """
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_flags(parser, args.command, unknown))
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return {"generate": _generate, "bench": _bench, "warmup": _warmup, "serve": _serve}[args.command](args)
    except ValueError as exc:  # CheckpointError is a ValueError too
        print(f"srpo-infer: error: {_in_flags(str(exc))}", file=sys.stderr)
        return 2
    finally:  # after --context-parallel: the group closes with the command, not in the interpreter's teardown
        from .context_parallel import leave_process_group

        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
