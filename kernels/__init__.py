"""Triton kernels, installed as ``srpo_infer.kernels`` (never as a top-level ``kernels``).

This folder sits at the repository's root, so wherever the current folder is on ``sys.path`` (the REPL,
``python -c``, ``python -m``, ``torchrun -m``, notebooks, Ray workers started from the root) Python finds
it under the name ``kernels`` before site-packages, and that name belongs to Hugging Face's kernel hub,
which transformers (≥ 5.25) and diffusers import. Imported under that name, this file is not the package
asked for: it hands over to the next ``kernels`` on the path, or fails as if the name did not exist. It
stays a regular package (this file) because setuptools' editable install cannot map a folder without an
``__init__.py`` to ``srpo_infer.kernels``.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            f"No module named 'kernels' (the folder {_root}/kernels is srpo_infer's, installed as srpo_infer.kernels)",
            name="kernels",
        )
    # The import system returns whatever sys.modules holds once this file has run.
    _theirs = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _theirs
    _spec.loader.exec_module(_theirs)
