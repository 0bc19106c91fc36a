"""ARCHITECTURE.md's claims that the code can hold, read from the code (ast), not from a list kept here.

Issue 40 found 15 claims in ARCHITECTURE.md, the README and docstrings that the code had stopped making
true ("one exception" reached into diffusers' underscored names where five modules did; "the only
place optimizations are applied" while LoRA calls applied more after it; "a new field touches three
files" where ``loras`` took seven). Each test here recomputes one such fact and compares it with what
the page says, so the next change that makes a sentence false fails here. ``test_packaging.py`` holds
the diagram's arrows and the import rules.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import importlib
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = (ROOT / "ARCHITECTURE.md").read_text()
LIBRARY = sorted((ROOT / "srpo_infer").rglob("*.py"))
KERNELS = sorted((ROOT / "kernels").glob("*.py"))


def _name(path: Path) -> str:
    """``srpo_infer/server/app.py`` → ``server/app.py``; ``kernels/launch.py`` stays."""
    rel = path.relative_to(ROOT).as_posix()
    return rel.removeprefix("srpo_infer/")


def _trees() -> dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text()) for p in [*LIBRARY, *KERNELS]}


def _section(title: str) -> str:
    """The text of ARCHITECTURE.md from the heading ``title`` to the next heading of any level."""
    start = ARCHITECTURE.index(title)
    following = re.search(r"^#+ ", ARCHITECTURE[start + len(title) :], flags=re.M)
    return ARCHITECTURE[start : start + len(title) + (following.start() if following else len(ARCHITECTURE))]


# ----------------------------------------------------------------------------- underscored names

# NamedTuple's public API, which happens to start with an underscore.
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def _defined_by_us(trees: dict[str, ast.Module]) -> set[str]:
    """Underscored names our own code defines: functions, classes, module or local names, arguments,
    attributes set on ``self``/``cls``, and the ``_srpo_*`` marks we set on diffusers' objects."""
    ours = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                ours.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                ours.add(node.id)
            elif isinstance(node, ast.arg):
                ours.add(node.arg)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                ours.add(node.attr)
    return ours


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and not name.startswith("_srpo_")


def foreign_underscored_names() -> dict[str, set[str]]:
    """Per module, the underscored names of other libraries it uses: ``x._name`` on anything but
    ``self``/``cls``, ``getattr(x, "_name")``, and imports of or from an underscored module."""
    trees = _trees()
    ours = _defined_by_us(trees)
    found: dict[str, set[str]] = {}
    for module, tree in trees.items():
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    names.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
            ):
                names.add(node.args[1].value)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names |= {part for part in (node.module or "").split(".") if _private(part)}
                names |= {a.name for a in node.names if _private(a.name)}
            elif isinstance(node, ast.Import):
                names |= {part for a in node.names for part in a.name.split(".") if _private(part)}
        names -= ours | NAMEDTUPLE_API
        if names:
            found[module] = names
    return found


def test_the_modules_that_use_other_libraries_underscored_names_are_the_ones_architecture_lists():
    found = foreign_underscored_names()
    dynamo = {m for m, names in found.items() if names == {"_dynamo"}}
    argparse_ = {m for m, names in found.items() if names <= {"_actions", "_SubParsersAction"}}
    said = ARCHITECTURE[ARCHITECTURE.index("Other libraries' underscored names") : ARCHITECTURE.index("Besides these")]
    listed = set(re.findall(r"^- `([\w/]+\.py)`:", said, flags=re.M))
    rest = set(found) - dynamo - argparse_
    assert rest == listed, f"in the code: {sorted(rest)}; in ARCHITECTURE.md: {sorted(listed)}"
    count = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][len(listed) - 1]
    assert f"used in {count} modules" in said, f"ARCHITECTURE.md must say {count}"
    besides = ARCHITECTURE[ARCHITECTURE.index("Besides these, `torch._dynamo`") :].split("\n\n")[0]
    for module in sorted(dynamo | {m for m in found if "_dynamo" in found[m]}):
        assert f"`{module}`" in besides, f"{module} uses torch._dynamo; ARCHITECTURE.md does not say so"
    for module in sorted(argparse_):
        assert f"`{module}`" in besides, f"{module} reads argparse's private names; ARCHITECTURE.md does not say so"
    # Each listed module's bullet names the names it uses (the reason is prose; the names are checked).
    for module in sorted(listed):
        bullet = re.search(rf"^- `{re.escape(module)}`:(.*?)(?=^- |^\S|\Z)", said, flags=re.M | re.S)[1]
        patterns = re.findall(r"`[\w.]*?(_[\w*]+)`", bullet)
        for name in sorted(found[module] - {"_dynamo"}):
            assert any(fnmatch.fnmatchcase(name, p) for p in patterns), (
                f"{module} uses {name}; its line in ARCHITECTURE.md does not name it"
            )


