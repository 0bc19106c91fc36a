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

from .errors import CheckpointError
from .hub import cached_snapshot, check_model_name, is_repo_id
from .loader import count_parameters, load_transformer

__all__ = [
    "CheckpointError",
    "cached_snapshot",
    "check_model_name",
    "count_parameters",
    "is_repo_id",
    "load_transformer",
]
