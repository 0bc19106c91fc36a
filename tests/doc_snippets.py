"""The code blocks of README.md and docs/, and how each one is run or why it is not (issue 40).

Every fenced block has a language. ``python`` and ``bash`` blocks run in ``test_readme_commands.py``
unless the line before the fence marks what they need that a CPU test machine lacks:

    <!-- needs: gpu -->        a CUDA GPU (fp8, our kernels, compile on real sizes, several GPUs)
    <!-- needs: weights -->    real weights or files that are not here (a GGUF, a LoRA, FLUX.1-dev)
    <!-- needs: server -->     a running ``srpo-infer serve`` on 127.0.0.1:8000: run against the tiny
                               model's server by a slow test (port rewritten)
    <!-- needs: network -->    downloads beyond pip's own install

Several go in one mark: ``<!-- needs: gpu, weights -->``. A mark must be earned: its block contains
what it claims to need, and a marked ``bash`` block has at least one line the tests cannot run. Other
languages (``text``, ``json``) are output and diagrams: a ``json`` block must parse.

Python blocks run page by page, in order, in one namespace per page (a page's first block sets up
what the later ones use), with two substitutions a user would make on a CPU: ``tencent/SRPO`` and
``black-forest-labs/FLUX.1-dev`` load ``tiny-random``, and a generation runs at most 2 denoising
steps. Nothing in the code is rewritten. Bash lines that run are the ``tiny-random`` commands, the
``--help``/``--version`` ones and the tiny LoRA writer; ``python3 -m venv``, ``pip install`` (its
extras must exist in pyproject.toml), ``pytest`` and ``mkdocs`` lines are what the suite and CI run
anyway.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NEEDS = {"gpu", "weights", "server", "network"}
LANGUAGES = {"python", "bash", "text", "json"}
# What a block must contain to earn each mark (any one of these).
EARNS = {
    "gpu": (
        "cuda",
        '"fp8"',
        "triton",
        "torchrun",
        "context_parallel=",
        "--replicas 4",
        "--replicas 2 --max-replicas",
        "gpu_run.sh",
    ),
    "weights": ("/models/", "/path/", "from_pretrained(", "loras/srpo", "REPO_OR_FOLDER", "style.safetensors"),
    "server": ("127.0.0.1:8000", "localhost:8000"),
    "network": ("pip download", "python3 -m pip download"),
}
FENCE = re.compile(r"^(?:<!-- needs: ([a-z, ]+) -->\n)?```([a-z]*)\n(.*?)^```$", re.M | re.S)
TINY_PROGRAMS = ("srpo-infer ", "torchrun ", "python -m srpo_infer ")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the clone's root
    line: int  # of the opening fence
    language: str
    code: str
    needs: frozenset[str]

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in PAGES:
        text = path.read_text()
        for m in FENCE.finditer(text):
            needs = frozenset(n.strip() for n in m[1].split(",")) if m[1] else frozenset()
            line = text.count("\n", 0, m.start(2)) + 1
            found.append(Block(path.relative_to(ROOT).as_posix(), line, m[2], m[3], needs))
    return found


def earns(need: str, block: Block) -> bool:
    """Whether ``block`` holds what ``need`` says it needs (a bash command that loads the default model,
    without ``--model tiny-random``, needs the weights)."""
    if any(token in block.code for token in EARNS[need]):
        return True
    real = [c for c in shell_lines(block.code) if c.startswith(TINY_PROGRAMS) and "tiny-random" not in c]
    return need == "weights" and block.language == "bash" and bool(real)


def fence_count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.lstrip().startswith("```"))


def shell_lines(code: str) -> list[str]:
    """A bash block's commands: continuations joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = line.split("  #", 1)[0].strip()  # a trailing comment is the page's, not the command's
        if line and not line.startswith("#"):
            commands += [part.strip() for part in line.split(" && ")]
    return commands


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def shell_kind(command: str) -> str | None:
    """``run``: a test runs it; ``ok``: the suite or CI runs it anyway; None: a mark must say why not."""
    if command.startswith(TINY_PROGRAMS) and "tiny-random" in command:
        return "run"
    if command.startswith("srpo-infer") and command.split()[-1] in ("--help", "--version"):
        return "run"
    if command.startswith("python -c") and "write_tiny_lora(" in command:
        return "run"
    if command.startswith(("python3 -m venv ", ". .venv/bin/activate", "pytest", "mkdocs ")):
        return "ok"
    if command.startswith(("pip install ", "python -m pip install ")):
        words = shlex.split(command)
        named = {e for w in words for e in re.findall(r"\[([a-z0-9,-]+)\]", w) for e in e.split(",")}
        return "ok" if named <= _extras() and not any(w.startswith("--") and "quiet" not in w for w in words) else None
    return None