def test_only_kernels_launch_reaches_into_a_sibling_modules_underscored_names():
    """Inside the library no module uses another module's private names; the exception ARCHITECTURE
    names is ``kernels/launch.py`` launching the kernels its siblings define."""
    trees = _trees()
    defined_in = {
        module: {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and _private(n.name)}
        | {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name) and _private(t.id)
        }
        for module, tree in trees.items()
    }
    crossings = set()
    for module, tree in trees.items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
                if node.value.id not in ("self", "cls"):
                    names = [node.attr]
            for name in names:
                owners = {m for m, defined in defined_in.items() if name in defined and m != module}
                if owners and name not in defined_in[module]:
                    crossings.add((module, name))
    assert crossings and {module for module, _ in crossings} == {"kernels/launch.py"}, sorted(crossings)
    assert all(name.endswith("_kernel") for _, name in crossings), sorted(crossings)


# ----------------------------------------------------------------------------- the diagram's config line


def test_config_is_imported_by_the_rooms_the_diagram_draws():
    """The diagram's ``config ◄── …`` line names every room whose modules import ``config``, and only those."""
    import test_packaging

    graph = test_packaging._import_graph()
    importers = {
        name.split(".")[1] + ("/" if name.count(".") > 1 else "")
        for name, edges in graph.items()
        if "srpo_infer.config" in edges and name != "srpo_infer.config"
    }
    drawn = re.search(r"◄── (.*)", test_packaging._diagram())[1]
    assert set(re.findall(r"[a-z_]+/?", drawn)) == importers, (drawn, sorted(importers))
    assert graph["srpo_infer.config"] == {"srpo_infer.request"}  # "it imports only request's constants"


# ----------------------------------------------------------------------------- where optimizations apply

# Calls that apply an optimization to a pipeline's modules (ours and diffusers' own).
APPLIES = {
    "apply_lora",
    "enable_lora_hotswap",
    "fuse_qkv_projections",
    "quantize_module",
    "set_attention_backend",
    "ContextParallel",
    "RequestCache",
    "enable_cache",
    "compile_regions",
    "compile_module",
    "enable_model_cpu_offload",
    "enable_group_offload",
    "move_components",
    "set_adapters",
    "fuse_lora",
    "unfuse_lora",
}
# The helpers that define a step (called only by the places below): not places of their own.
STEP_HELPERS = {"lora.apply_lora", "lora.add_slot", "first_block_cache.RequestCache.__init__", "memory.move_components"}


def optimization_callers() -> set[str]:
    """``module.Qualified.name`` of every library function that calls one of ``APPLIES``."""
    callers = set()
    for path in LIBRARY:
        module = _name(path).removesuffix(".py").replace("/", ".")

        def visit(node, stack):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    visit(child, [*stack, child.name])
                    continue
                if isinstance(child, ast.Call):
                    f = child.func
                    called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                    if called in APPLIES:
                        callers.add(".".join([module, *stack]))  # noqa: B023 (used at once)
                visit(child, stack)

        visit(ast.parse(path.read_text()), [])
    return callers - STEP_HELPERS


def test_every_place_that_applies_an_optimization_is_named_in_the_optimization_order():
    section = _section("## The optimization order")
    callers = optimization_callers()
    assert "optimize.apply_optimizations" in callers
    for caller in sorted(callers):
        qualname = caller.split(".", 1)[1] if caller.startswith("pipeline.") else caller  # SRPOPipeline.load_lora
        assert re.search(rf"`{re.escape(qualname)}[`(]", section), (
            f"{caller} applies an optimization; ARCHITECTURE.md's order does not name it"
        )
    for named in re.findall(r"`((?:optimize|lora|SRPOPipeline)\.[A-Za-z_.]+)[`(]", section):
        named = f"pipeline.{named}" if named.startswith("SRPOPipeline.") else named
        assert named in callers, f"ARCHITECTURE.md names {named}, which applies nothing"


def test_apply_optimizations_returns_one_optimized_holding_its_steps():
    from srpo_infer.optimize import Optimized, apply_optimizations

    assert typing.get_type_hints(apply_optimizations)["return"] is Optimized
    assert "steps" in {f.name for f in dataclasses.fields(Optimized)}


def _step_kinds() -> list[str]:
    """The kinds of step ``apply_optimizations`` records, in the order its source appends them."""
    import inspect

    optimize = importlib.import_module("srpo_infer.optimize")  # the package exports the function under this name

    kinds = []
    for fn in (optimize.apply_optimizations, optimize._compile):
        calls = [n for n in ast.walk(ast.parse(inspect.getsource(fn).lstrip())) if isinstance(n, ast.Call)]
        for node in sorted(calls, key=lambda n: (n.lineno, n.col_offset)):  # in source order
            if getattr(node.func, "attr", None) == "append" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.JoinedStr):  # an f-string: its constant start
                    arg = arg.values[0]
                if not isinstance(arg, ast.Constant):
                    continue  # the stock cache's label, chosen by stock_cache()
                head = arg.value
                kind = re.split(r"[:(]", head)[0]
                if kind and kind not in kinds:
                    kinds.append(kind)
    return kinds


