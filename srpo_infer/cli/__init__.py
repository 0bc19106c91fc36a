"""``srpo-infer``: generate images from the command line.

srpo-infer generate "a T-Rex on a beach" --model tiny-random --width 1440 --height 512 --seed 7

One module per command (``generate``, ``bench``, ``warmup``, ``serve``: each adds its parser and runs
it); ``options`` holds what they share (the loading flags, the help style, the one-line parser).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from . import bench, generate, serve, warmup
from .options import OneLineParser, flag, load_fields

COMMANDS = {"generate": generate, "bench": bench, "warmup": warmup, "serve": serve}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineParser(
        prog="srpo-infer",
        description="Fast inference for Tencent's SRPO text-to-image model (FLUX.1-dev fine-tune).",
        epilog="Try it without a GPU or a download (seconds on a CPU):\n"
        "  srpo-infer generate 'a cat' --model tiny-random --image-size square --steps 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"srpo-infer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def _in_flags(message: str) -> str:
    """The library's ``quantize='fp8-weight'`` / ``compile=False`` as the flags a command-line user types
    (``--quantize fp8-weight`` / ``--compile off``).

    >>> _in_flags("use compile=False and quantize='fp8-weight', or memory='gpu'")
    'use --compile off and --quantize fp8-weight, or --memory gpu'
    """
    names = {f.name for f in load_fields()}

    def as_flag(match: re.Match) -> str:
        name, value = match[1], match[2]
        if name not in names:
            return match[0]
        value = {"True": "on", "False": "off", "None": "none"}.get(value, value.strip("'\""))
        return f"{flag(name)} {value}"

    return re.sub(r"\b([a-z_]+)=('[^']*'|\"[^\"]*\"|[\w.-]+)", as_flag, message)


def _unknown_flags(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """``unknown option '--stpes': did you mean '--steps'?``, in the words the server and library use."""
    from ..names import unknown_names_message

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
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_flags(parser, args.command, unknown))
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return COMMANDS[args.command].run_command(args)
    except ValueError as exc:  # CheckpointError is a ValueError too
        print(f"srpo-infer: error: {_in_flags(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT, not a traceback
        # What the interrupt cut short (a progress bar half built) would complain from its finalizer at exit.
        sys.unraisablehook = lambda unraisable: None
        print(f"\nsrpo-infer: {args.command} interrupted", file=sys.stderr)
        return 130
    finally:  # after --context-parallel: the group closes with the command, not in the interpreter's teardown
        from ..context_parallel import leave_process_group

        leave_process_group()


__all__ = ["main"]