def commands_to_run() -> list[str]:
    """Every shell command of README and docs that a test runs, each once, in page order."""
    seen = []
    for block in blocks():
        if block.language == "bash":
            for command in shell_lines(block.code):
                if shell_kind(command) == "run" and command not in seen:
                    seen.append(command)
    return seen


def python_pages(include_server: bool = False) -> dict[str, list[Block]]:
    """The runnable python blocks per page (with ``include_server``: the ``needs: server`` ones alone)."""
    pages: dict[str, list[Block]] = {}
    for block in blocks():
        if block.language != "python":
            continue
        if (block.needs == {"server"}) if include_server else not block.needs:
            pages.setdefault(block.page, []).append(block)
    return pages


# The program that runs a set of pages' python blocks in a fresh interpreter. stdin: the JSON of
# {page: [[where, code]]}; argv[1]: the clone's root to put first on sys.path (as pasting into python at the
# root does), or "". It prints one JSON line: {"failed": [[where, traceback]], "skipped": [[where, module]],
# "seconds": {where: s}}.
HARNESS = r"""
import json, sys, traceback
pages, root = json.loads(sys.stdin.read()), sys.argv[1]
if root:
    sys.path.insert(0, root)
import srpo_infer
import srpo_infer.loading as loading
from srpo_infer.pipeline import SRPOPipeline
from srpo_infer.request import GenerationRequest

REAL = {"tencent/SRPO", "black-forest-labs/FLUX.1-dev"}
EXTRAS = {"fastapi", "openai", "peft", "gguf", "optimum", "torchao", "triton", "matplotlib", "ray", "httpx",
          "requests", "uvicorn"}
loaded = {}

def tiny(name):
    return "tiny-random" if name in REAL else name

def load_pipeline(model="tencent/SRPO", base=None, *args, **options):
    options.setdefault("progress", False)
    key = repr((tiny(model), tiny(base), args, sorted(options.items())))
    if key not in loaded:
        loaded[key] = real_load(tiny(model), tiny(base), *args, **options)
    return loaded[key]

def diffusers_pipeline(model="tencent/SRPO", base=None, *args, **options):
    return real_diffusers(tiny(model), tiny(base), *args, **options)

def generate(self, prompt, **request):
    if not isinstance(prompt, GenerationRequest):
        request["num_inference_steps"] = min(request.get("num_inference_steps", 28), 2)
    return real_generate(self, prompt, **request)

real_load, real_diffusers, real_generate = loading.load_pipeline, loading.diffusers_pipeline, SRPOPipeline.generate
srpo_infer.load_pipeline = loading.load_pipeline = load_pipeline
srpo_infer.diffusers_pipeline = loading.diffusers_pipeline = diffusers_pipeline
SRPOPipeline.generate = generate

import time
failed, skipped, seconds = [], [], {}
for page, page_blocks in pages.items():
    namespace = {"__name__": "__main__"}
    for where, code in page_blocks:
        start = time.perf_counter()
        try:
            exec(compile(code, where, "exec"), namespace)
            seconds[where] = round(time.perf_counter() - start, 2)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in EXTRAS:
                failed.append([where, traceback.format_exc()])
            else:
                skipped.append([where, exc.name])
            break
        except BaseException:
            failed.append([where, traceback.format_exc()])
            break  # the page's later blocks build on this one
print(json.dumps({"failed": failed, "skipped": skipped, "seconds": seconds}))
"""