def test_optimizes_docstring_example_lists_the_steps_in_the_order_they_apply():
    """The example's list follows the order the steps are appended in, and its count of quantized
    linears is FLUX.1-dev's after fusing QKV (diffusers keeps the unfused projections beside the fused one)."""
    import torch
    from diffusers import FluxTransformer2DModel

    optimize = importlib.import_module("srpo_infer.optimize")  # the package exports the function under this name
    from srpo_infer.config import DEFAULT_QUANTIZE_SKIP
    from srpo_infer.full_random import FLUX_DEV_TRANSFORMER
    from srpo_infer.quantize import quantizable_linears

    kinds = _step_kinds()
    assert kinds[:5] == ["lora", "lora_slot", "fuse_qkv", "quantize", "attention"], kinds
    example = ast.literal_eval(re.search(r"^\s*(\[.*\])\s*$", optimize.optimize.__doc__, flags=re.M)[1])
    positions = [kinds.index(re.split(r"[:(]", step)[0]) for step in example]
    assert positions == sorted(positions), example
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    flux.fuse_qkv_projections()
    assert f"quantize:fp8({len(quantizable_linears(flux, DEFAULT_QUANTIZE_SKIP))} linears)" in example


# ----------------------------------------------------------------------------- a request's path


def _files_naming(field: str) -> set[str]:
    """Library files that name a request field: as an attribute, a keyword, an argument or a class field."""
    files = set()
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                (isinstance(node, ast.Attribute) and node.attr == field)
                or (isinstance(node, ast.keyword) and node.arg == field)
                or (isinstance(node, ast.arg) and node.arg == field)
                or (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == field)
            ):
                files.add(_name(path))
                break
    return files


@pytest.mark.parametrize("field", ["guidance_scale", "loras"])
def test_the_files_a_request_field_touches_are_the_ones_architecture_counts(field):
    section = _section("### Adding a request field")
    said = re.search(rf"`{field}` is named in (\d+)[^(]*\((.*?)\)\. ", section.replace("\n", " "), flags=re.S)
    assert said, f"ARCHITECTURE.md no longer counts {field}'s files"
    listed = set(re.findall(r"`([\w/]+\.py)`", said[2]))
    found = _files_naming(field)
    assert found == listed and int(said[1]) == len(found), (sorted(found), sorted(listed))
    assert {"request.py", "server/schema.py"} <= found


def test_the_server_admits_a_request_in_the_order_architecture_gives():
    """LoRA names, then the cost cap, then the streaming refusals, then whether it can serve now."""
    import inspect

    from srpo_infer.server.app import Served

    calls = [
        getattr(n.func, "attr", getattr(n.func, "id", None))
        for n in ast.walk(ast.parse(inspect.getsource(Served.admit).lstrip()))
        if isinstance(n, ast.Call)
    ]
    order = ["_with_loras", "_refuse_over_cost", "stream_refusal", "check_can_serve"]
    assert [c for c in calls if c in order] == order, calls
    said = _section("## One request").replace("\n   ", " ")
    places = [said.index(words) for words in ("the LoRA names", "the cost cap", "the streaming refusals", "serve now")]
    assert places == sorted(places)


def test_generate_runs_the_request_loras_around_run_which_returns_a_denoise_result():
    import inspect

    from srpo_infer.denoise import DenoiseResult
    from srpo_infer.pipeline import SRPOPipeline

    assert typing.get_type_hints(SRPOPipeline.run)["return"] is DenoiseResult
    source = inspect.getsource(SRPOPipeline.generate)
    assert "self._request_loras(req.loras)" in source and "self._run(req, loop" in source
    said = _section("## One request")
    assert "`lora.request_adapter`" in said and "`denoise.DenoiseResult`" in said


def test_the_json_response_body_is_built_in_one_place():
    """``result.api_response`` is the one definition: the library's ``to_dict`` and the server's
    generations route call it; streamed events are built in ``server/streaming.py``, which does not."""
    callers = {
        _name(p)
        for p in LIBRARY
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "api_response"
    }
    assert callers == {"result.py", "server/app.py"}, callers


# ----------------------------------------------------------------------------- the layout


def test_the_layout_names_every_module():
    """ARCHITECTURE.md's "Layout" names every module of the library and of kernels/ (the README's old
    list had lost ``limits`` and ``metrics``)."""
    block = _section("## Layout")
    block = block[block.index("```") : block.index("```", block.index("```") + 3)]
    words = set(re.findall(r"[a-z_0-9]+", block))
    stems = {p.stem for p in [*LIBRARY, *KERNELS]} - {"__init__", "__main__"}
    assert stems - words == set(), "modules missing from the Layout"


def test_the_optimization_record_is_read_in_at_most_three_library_files():
    """What apply_optimizations installs keeps its own state (processors, hooks, compiled modules, the
    runtime the loop calls); the record ``pipe.optimized`` is read where ARCHITECTURE.md says, no wider."""
    readers = sorted(
        _name(path)
        for path in LIBRARY
        if any(isinstance(n, ast.Attribute) and n.attr == "optimized" for n in ast.walk(ast.parse(path.read_text())))
    )
    assert len(readers) <= 3, readers
    said = re.search(r"`pipe\.optimized` is read in (.*?)\s+only", ARCHITECTURE, flags=re.S)[1]
    assert sorted(re.findall(r"`([\w/]+\.py)`", said)) == readers, (said, readers)
