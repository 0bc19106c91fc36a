"""HTTP server with the hosted ``flux/srpo`` API (``pip install 'srpo-infer[server]'``).

>>> from srpo_infer.server import create_app  # doctest: +SKIP
"""

from .app import GenerationBody, create_app
from .safety import SafetyChecker
from .serve import serve

__all__ = ["GenerationBody", "SafetyChecker", "create_app", "serve"]
