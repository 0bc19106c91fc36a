"""Loading a Flux transformer checkpoint: find the file(s), detect the key format, infer the config,
and stream tensors straight into the target dtype and device.

The official SRPO file is 47.6 GB of fp32. Reading it whole and casting afterwards would need the
fp32 size in host memory; here each tensor is read from the memory-mapped file, cast and moved on
its own, and the model is built on the meta device and filled with ``assign=True``, so peak host
memory stays near the model's size in the target dtype.

The file kinds users have, detected from the file, all in diffusers or BFL key names:

- ``.safetensors`` in fp32/bf16/fp16;
- ``.safetensors`` with ``float8_e4m3fn`` (or e5m2) weights, ComfyUI style, optionally with per-tensor
  ``<name>.scale_weight`` scales: each tensor is upcast (times its scale) while streaming;
- ``.gguf`` (e.g. ``befox/SRPO-GGUF``: Q8_0, Q6_K, Q5_K, Q4_K … in BFL names): each tensor is
  dequantized with the ``gguf`` package while streaming. The model then holds the compute dtype
  (SRPO: ~24 GB in bf16): add ``quantize="fp8-weight"`` to halve that on the GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BFL_PREFIX = "model.diffusion_model."
_SAFETENSORS_MAX_HEADER = 100_000_000
CHECKPOINT_SUFFIXES = (".safetensors", ".gguf")
# ComfyUI's scaled-fp8 files carry these beside the weights: scales (used) and markers (ignored).
SCALE_SUFFIX = ".scale_weight"
IGNORED_SUFFIXES = (".scale_input", "scaled_fp8")
# What the gguf package dequantizes exactly, by type name; other types are refused by name.
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_CHUNK_VALUES = 1 << 18  # values dequantized or upcast per step (1 MB of float32 temporaries)
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a Flux transformer; the message says exactly why."""


# --------------------------------------------------------------------------- finding the files


def is_repo_id(name: str) -> bool:
    """True when ``name`` can only be a Hugging Face repo id (``owner/name``), not a local path.

    >>> is_repo_id("tencent/SRPO"), is_repo_id("/data/SRPO"), is_repo_id("./SRPO"), is_repo_id("srpo.safetensors")
    (True, False, False, False)
    """
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name))
        and not name.startswith((".", "/", "~"))
        and not name.endswith(CHECKPOINT_SUFFIXES)
    )


RANDOM_MODELS = ("tiny-random", "full-random")  # built in code (srpo_infer.tiny, srpo_infer.full_random)


def check_model_name(model: str, what: str = "model") -> None:
    """Refuse at once (before any heavy import or download) a ``model`` that is none of: a random
    model's name, an existing file or folder, a Hugging Face repo id; a near miss names the intended one.

    >>> check_model_name("tiny-randon")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    srpo_infer.checkpoint.CheckpointError: model 'tiny-randon' does not exist (...): did you mean 'tiny-random'?
    """
    if model in RANDOM_MODELS or is_repo_id(model) or Path(model).expanduser().exists():
        return
    import difflib

    near = difflib.get_close_matches(model, RANDOM_MODELS, n=1, cutoff=0.75)
    hint = (
        f"did you mean {near[0]!r}?" if near else f"give an existing path, owner/name or one of {list(RANDOM_MODELS)}"
    )
    raise CheckpointError(f"{what} {model!r} does not exist (not a file or folder, nor a Hugging Face repo id): {hint}")


