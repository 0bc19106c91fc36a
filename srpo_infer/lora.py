"""SRPO as a LoRA on FLUX.1-dev (or any LoRA for the Flux transformer), through diffusers' loaders.

diffusers' ``FluxPipeline.load_lora_weights`` reads the common key formats (diffusers/PEFT names,
kohya/sd-scripts ``lora_unet_double_blocks_…`` names with ``alpha``, BFL names) and converts them;
peft holds the adapter. We add what a user of a fast pipeline needs around it:

- ``fuse=True`` (the default) merges the LoRA into the weights and drops the adapter layers, so every
  optimization (fused QKV, fp8, compile) applies as without a LoRA and costs nothing per step.
- ``fuse=False`` keeps the adapter separate, to change its scale or swap it. Under ``compile=True``
  diffusers' hotswap is prepared first, so :meth:`SRPOPipeline.load_lora` swaps without recompiling.
  QKV fusion is then off (the adapters sit on ``to_q``/``to_k``/``to_v``).
- Clear errors: a missing file, a LoRA whose keys match no layer of this transformer, shapes that do
  not fit (another model's, or a rank mismatch); a failed load leaves no adapter behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ADAPTER = "srpo"


class LoraError(ValueError):
    """A LoRA that cannot be applied to this transformer; the message says why."""


def read_lora(source: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA's tensors from a ``.safetensors`` file, a folder holding one, or a Hugging Face repo id."""
    from safetensors.torch import load_file

    from .checkpoint import is_repo_id

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraError(f"LoRA folder {str(path)!r} must hold exactly one .safetensors file, found {len(files)}")
        path = files[0]
    elif not path.exists():
        if not is_repo_id(str(source)):
            raise LoraError(f"LoRA file {str(source)!r} does not exist (and is not a Hugging Face repo id)")
        return _download(str(source))
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise LoraError(f"LoRA file {str(path)!r} is not a readable safetensors file: {exc}") from exc


def _download(repo_id: str) -> dict[str, torch.Tensor]:
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.safetensors"])
    except LocalEntryNotFoundError as exc:
        raise LoraError(f"LoRA {repo_id!r} is not in the local Hugging Face cache and downloading is off") from exc
    except HfHubHTTPError as exc:
        raise LoraError(f"could not download LoRA {repo_id!r}: {exc}") from exc
    files = sorted(Path(folder).rglob("*.safetensors"))
    if len(files) != 1:
        names = [f.name for f in files] or list_repo_files(repo_id)
        raise LoraError(f"LoRA repo {repo_id!r} holds {len(files)} safetensors files {names}; pass one file's path")
    return read_lora(files[0])


def has_adapter(transformer: torch.nn.Module) -> bool:
    """True when a LoRA adapter layer of ours sits in the transformer."""
    return ADAPTER in (getattr(transformer, "peft_config", None) or {})


def max_rank(state_dict: dict[str, torch.Tensor]) -> int:
    """The largest LoRA rank in a state dict in any of the common formats (down / A matrices)."""
    ranks = [t.shape[0] for k, t in state_dict.items() if t.dim() == 2 and ("lora_down" in k or "lora_A" in k)]
    if not ranks:
        raise LoraError("this file holds no LoRA matrices (no lora_A / lora_down weights)")
    return max(ranks)


def apply_lora(flux, state_dict: dict[str, torch.Tensor], scale: float = 1.0, fuse: bool = True,
               hotswap: bool = False) -> None:  # fmt: skip
    """Load ``state_dict`` into ``flux`` (a diffusers ``FluxPipeline``) as our adapter at ``scale``;
    ``fuse`` merges it into the weights; ``hotswap`` replaces the adapter already loaded in place."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise LoraError(f"lora_scale must be a number, got {scale!r}")
    max_rank(state_dict)  # refuses a file without LoRA matrices before diffusers sees it
    transformer = flux.transformer
    try:
        flux.load_lora_weights(dict(state_dict), adapter_name=ADAPTER, hotswap=hotswap)
    except (RuntimeError, ValueError, KeyError) as exc:
        _remove(flux, hotswap)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise LoraError(f"this LoRA does not fit the transformer (another model's, or a rank/shape mismatch): "
                        f"{first}") from exc  # fmt: skip
    if not has_adapter(transformer):
        _remove(flux, hotswap)
        raise LoraError("no key of this LoRA matches a layer of the Flux transformer: is it a LoRA for another "
                        "model? (Flux LoRAs name transformer_blocks / single_transformer_blocks or "
                        "double_blocks / single_blocks)")  # fmt: skip
    flux.set_adapters([ADAPTER], [float(scale)])
    if fuse:
        flux.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[ADAPTER])
        flux.unload_lora_weights()  # the merged weights stay; the adapter layers go
    log.info("LoRA applied at scale %g (%s)", scale, "fused into the weights" if fuse else "kept separate")


def _remove(flux, hotswap: bool) -> None:
    # A hotswap that failed leaves the previous adapter in place; a first load that failed leaves nothing.
    if not hotswap and has_adapter(flux.transformer):
        flux.delete_adapters(ADAPTER)
