"""torch.compile for the transformer and the VAE decoder, without a recompile per resolution, with
compiled artifacts persisted across processes.

- Resolution: the image-token dimension (and the batch when > 1) is marked dynamic on every call, so
  one graph serves all 1089 valid sizes; only the batch-1 → batch-N switch compiles a second graph
  (0/1 specialisation). ``torch._dynamo``'s ``unique_graphs`` counter proves it in the tests.
- Cold start: after warm-up the compile caches (Inductor FX graphs, Triton kernels, autotuning) are
  saved with ``torch.compiler.save_cache_artifacts`` into ``cache_dir`` and loaded before compiling in
  the next process.
- Inductor options are passed per compile call (never set globally at import): flux-fast's choices
  for Flux (1×1 convs as matmuls, no epilogue fusion, coordinate-descent tuning) and CUDA graphs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("SRPO_CACHE_DIR", Path.home() / ".cache" / "srpo_infer")) / "compile"


def inductor_options(device: torch.device) -> dict:
    """Inductor settings for Flux (flux-fast's), CUDA graphs on GPUs."""
    options = {
        "conv_1x1_as_mm": True,
        "epilogue_fusion": False,
        "coordinate_descent_tuning": device.type == "cuda",
        "coordinate_descent_check_all_directions": device.type == "cuda",
    }
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    return options


def compile_module(fn, device: torch.device, backend: str = "inductor"):
    """``torch.compile(fn, fullgraph=True)`` with our Inductor options (other backends take none)."""
    options = inductor_options(device) if backend == "inductor" else None
    return torch.compile(fn, fullgraph=True, backend=backend, options=options, dynamic=None)


def mark_dynamic(hidden_states: torch.Tensor, img_ids: torch.Tensor) -> None:
    """Mark the image-token dims (and the batch) dynamic so a new size does not recompile."""
    torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
    torch._dynamo.maybe_mark_dynamic(img_ids, 0)
    torch._dynamo.maybe_mark_dynamic(hidden_states, 0)


def mark_stage_dynamic(hidden_states: torch.Tensor, *rope: torch.Tensor) -> None:
    """The same for the step cache's later stages: image tokens (and batch), rotary tables' rows."""
    torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
    torch._dynamo.maybe_mark_dynamic(hidden_states, 0)
    for table in rope:
        torch._dynamo.maybe_mark_dynamic(table, 0)


def compiled_graphs() -> int:
    """Graphs compiled so far in this process (``torch._dynamo`` counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