def find_checkpoint_files(model: str, *, download: Callable[[str], str] | None = None) -> list[Path]:
    """The ``.safetensors`` file(s), or the ``.gguf`` file, holding the transformer named by ``model``.

    ``model`` is a ``.safetensors`` file, a folder (a plain one, or a diffusers pipeline folder with a
    ``transformer/`` subfolder), or a Hugging Face repo id, which ``download`` (default: a snapshot
    download of the safetensors and JSON files, honouring ``HF_HUB_OFFLINE`` and ``HF_TOKEN``) turns
    into a folder.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        check_model_name(model)
        path = Path((download or _snapshot_download)(model))
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.gguf"))
    if not files:
        raise CheckpointError(f"no .safetensors or .gguf file in {str(folder)!r}")
    if len(files) > 1 and files[0].suffix == ".gguf":
        raise CheckpointError(f"{str(folder)!r} holds {len(files)} GGUF files; pass the one to load: {files}")
    return files


def _snapshot_download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # Pipeline repos keep the transformer in a subfolder; SRPO ships a single top-level file.
    patterns = ["*.safetensors", "*.json", "transformer/*.safetensors", "transformer/*.json"]
    cached = cached_snapshot(repo_id, patterns, "model")
    if cached is not None:
        return cached
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, token=os.environ.get("HF_TOKEN") or None)
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded; "
            "pass a local file or folder instead"
        ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"could not download model {repo_id!r}: {exc}") from exc


def cached_snapshot(repo_id: str, patterns: list[str], what: str) -> str | None:
    """The cached snapshot folder of ``repo_id``, or ``None`` when a download is needed and can happen.

    When it cannot (``HF_HUB_OFFLINE`` is set, or the Hub does not answer within a few seconds) this
    says so at once, in one line: the Hub client would otherwise retry for ~20 s and then blame the
    repo (gated, missing) for what is a missing network.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            "set: download it once with network (unset HF_HUB_OFFLINE), or pass a local folder"
        )
    host = hub_unreachable(constants.ENDPOINT)
    if host:
        raise CheckpointError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and {host} cannot be "
            "reached (no network?): connect, or pass a local folder; set HF_HUB_OFFLINE=1 to "
            "use only the cache"
        )
    return None


def hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """``endpoint``'s host when no TCP connection to it opens within ``timeout`` seconds, else ``None``."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError:
        return url.netloc


# --------------------------------------------------------------------------- reading the header


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor names → ``{"dtype", "shape", "data_offsets"}``, checked against the file size.

    Reading only the header (a few KB) lets every structural error be reported before a single weight
    is loaded, so a bad file never leaves a half-loaded model.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes long")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_SAFETENSORS_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path} is not a safetensors file or its header is truncated "
                    f"(header claims {header_len} bytes, file has {size})"
                )
            header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file: its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, info in header.items():
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else None
        if end is None or end > data_len:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"which holds only {data_len} bytes"
            )
    return header


def read_gguf_header(path: Path) -> dict[str, dict]:
    """Tensor names → ``{"dtype": GGUF type name, "shape": [rows, cols …] (PyTorch order)}``, from the
    header alone (the data stays memory-mapped); unsupported quantization types are refused by name."""
    reader = _gguf_reader(path)
    header = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in GGUF_TYPES:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} uses the GGUF type {qtype}, which srpo_infer does not load; "
                f"supported: {', '.join(GGUF_TYPES)}"
            )
        header[t.name] = {"dtype": qtype, "shape": [int(n) for n in reversed(t.shape.tolist())]}
    return header


def _gguf_reader(path: Path):
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError(f"{path} is a GGUF file: pip install 'srpo-infer[gguf]' to load it") from exc
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/KeyError/struct errors on bad or cut files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}") from exc


def _read_header(path: Path) -> dict[str, dict]:
    if path.suffix == ".gguf":
        return read_gguf_header(path)
    header = read_safetensors_header(path)
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} is stored as {info.get('dtype')}, which srpo_infer does not load; "
                f"supported: {', '.join(SAFETENSORS_DTYPES)}"
            )
    return header


# --------------------------------------------------------------------------- key formats


def detect_format(keys: list[str]) -> str:
    """``"diffusers"`` (``transformer_blocks.N.attn.to_q…``) or ``"bfl"`` (``double_blocks.N.img_attn…``)."""
    stripped = [k.removeprefix(BFL_PREFIX) for k in keys]
    if any(k.startswith("double_blocks.") for k in stripped):
        return "bfl"
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    raise CheckpointError(
        "not a Flux transformer checkpoint: found neither 'transformer_blocks.*' (diffusers names) nor "
        f"'double_blocks.*' (BFL names); first keys: {sorted(keys)[:5]}"
    )


def _block_count(keys: list[str], prefix: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def bfl_to_diffusers_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, int, int, bool]]]:
    """The plan that turns BFL tensors into diffusers tensors, without touching any data.

    Returns ``{bfl_name: [(diffusers_name, dim0_start, dim0_stop, swap_halves), ...]}``: each diffusers
    tensor is a row slice of one BFL tensor (fused QKV and linear1 are split along dim 0), and the final
    modulation has its shift/scale halves swapped. The mapping is the one of diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers``; that function hard-codes the FLUX.1 width
    (3072), so it cannot convert other widths such as the tiny test model. A test checks that this
    plan gives identical tensors to diffusers' converter on a full-width checkpoint.
    """
    keys = list(shapes)
    plan: dict[str, list[tuple[str, int, int, bool]]] = {}

    def whole(src: str, dst: str, swap: bool = False) -> None:
        plan.setdefault(src, []).append((dst, 0, shapes[src][0] if src in shapes else 0, swap))

    def split(src: str, dsts: list[str], sizes: list[int]) -> None:
        start = 0
        for dst, n in zip(dsts, sizes, strict=True):
            plan.setdefault(src, []).append((dst, start, start + n, False))
            start += n

    for i, o in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
        for p in ("weight", "bias"):
            whole(f"time_in.{i}.{p}", f"time_text_embed.timestep_embedder.{o}.{p}")
            whole(f"vector_in.{i}.{p}", f"time_text_embed.text_embedder.{o}.{p}")
            if any(k.startswith("guidance_in.") for k in keys):
                whole(f"guidance_in.{i}.{p}", f"time_text_embed.guidance_embedder.{o}.{p}")
    for p in ("weight", "bias"):
        whole(f"txt_in.{p}", f"context_embedder.{p}")
        whole(f"img_in.{p}", f"x_embedder.{p}")
        whole(f"final_layer.linear.{p}", f"proj_out.{p}")
        whole(f"final_layer.adaLN_modulation.1.{p}", f"norm_out.linear.{p}", swap=True)

    for n in range(_block_count(keys, "double_blocks.")):
        s, d = f"double_blocks.{n}.", f"transformer_blocks.{n}."
        for p in ("weight", "bias"):
            whole(f"{s}img_mod.lin.{p}", f"{d}norm1.linear.{p}")
            whole(f"{s}txt_mod.lin.{p}", f"{d}norm1_context.linear.{p}")
            rows = shapes.get(f"{s}img_attn.qkv.{p}", (0,))[0] // 3
            split(f"{s}img_attn.qkv.{p}", [f"{d}attn.to_{x}.{p}" for x in "qkv"], [rows] * 3)
            rows = shapes.get(f"{s}txt_attn.qkv.{p}", (0,))[0] // 3
            split(f"{s}txt_attn.qkv.{p}", [f"{d}attn.add_{x}_proj.{p}" for x in "qkv"], [rows] * 3)
            whole(f"{s}img_mlp.0.{p}", f"{d}ff.net.0.proj.{p}")
            whole(f"{s}img_mlp.2.{p}", f"{d}ff.net.2.{p}")
            whole(f"{s}txt_mlp.0.{p}", f"{d}ff_context.net.0.proj.{p}")
            whole(f"{s}txt_mlp.2.{p}", f"{d}ff_context.net.2.{p}")
            whole(f"{s}img_attn.proj.{p}", f"{d}attn.to_out.0.{p}")
            whole(f"{s}txt_attn.proj.{p}", f"{d}attn.to_add_out.{p}")
        whole(f"{s}img_attn.norm.query_norm.scale", f"{d}attn.norm_q.weight")
        whole(f"{s}img_attn.norm.key_norm.scale", f"{d}attn.norm_k.weight")
        whole(f"{s}txt_attn.norm.query_norm.scale", f"{d}attn.norm_added_q.weight")
        whole(f"{s}txt_attn.norm.key_norm.scale", f"{d}attn.norm_added_k.weight")

    for n in range(_block_count(keys, "single_blocks.")):
        s, d = f"single_blocks.{n}.", f"single_transformer_blocks.{n}."
        # linear1 = [q; k; v; mlp] with width d = linear2's output rows and mlp = the rest.
        width = shapes.get(f"{s}linear2.weight", (0,))[0]
        for p in ("weight", "bias"):
            whole(f"{s}modulation.lin.{p}", f"{d}norm.linear.{p}")
            total = shapes.get(f"{s}linear1.{p}", (0,))[0]
            split(
                f"{s}linear1.{p}",
                [f"{d}attn.to_q.{p}", f"{d}attn.to_k.{p}", f"{d}attn.to_v.{p}", f"{d}proj_mlp.{p}"],
                [width, width, width, total - 3 * width],
            )
            whole(f"{s}linear2.{p}", f"{d}proj_out.{p}")
        whole(f"{s}norm.query_norm.scale", f"{d}attn.norm_q.weight")
        whole(f"{s}norm.key_norm.scale", f"{d}attn.norm_k.weight")
    return plan


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _apply_plan(entries: list[tuple[str, int, int, bool]], tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    for dst, a, b, swap in entries:
        # Row slices of a contiguous tensor are contiguous views: no copy of the fused QKV weights.
        part = tensor[a:b] if tensor.ndim and (a, b) != (0, tensor.shape[0]) else tensor
        yield dst, _swap_halves(part) if swap else part


def convert_bfl_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-named Flux tensors (optionally ``model.diffusion_model.``-prefixed) → diffusers names.

    >>> convert_bfl_state_dict({"img_in.weight": torch.zeros(4, 2)})["x_embedder.weight"].shape
    torch.Size([4, 2])
    """
    state = {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}
    plan = bfl_to_diffusers_names({k: tuple(v.shape) for k, v in state.items()})
    return {dst: t for src, entries in plan.items() if src in state for dst, t in _apply_plan(entries, state[src])}


