"""``load_transformer``: a Flux transformer built on the meta device and filled tensor by tensor from
the checkpoint, in the target dtype on the target device."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import CheckpointError
from .hub import find_checkpoint_files
from .keys import apply_plan, bfl_to_diffusers_names
from .streaming import Index, iter_tensors, open_all
from .transformer_config import infer_transformer_config

log = logging.getLogger("srpo_infer.checkpoint")


def count_parameters(model: str, *, download: Callable[[str], str] | None = None) -> int:
    """Parameters of the transformer in ``model``, read off the file headers (no weight is read)."""
    index, _, _ = open_all(find_checkpoint_files(model, download=download))
    return sum(math.prod(shape) for _, _, shape in index.values())


def load_transformer(
    model: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    progress: bool = False,
    download: Callable[[str], str] | None = None,
):
    """Load a Flux transformer from ``model`` (file, folder or repo id) in ``dtype`` on ``device``.

    Both key formats and every file kind of the module docstring load, detected from the file.
    Every structural problem (missing file, not safetensors/GGUF, truncated, an unsupported dtype or
    quantization type, not Flux, missing/unexpected keys, wrong shapes) raises
    :class:`CheckpointError` before any weight is read.

    >>> # t = load_transformer("/models/srpo/diffusion_pytorch_model.safetensors", dtype=torch.bfloat16)
    """
    from diffusers import FluxTransformer2DModel
    from tqdm.auto import tqdm

    files = find_checkpoint_files(model, download=download)
    index, fmt, scales = open_all(files)
    plan, shapes, unmapped = _renaming(index, fmt)
    with torch.device("meta"):
        skeleton = FluxTransformer2DModel(**infer_transformer_config(shapes, _config_beside(files[0])))
    _check_shapes(skeleton, shapes, unmapped, fmt)

    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(plan), desc="loading transformer", unit="tensor", disable=not progress)
    for src, tensor in iter_tensors(index, list(plan), scales, dtype):
        # Cast on the target device tensor by tensor: host memory holds one source tensor at a time.
        tensor = tensor.to(device=device, dtype=dtype)
        state.update(apply_plan(plan[src], tensor))
        del tensor
        bar.update()
    bar.close()
    skeleton.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if still_meta:  # load_state_dict(strict=True) should make this impossible; keep the guarantee explicit
        raise CheckpointError(f"parameters left unloaded: {still_meta[:5]}")
    log.info("loaded %s transformer (%s names, %d tensors) as %s on %s", model, fmt, len(state), dtype, device)
    return skeleton.eval()


def _renaming(index: Index, fmt: str) -> tuple[dict, dict[str, tuple[int, ...]], list[str]]:
    """Source tensors → diffusers tensors (identity for diffusers names): the plan, the diffusers
    tensors' shapes, and the source tensors no diffusers tensor comes from."""
    src_shapes = {k: v[2] for k, v in index.items()}
    if fmt == "bfl":
        plan = bfl_to_diffusers_names(src_shapes)
        missing_src = [k for k in plan if k not in src_shapes]
        if missing_src:
            raise CheckpointError(f"BFL checkpoint is missing tensors: {missing_src[:5]}")
    else:
        plan = {k: [(k, 0, s[0] if s else 0, False)] for k, s in src_shapes.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for src, outs in plan.items():
        for dst, a, b, _ in outs:
            shapes[dst] = (b - a, *src_shapes[src][1:]) if src_shapes[src] else ()
    return plan, shapes, sorted(set(src_shapes) - set(plan))


def _config_beside(file: Path) -> dict:
    """The ``config.json`` next to the checkpoint (what its shapes cannot say), else nothing."""
    cfg_file = file.parent / "config.json"
    if not cfg_file.is_file():
        return {}
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc


def _check_shapes(skeleton: torch.nn.Module, shapes: dict, unmapped: list[str], fmt: str) -> None:
    """Refuse, before any weight is read, a checkpoint whose tensors are not the skeleton's."""
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected)) + unmapped
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match a Flux transformer ({fmt} names): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    wrong = [(k, shapes[k], expected[k]) for k in expected if shapes[k] != expected[k]]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(
            f"{len(wrong)} tensors have the wrong shape; first: {k!r} is {list(got)}, expected {list(want)}"
        )
