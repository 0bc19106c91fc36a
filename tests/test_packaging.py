"""The package layout promises of DESIGN.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_kernels_are_not_a_top_level_package(tmp_path):
    """diffusers imports the HF kernel hub as `kernels` when that name is importable; ours must not be."""
    code = (
        "import importlib.util, srpo_infer.kernels, diffusers.utils.import_utils as u;"
        "assert importlib.util.find_spec('kernels') is None, 'top-level kernels importable';"
        "assert not u.is_kernels_available()"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_public_api_names():
    import srpo_infer

    for name in ("load_pipeline", "generate", "GenerationResult", "PipelineConfig", "CheckpointError"):
        assert hasattr(srpo_infer, name), name


def test_kernels_are_a_leaf():
    """kernels/ imports nothing from srpo_infer (the library imports the kernels, never the reverse)."""
    import ast

    for path in sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n == "srpo_infer" or n.startswith("srpo_infer.") for n in names), (path.name, names)
