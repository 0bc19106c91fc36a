"""Checkpoint headers (safetensors, GGUF): tensor names, dtypes and shapes, and the dtypes and
quantization types srpo_infer does not load refused by name, all before any weight is read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import CheckpointError

_SAFETENSORS_MAX_HEADER = 100_000_000
# What the gguf package dequantizes exactly, by type name; other types are refused by name.
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


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
    reader = gguf_reader(path)
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


def gguf_reader(path: Path):
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError(f"{path} is a GGUF file: pip install 'srpo-infer[gguf]' to load it") from exc
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/KeyError/struct errors on bad or cut files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}") from exc


def read_header(path: Path) -> dict[str, dict]:
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