# --------------------------------------------------------------------------- config inference


def infer_transformer_config(shapes: dict[str, tuple[int, ...]], extra_config: dict | None = None) -> dict:
    """``FluxTransformer2DModel`` keyword arguments read off diffusers-named tensor shapes.

    ``axes_dims_rope`` is not stored in the weights: it comes from a ``config.json`` next to the
    checkpoint when there is one (``extra_config``), else from FLUX.1's rule (head_dim/8, 7/16, 7/16 of
    the head dim), which gives (16, 56, 56) for the real model.
    """
    need = [
        "x_embedder.weight",
        "context_embedder.weight",
        "transformer_blocks.0.attn.norm_q.weight",
        "time_text_embed.text_embedder.linear_1.weight",
        "proj_out.weight",
    ]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"not a complete Flux transformer checkpoint: missing {missing[:5]}")
    keys = list(shapes)
    inner, in_channels = shapes["x_embedder.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    if inner % head_dim:
        raise CheckpointError(f"inner width {inner} is not a multiple of the head dim {head_dim}")
    config = dict(
        patch_size=1,
        in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0] if shapes["proj_out.weight"][0] != in_channels else None,
        num_layers=_block_count(keys, "transformer_blocks."),
        num_single_layers=_block_count(keys, "single_transformer_blocks."),
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=shapes["context_embedder.weight"][1],
        pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in keys),
    )
    extra = extra_config or {}
    if "axes_dims_rope" in extra:
        axes = tuple(extra["axes_dims_rope"])
    else:
        axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise CheckpointError(
            f"cannot infer the RoPE axes for head dim {head_dim} (got {axes}); put a config.json with "
            "'axes_dims_rope' next to the checkpoint"
        )
    config["axes_dims_rope"] = axes
    return config


# --------------------------------------------------------------------------- loading


Index = dict[str, tuple[Path, str, tuple[int, ...]]]


def _open_all(files: list[Path]) -> tuple[Index, str, Index]:
    """Name (BFL prefix stripped) → (file, name in the file, shape) across sharded files, the key
    format, and the per-tensor fp8 scales by the name of the weight they scale."""
    index: Index = {}
    scales: Index = {}
    for f in files:
        for name, info in _read_header(f).items():
            key = name.removeprefix(BFL_PREFIX)
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key.endswith(SCALE_SUFFIX):
                scales[key.removesuffix(SCALE_SUFFIX) + ".weight"] = (f, name, tuple(info["shape"]))
                continue
            if key in index:
                raise CheckpointError(f"tensor {name!r} appears twice ({index[key][0]} and {f})")
            index[key] = (f, name, tuple(info["shape"]))
    if not index:
        raise CheckpointError(f"{[str(f) for f in files]} hold no tensors")
    orphans = sorted(set(scales) - set(index))
    if orphans:
        raise CheckpointError(f"fp8 scales without a weight to scale: {orphans[:5]}")
    return index, detect_format([v[1] for v in index.values()]), scales


