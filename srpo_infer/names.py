"""Names a caller typed that do not exist (a body's field, a CLI option, a keyword argument): refused
all at once, each with the nearest real name, in one wording for the server, the CLI and the library.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable


def unknown_names_message(names: Iterable[str], known: Iterable[str], what: str = "field") -> str:
    """Every unknown name at once, each with the nearest known one: the one wording the server (fields),
    the CLI (options) and the library (keyword arguments) use for the same mistake.

    >>> unknown_names_message(["num_inferance_steps"], ["prompt", "num_inference_steps"])
    "unknown field 'num_inferance_steps': did you mean 'num_inference_steps'?"
    >>> unknown_names_message(["stpes", "zzz"], ["steps", "seed"], what="option")
    "unknown options 'stpes' (did you mean 'steps'?), 'zzz'; known options: steps, seed"
    """
    names, known = sorted(names), list(known)
    nearest = {n: next(iter(difflib.get_close_matches(n, known, n=1, cutoff=0.6)), None) for n in names}
    listing = f"known {what}s: {', '.join(known)}"
    if len(names) == 1:
        near = nearest[names[0]]
        return f"unknown {what} {names[0]!r}: {f'did you mean {near!r}?' if near else listing}"
    parts = ", ".join(f"{n!r} (did you mean {near!r}?)" if near else repr(n) for n, near in nearest.items())
    return f"unknown {what}s {parts}" + ("" if all(nearest.values()) else f"; {listing}")


def keyword_names(fn: Callable) -> list[str]:
    """The names ``fn`` accepts as keywords."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in inspect.signature(fn).parameters.items() if p.kind in kinds and n != "self"]


def check_keywords(fn: Callable, keywords: Iterable[str], extra: Iterable[str] = ()) -> None:
    """Raise ``TypeError`` naming every keyword ``fn`` does not take, with the nearest one it does."""
    _refuse_unknown(fn.__name__, keywords, [*keyword_names(fn), *extra])


def _refuse_unknown(name: str, keywords: Iterable[str], known: list[str]) -> None:
    unknown = [k for k in keywords if k not in known]
    if unknown:
        raise TypeError(f"{name}(): {unknown_names_message(unknown, known, 'keyword argument')}")


def suggest_keywords(fn: Callable) -> Callable:
    """Decorator: a misspelled keyword argument is a ``TypeError`` that names the nearest real one
    (Python's own says only "unexpected keyword argument"). The names are read from the signature once,
    here; a call only looks its keywords up."""
    known = keyword_names(fn)
    names = frozenset(known)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not names.issuperset(kwargs):
            _refuse_unknown(fn.__name__, kwargs, known)
        return fn(*args, **kwargs)

    return wrapper
