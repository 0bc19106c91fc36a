"""torch.compile for the transformer (and, for a whole-model compile, the VAE decoder), without a
recompile per resolution, with compiled artifacts persisted across processes.

- Scope. ``regional`` (default) compiles the forwards of the two repeated block classes (diffusers'
  ``_repeated_blocks``), ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``: the 19 + 38
  blocks share those graphs, so the first call compiles a few small graphs instead of one 57-block
  graph (what the whole-model compile cost on the H200: ``benchmarks/results/h200-2026-11-26``).
  ``full`` compiles the whole transformer and the VAE decoder, for comparison in ``srpo-infer bench``.
- Resolution. Regions compile with ``dynamic=True``: the image-token dimension is symbolic from the
  first call, so one graph per region serves all 1089 valid sizes (the batch 1 → N switch adds one,
  once: size 1 is always specialised). The whole-model compile marks the same dims dynamic on its inputs.
- Mode. ``default`` keeps Inductor's fast defaults (plus flux-fast's 1×1-convs-as-matmuls, no epilogue
  fusion). ``max-autotune`` opts into GEMM autotuning and coordinate-descent tuning: it can take many
  minutes before the first image, so it never runs unless asked for.
- CUDA graphs (``cuda_graphs="auto"``): on a GPU for the whole-model compile (a step's kernels from one
  replay; one recording per size) and with ``max-autotune``. The loop marks each step's start
  (``torch.compiler.cudagraph_mark_step_begin``), and what outlives a replay is copied by its owner
  (the step cache keeps a copy of the first block's output).
- Warm start. After warm-up the compile caches (Inductor FX graphs, AOTAutograd, Triton kernels,
  autotuning) are saved with ``torch.compiler.save_cache_artifacts`` into ``cache_dir`` and loaded
  before compiling in the next process; :func:`cache_counters` tells hits from misses.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from .config import COMPILE_MODES

log = logging.getLogger(__name__)


def inductor_options(device: torch.device, mode: str = "default", cuda_graphs: bool | None = None) -> dict:
    """Inductor settings for Flux; ``max-autotune`` adds the slow-to-compile tuning. CUDA graphs on a
    GPU when ``cuda_graphs`` (``None``: with ``max-autotune``, as before the option existed)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}, got {mode!r}")
    options = {"conv_1x1_as_mm": True, "epilogue_fusion": False}
    if mode == "max-autotune":
        options |= {
            "max_autotune": True,
            "coordinate_descent_tuning": True,
            "coordinate_descent_check_all_directions": True,
        }
    if cuda_graphs is None:
        cuda_graphs = mode == "max-autotune"
    if cuda_graphs and device.type == "cuda":
        options["triton.cudagraphs"] = True
    return options


def compile_module(
    fn,
    device: torch.device,
    backend: str = "inductor",
    mode: str = "default",
    fullgraph: bool = True,
    cuda_graphs: bool | None = None,
):
    """``torch.compile(fn)`` with our Inductor options (other backends take none); the size-varying
    dims are marked dynamic on the inputs (:func:`mark_dynamic`)."""
    options = inductor_options(device, mode, cuda_graphs) if backend == "inductor" else None
    return torch.compile(fn, fullgraph=fullgraph, backend=backend, options=options)


def compile_regions(
    transformer: torch.nn.Module,
    device: torch.device,
    backend: str = "inductor",
    mode: str = "default",
    cuda_graphs: bool | None = None,
) -> None:
    """Compile the forward of each of the transformer's repeated blocks in place, whole (``fullgraph``).

    diffusers' ``compile_repeated_blocks`` compiles each block's ``__call__``, which would trace any
    hook installed on the block later (a cache's skip decision becomes a graph break, and its skip path
    new graphs). Compiling the forward instead leaves hooks installed afterwards (step caches, group
    offloading) outside the graphs, running eagerly around them; the blocks of a class still share one
    graph, since dynamo caches per code object.
    """
    options = inductor_options(device, mode, cuda_graphs) if backend == "inductor" else None
    repeated = set(getattr(transformer, "_repeated_blocks", ()))
    blocks = [m for m in transformer.modules() if type(m).__name__ in repeated]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} names no repeated blocks to compile (_repeated_blocks)")
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=True, backend=backend, options=options)


def mark_dynamic(hidden_states: torch.Tensor, img_ids: torch.Tensor) -> None:
    """Mark the image-token dims (and the batch) dynamic so a new size does not recompile."""
    torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
    torch._dynamo.maybe_mark_dynamic(img_ids, 0)
    torch._dynamo.maybe_mark_dynamic(hidden_states, 0)


def compiled_graphs() -> int:
    """Graphs compiled so far in this process (``torch._dynamo`` counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    """Graph breaks dynamo has taken so far in this process (``torch._dynamo`` counters), all reasons."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def guard_failures() -> dict[str, list[str]]:
    """Why torch.compile recompiled so far, per compiled function: the guards that failed (a new shape
    outside the compiled range, a new dtype…), in order. Copies, so a caller can diff two snapshots."""
    from torch._dynamo.utils import guard_failures as failures

    return {getattr(code, "co_name", str(code)): [str(r) for r in reasons] for code, reasons in failures.items()}


def new_guard_failures(before: dict[str, list[str]]) -> list[str]:
    """The recompile reasons since the ``before`` snapshot of :func:`guard_failures`, one line each."""
    lines = []
    for name, reasons in guard_failures().items():
        lines += [f"{name}: {r.splitlines()[0][:200]}" for r in reasons[len(before.get(name, [])) :]]
    return lines


def cache_counters() -> dict[str, int]:
    """Compile-cache hits and misses so far in this process (Inductor FX graphs, AOTAutograd).

    A process that loaded saved artifacts and compiles nothing new shows hits and no misses.
    """
    from torch._dynamo.utils import counters

    return {
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "autograd_cache_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "autograd_cache_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }


def cache_key(parts: dict) -> str:
    """A file-name-safe key for compiled artifacts: model shape, dtype, device, software versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # Inductor on a CPU needs no Triton
        triton_version = None
    device = parts.get("device")
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu"
    text = repr(sorted({**parts, "torch": torch.__version__, "triton": triton_version, "gpu": name}.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_artifacts(path: Path) -> bool:
    """Load saved compile artifacts into the local caches; False when there are none."""
    if not path.is_file():
        return False
    t0 = time.perf_counter()
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # a stale or foreign cache must never stop a pipeline from loading
        log.warning("ignoring unusable compile cache %s: %s", path, exc)
        return False
    log.info("loaded compile cache %s in %.2fs", path, time.perf_counter() - t0)
    return True


def save_artifacts(path: Path) -> bool:
    """Save this process's compile artifacts to ``path``; False when there is nothing to save."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return False
    data, _info = saved
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    log.info("saved compile cache %s (%d bytes)", path, len(data))
    return True
