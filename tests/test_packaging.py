"""The package layout's promises (ARCHITECTURE.md): kernels/ installs as srpo_infer.kernels and is a leaf,
and the library's imports have no cycle."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _python(code: str, cwd: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _hub_kernels() -> str | None:
    """Where Hugging Face's ``kernels`` is installed (transformers >= 5.25 brings it), or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return None
    return str(Path(dist.locate_file("kernels/__init__.py")).resolve())


WHICH_KERNELS = """
import json, importlib.util
try:
    import kernels
    found = kernels.__file__
except ModuleNotFoundError:
    found = None
import diffusers.utils.import_utils as u
ours = importlib.util.find_spec("srpo_infer.kernels.launch").origin  # found, not run: triton is an extra
print(json.dumps([found, u.is_kernels_available(), ours]))
"""


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_import_kernels_is_never_ours_and_finds_the_hubs_when_installed(where, tmp_path):
    """diffusers and transformers import Hugging Face's kernel hub as ``kernels``. From the clone's root
    (where the current folder is on sys.path, as in the REPL, ``python -c`` or ``python -m``) and from
    anywhere else, ``import kernels`` is the hub's when installed and fails otherwise; ours is
    ``srpo_infer.kernels`` alone."""
    import json

    out = _python(WHICH_KERNELS, ROOT if where == "root" else tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    found, available, ours = json.loads(out.stdout.splitlines()[-1])
    hub = _hub_kernels()
    assert found == hub or (found and hub and Path(found).resolve() == Path(hub)), (found, hub)
    assert available is (hub is not None)
    assert Path(ours).resolve().parent.name == "kernels" and Path(ours).name == "launch.py"


def test_from_the_root_a_stand_in_hub_package_is_found_in_place_of_ours(tmp_path):
    """Whatever is installed here: a ``kernels`` later on the path than the root (as site-packages is)
    is the one ``import kernels`` gives, submodules included."""
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("WHO = 'hub'\n")
    (hub / "layers.py").write_text("LAYERS = 1\n")
    code = "import kernels, kernels.layers; print(kernels.WHO, kernels.layers.LAYERS, kernels.__file__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = _python(code, ROOT, "-S", env=env)  # -S: no site-packages, so the stand-in is the only other one
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["hub", "1", str(hub / "__init__.py")]


def test_from_the_root_without_a_hub_package_import_kernels_fails_as_if_absent():
    """No other ``kernels`` on the path (``-S``: no site-packages): the name does not exist, our modules
    included, and nothing is left half-imported."""
    code = (
        "import sys\n"
        "for name in ('kernels', 'kernels.launch'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        assert exc.name == 'kernels', exc.name\n"
        "        print('absent', name, 'kernels' in sys.modules)\n"
    )
    out = _python(code, ROOT, "-S")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["absent kernels False", "absent kernels.launch False"]


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
