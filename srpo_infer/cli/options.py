"""What the commands share: the parser that errs in one line, one style for defaults in the help, the
loading flags (one per :class:`PipelineConfig` field), sizes and the torchrun rank."""

from __future__ import annotations

import argparse
import dataclasses
import re


class DefaultsHelp(argparse.HelpFormatter):
    """One style for defaults: ``[default: X]`` after the help, once. A help text that explains its own
    default (``[default: cuda if available]``) keeps it; ``None`` defaults show nothing more."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "[default:" in text or action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
            return text
        return f"{text} [default: {shown(action.default)}]"


def shown(value) -> str:
    """A default as a user types it: on/off/none for True/False/None, lists space-separated.

    >>> shown([True, None, "sdpa"])
    'on none sdpa'
    """
    if isinstance(value, (list, tuple)):
        return " ".join(map(shown, value))
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    return str(value)


class OneLineParser(argparse.ArgumentParser):
    """argparse's own mistakes (``--steps two``, ``--format gif``) in the same one line and exit code 2
    as ours, without the usage block."""

    def error(self, message: str):
        retired = re.match(r"argument --attention: invalid choice: '([^']*)'", message)
        if retired:  # a backend we retired: name its replacement, as the library does
            from ..config import RETIRED_BACKENDS

            if retired[1] in RETIRED_BACKENDS:
                message = f"--attention {retired[1]} was replaced by {RETIRED_BACKENDS[retired[1]]}"
        self.exit(2, f"srpo-infer: error: {message}\n")


def load_fields() -> list:
    """The :class:`PipelineConfig` fields every loading command offers as flags (one definition)."""
    from ..config import PipelineConfig

    return [f for f in dataclasses.fields(PipelineConfig) if f.metadata.get("cli")]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_load_options(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """What to load and how to run it: a flag per :class:`PipelineConfig` field, with that field's
    help, allowed values and default (``defaults`` overrides a command's own)."""
    defaults = defaults or {}
    group = p.add_argument_group("loading and speed (the library's load_pipeline options)")
    for f in load_fields():
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        choices = f.metadata["choices"]
        if isinstance(default, bool) and choices is None:  # a plain switch: --lora-fuse / --no-lora-fuse
            group.add_argument(
                flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{f.metadata['help']} [default: {shown(default)}]",
            )
            continue
        kind = type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else str
        listed = choices is not None and default in choices  # else None: "not given", the help says what then
        group.add_argument(
            flag(f.name),
            default=shown(default) if listed else default,
            type=kind,
            choices=[shown(c) for c in choices] if choices else None,
            metavar=None if choices else f.name.upper(),
            help=f.metadata["help"],
        )


def load_options(args: argparse.Namespace) -> dict:
    """The parsed load flags as :func:`~srpo_infer.load_pipeline` keywords (on/off/none → True/False/None)."""
    options = {}
    for f in load_fields():
        value = getattr(args, f.name)
        if f.metadata["choices"] is not None and value is not None:
            value = {shown(c): c for c in f.metadata["choices"]}.get(value, value)  # serve's auto-serve stays
        options[f.name] = value
    if options.get("cache_dir") is None:
        del options["cache_dir"]  # the config's own default ($SRPO_CACHE_DIR/compile)
    from ..checkpoint import check_model_name

    # Before the heavy imports and any download: a typo or a missing path is one line in a second or two.
    check_model_name(options["model"], "--model")
    if options.get("base") is not None:
        check_model_name(options["base"], "--base")
    return options


def rank() -> int:
    """This process's rank under torchrun (0 when started alone)."""
    import os

    return int(os.environ.get("RANK", "0"))


def sizes(texts: list[str], option: str) -> list[tuple[int, int]]:
    """``["1024x768"]`` → ``[(1024, 768)]``, each size checked by the library's rules."""
    from ..request import check_size

    found = []
    for text in texts:
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"{option} takes WIDTHxHEIGHT values such as 1024x768, got {text!r}") from None
        found.append(check_size(w, h))
    return found
