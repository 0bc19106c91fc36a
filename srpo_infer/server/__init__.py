"""HTTP server with the hosted ``flux/srpo`` API (``pip install 'srpo-infer[server]'``).

>>> from srpo_infer.server import create_app  # doctest: +SKIP

The names below load on first use, so ``srpo_infer.server.limits`` (which the command line reads for
its help) imports without the server's extra.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"GenerationBody": ".app", "create_app": ".app", "SafetyChecker": ".safety", "serve": ".serve"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
