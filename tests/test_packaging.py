"""The package layout's promises (ARCHITECTURE.md): kernels/ installs as srpo_infer.kernels and is a leaf,
and the library's imports have no cycle."""

from __future__ import annotations

import itertools
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
    """kernels/ imports nothing from srpo_infer, absolute or relative (``from .. import``), at module level
    or inside a function: the library imports the kernels, never the reverse."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for module, level in _imports(path):
            assert level <= 1, (path.name, module, "reaches above kernels/")
            assert (
                level == 1
                or not (module == "srpo_infer" or module.startswith("srpo_infer."))
                or (module.startswith("srpo_infer.kernels"))
            ), (path.name, module)


def test_the_library_has_no_import_cycle():
    """No cycle among srpo_infer's modules, counting imports inside functions too (a lazy import is still a
    dependency): the architecture's arrows point one way."""
    graph = _import_graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])
    # The parser sees what the code says (lazy imports included): context parallelism sits above attention.
    assert "srpo_infer.attention" in graph["srpo_infer.context_parallel"]
    assert "srpo_infer.kernels.launch" in graph["srpo_infer.attention"]


ROOT = Path(__file__).resolve().parents[1]


def _module_files() -> dict[str, Path]:
    files = {
        f"srpo_infer.{p.relative_to(ROOT / 'srpo_infer').with_suffix('').as_posix().replace('/', '.')}": p
        for p in (ROOT / "srpo_infer").rglob("*.py")
    }
    files |= {f"srpo_infer.kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py")}
    return {name.removesuffix(".__init__"): path for name, path in files.items()}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every import in ``path`` (anywhere in it) as (module, relative level)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module or "", node.level)]
            found += [(f"{node.module}.{a.name}" if node.module else a.name, node.level) for a in node.names]
    return found


def _import_graph() -> dict[str, set[str]]:
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for module, level in _imports(path):
            if level:
                base = package.rsplit(".", level - 1)[0] if level > 1 else package
                module = f"{base}.{module}" if module else base
            # The longest prefix that is one of our modules ("from .server import limits" → server.limits).
            while module and module not in files:
                module = module.rsplit(".", 1)[0] if "." in module else ""
            # A package's own __init__ importing its submodules is not an edge back.
            if module and module != name and not module.startswith(name + "."):
                edges.add(module)
        graph[name] = edges
    return graph


def _diagram() -> str:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    start = text.index("## The rooms and their arrows")
    return text[text.index("```", start) + 3 : text.index("```", text.index("```", start) + 3)]


def test_the_architecture_diagram_names_every_module_and_its_arrows_are_imports():
    """ARCHITECTURE.md's diagram, checked against the code: every library module (and server module) is
    in it, every name in it is a module, and each arrow drawn between two named rooms is an import."""
    import re

    files = _module_files()
    diagram = _diagram()
    words = set(re.findall(r"[a-z_]+", diagram))
    tops = {name.split(".")[1] for name in files if name.count(".") >= 1} - {"__main__"}
    servers = {name.split(".")[2] for name in files if name.startswith("srpo_infer.server.")}
    assert tops - words == set(), "modules missing from the diagram"
    assert servers - words == set(), "server modules missing from the diagram"
    graph = _import_graph()

    def imports(room: str, other: str) -> bool:
        mine = [m for m in graph if m == f"srpo_infer.{room}" or m.startswith(f"srpo_infer.{room}.")]
        return any(t == f"srpo_infer.{other}" or t.startswith(f"srpo_infer.{other}.") for m in mine for t in graph[m])

    checked = 0
    for line in diagram.splitlines():
        parts = line.split("──►")
        for left, right in itertools.pairwise(parts):
            left = re.sub(r"\([^)]*\)", "", left)  # what a room's parenthesis says is not a room
            source = re.findall(r"[a-z_]+", re.split(r"[│├└┬┤]", left)[-1])
            targets = re.findall(r"[a-z_]+", right.split("(")[0].split("──►")[0].split("│")[0])
            if not source:
                continue  # a branch continued from the line above
            for target in targets:
                if target in tops:
                    assert imports(source[-1], target), f"the diagram draws {source[-1]} ──► {target}"
                    checked += 1
    assert checked >= 15, checked
