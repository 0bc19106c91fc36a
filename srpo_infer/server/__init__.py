"""HTTP server with the hosted ``flux/srpo`` API (``pip install 'srpo-infer[server]'``).

>>> from srpo_infer.server import create_app  # doctest: +SKIP

Without the extra, the modules that need nothing of it (``srpo_infer.server.limits``, which the command
line reads for its help) still import; the names below then raise an error naming the extra.
"""

SERVER_EXTRA = "the server needs its extra: pip install 'srpo-infer[server]'"

try:
    from .app import create_app
    from .safety import SafetyChecker
    from .schema import GenerationBody
    from .serve import serve
except ImportError as _missing:  # fastapi or uvicorn not installed
    _reason = f"{SERVER_EXTRA} ({_missing})"

    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(_reason)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GenerationBody", "SafetyChecker", "create_app", "serve"]
