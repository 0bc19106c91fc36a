"""``srpo-infer generate``: image(s) from a prompt, written to files, and the API response printed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..request import IMAGE_SIZE_PRESETS
from .options import DefaultsHelp, add_load_options, load_options, rank


def _request_flags() -> list:
    """The fields of :class:`GenerationRequest` that are ``generate`` flags (their flag, help, argparse options)."""
    from dataclasses import fields

    from ..request import GenerationRequest

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


def add_parser(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="generate image(s) from a prompt and print the flux/srpo API response as JSON",
        description="Generate image(s), write them to --output and print the API-shaped JSON "
        "(url = local file path). The progress bar goes to stderr, the JSON to stdout.",
        formatter_class=DefaultsHelp,
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
    add_load_options(g)


def run_command(args: argparse.Namespace) -> int:
    from ..loading import load_pipeline

    # Check the request before the (possibly long) model load, so a typo fails in a second.
    from ..request import validate_request
    from ..result import IMAGE_SUFFIXES, check_image_file_name, names_a_folder

    if args.image_size and (args.width is not None or args.height is not None):
        raise ValueError("give either --image-size or --width/--height, not both")
    try:
        request = {f.name: getattr(args, f.name) for f in _request_flags()}
        req = validate_request(args.prompt, image_size=args.image_size, **request)
    except ValueError as exc:
        raise ValueError(_as_flags(str(exc))) from None
    output = args.output  # as typed: a trailing slash names a folder
    fmt = args.output_format
    if fmt is None:
        fmt = "jpeg" if names_a_folder(output) else IMAGE_SUFFIXES.get(Path(output).suffix.lower(), "jpeg")
    try:
        check_image_file_name(output, fmt)
    except ValueError as exc:
        raise ValueError(str(exc).replace("output file", "-o").replace("output format", "--format")) from None
    options = load_options(args)
    leader = rank() == 0  # with --context-parallel every rank generates; rank 0 alone writes and prints
    pipe = load_pipeline(**options, progress=not args.quiet and leader)
    result = pipe.generate(req)
    if leader:
        result.save(output, fmt)
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    return 0