def _iter_tensors(
    index: Index, names: list[str], scales: Index | None = None, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield tensors one at a time from the memory-mapped files, grouped by file: fp8 weights upcast
    (times their scale) and GGUF tensors dequantized straight into ``dtype``, others as stored."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n][0], []).append(n)
    for path, group in by_file.items():
        if path.suffix == ".gguf":
            yield from _iter_gguf(path, group, index, dtype)
        else:
            yield from _iter_safetensors(path, group, index, scales or {}, dtype)


def _iter_safetensors(
    path: Path, group: list[str], index: Index, scales: Index, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for n in group:
                tensor = f.get_tensor(index[n][1])
                if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    scale = None
                    if n in scales:
                        spath, sname, _ = scales[n]
                        scale = (f.get_tensor(sname) if spath == path else _read_one(spath, sname)).float()
                    tensor = _upcast_fp8(tensor, scale, dtype)
                elif n in scales:
                    raise CheckpointError(f"{path}: {n!r} has a scale_weight but is stored as {tensor.dtype}, not fp8")
                yield n, tensor
    except SafetensorError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _upcast_fp8(tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 → ``dtype``, times ``scale`` in float32 (a bf16 scale would round every element the same
    way), a few rows at a time so no float32 copy of the whole tensor is ever held."""
    out = torch.empty(tensor.shape, dtype=dtype)
    rows, flat = (
        out.reshape(-1, tensor.shape[-1] if tensor.dim() else 1),
        tensor.reshape(-1, tensor.shape[-1] if tensor.dim() else 1),
    )
    step = max(1, GGUF_CHUNK_VALUES // max(1, rows.shape[1]))
    for a in range(0, rows.shape[0], step):
        chunk = flat[a : a + step].float()  # fp8 arithmetic is not available on every device
        rows[a : a + step] = chunk * scale if scale is not None else chunk
    return out


def _read_one(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def _iter_gguf(path: Path, group: list[str], index: Index, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    tensors = {t.name: t for t in _gguf_reader(path).tensors}
    for n in group:
        t, shape = tensors[index[n][1]], index[n][2]
        out = torch.empty(shape, dtype=dtype)
        rows = out.reshape(-1, shape[-1]) if shape else out.reshape(1, 1)
        data = t.data.reshape(rows.shape[0], -1)  # quantized blocks never straddle rows
        step = max(1, GGUF_CHUNK_VALUES // max(1, rows.shape[1]))
        try:
            # A few rows at a time, straight into the target dtype: no float32 copy of the whole tensor, and
            # the dequantizer's temporaries stay small (measured: peak 1.04× the bf16 model's size).
            for a in range(0, rows.shape[0], step):
                chunk = dequantize(data[a : a + step], t.tensor_type).reshape(-1, rows.shape[1])
                # F32/F16 chunks come back as views of the read-only mapped file.
                rows[a : a + step] = torch.from_numpy(chunk if chunk.flags.writeable else chunk.copy())
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot dequantize {n!r} ({t.tensor_type.name}): {exc}") from exc
        yield n, out


def count_parameters(model: str, *, download: Callable[[str], str] | None = None) -> int:
    """Parameters of the transformer in ``model``, read off the file headers (no weight is read)."""
    index, _, _ = _open_all(find_checkpoint_files(model, download=download))
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
    index, fmt, scales = _open_all(files)
    src_shapes = {k: v[2] for k, v in index.items()}

    # Map source tensors → diffusers tensors (identity for diffusers names).
    if fmt == "bfl":
        plan = bfl_to_diffusers_names(src_shapes)
        missing_src = [k for k in plan if k not in src_shapes]
        if missing_src:
            raise CheckpointError(f"BFL checkpoint is missing tensors: {missing_src[:5]}")
    else:
        plan = {k: [(k, 0, s[0] if s else 0, False)] for k, s in src_shapes.items()}
    unmapped = sorted(set(src_shapes) - set(plan))
    shapes: dict[str, tuple[int, ...]] = {}
    for src, outs in plan.items():
        for dst, a, b, _ in outs:
            shapes[dst] = (b - a, *src_shapes[src][1:]) if src_shapes[src] else ()

    extra = {}
    cfg_file = files[0].parent / "config.json"
    if cfg_file.is_file():
        try:
            extra = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc
    config = infer_transformer_config(shapes, extra)

    with torch.device("meta"):
        skeleton = FluxTransformer2DModel(**config)
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

    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(plan), desc="loading transformer", unit="tensor", disable=not progress)
    for src, tensor in _iter_tensors(index, list(plan), scales, dtype):
        # Cast on the target device tensor by tensor: host memory holds one source tensor at a time.
        tensor = tensor.to(device=device, dtype=dtype)
        state.update(_apply_plan(plan[src], tensor))
        del tensor
        bar.update()
    bar.close()
    skeleton.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if still_meta:  # load_state_dict(strict=True) should make this impossible; keep the guarantee explicit
        raise CheckpointError(f"parameters left unloaded: {still_meta[:5]}")
    log.info("loaded %s transformer (%s names, %d tensors) as %s on %s", model, fmt, len(state), dtype, device)
    return skeleton.eval()
