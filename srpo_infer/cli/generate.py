"""``srpo-infer generate``: image(s) from a prompt, written to files, and the API response printed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..request import (
    ACCELERATIONS,
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    IMAGE_SIZE_PRESETS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SIDE,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_IMAGES,
    MIN_SIDE,
    MIN_STEPS,
    SIDE_MULTIPLE,
)
from .options import DefaultsHelp, add_load_options, load_options, rank

# The request's fields that are flags (GenerationRequest defines them and their rules): the flag, its
# help and its argparse options (``flag_default``: the flag's own default when it differs from the field's).
REQUEST_FLAGS: dict[str, tuple[str, str, dict]] = {
    "width": (
        "--width",
        f"{MIN_SIDE}–{MAX_SIDE}, multiple of {SIDE_MULTIPLE} [default: {DEFAULT_WIDTH}]",
        dict(type=int, flag_default=None),
    ),
    "height": (
        "--height",
        f"{MIN_SIDE}–{MAX_SIDE}, multiple of {SIDE_MULTIPLE} [default: {DEFAULT_HEIGHT}]",
        dict(type=int, flag_default=None),
    ),
    "seed": ("--seed", "noise seed, 0 to 2**63-1 [default: a random one, printed in the JSON]", dict(type=int)),
    "num_inference_steps": ("--steps", f"denoising steps, {MIN_STEPS}–{MAX_STEPS}", dict(type=int)),
    "guidance_scale": ("--guidance", f"guidance scale, {MIN_GUIDANCE:g}–{MAX_GUIDANCE:g}", dict(type=float)),
    "num_images": ("--num-images", f"{MIN_IMAGES}–{MAX_IMAGES}; image i uses seed + i", dict(type=int)),
    "acceleration": (
        "--acceleration",
        "first-block step caching: none is exact; regular/high skip work on steps that change little",
        dict(choices=list(ACCELERATIONS)),
    ),
}


def _request_flags() -> list:
    """The fields of :class:`GenerationRequest` that are ``generate`` flags, in the request's order."""
    from dataclasses import fields

    from ..request import GenerationRequest

    return [f for f in fields(GenerationRequest) if f.name in REQUEST_FLAGS]


def _as_flags(message: str) -> str:
    """``num_inference_steps must be in [1, 50], got 0`` → ``--steps must be in [1, 50], got 0``: errors
    name what the user typed."""
    flags = {name: flag for name, (flag, _, _) in REQUEST_FLAGS.items()} | {
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
    for f in _request_flags():  # GenerationRequest's fields and defaults, with their flags
        flag, help_text, options = REQUEST_FLAGS[f.name]
        options = dict(options)
        default = options.pop("flag_default", f.default)
        if "choices" not in options:  # --steps STEPS, not --steps NUM_INFERENCE_STEPS
            options["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        g.add_argument(flag, dest=f.name, default=default, help=help_text, **options)
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
