"""What research code may still do to a diffusers pipeline around :func:`srpo_infer.optimize`, checked
where it would otherwise change nothing without a word or fail deep inside torch.

- A LoRA on Q/K/V loaded after the projections were fused would be ignored (the fused ``to_qkv`` runs,
  the adapter sits on ``to_q``/``to_k``/``to_v``): refused in one line, the adapter removed again.
- A LoRA loaded before, not merged, would be dropped by fusing: ``optimize`` leaves QKV unfused on its
  own (``fuse_qkv="auto"``) and refuses ``fuse_qkv=True``.
- A cache or layerwise-casting hook added to blocks that are already compiled fails in dynamo: refused
  in one line that says to pass it to ``optimize`` instead.
- diffusers' first-block cache and MagCache skip the blocks between which a ControlNet adds its
  residuals, and would add them twice on every skipped step: refused on a pipeline with a ControlNet.

The refusals are instance attributes of the one transformer (small callable objects, so it still
pickles and deep-copies), so the class and every other pipeline stay as diffusers made them.
"""

from __future__ import annotations

import torch

QKV_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
CONTROLNET_SAFE_CACHES = ("taylorseer",)  # predicts layer outputs inside blocks; skips no block


def live_qkv_adapters(transformer: torch.nn.Module) -> set[str]:
    """The PEFT adapters on attention Q/K/V projections whose weights are not merged into the layer."""
    names: set[str] = set()
    for module in transformer.modules():
        for projection in QKV_PROJECTIONS:
            layer = getattr(module, projection, None)
            lora_a = getattr(layer, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict):
                names |= set(lora_a.keys()) - set(getattr(layer, "merged_adapters", ()))
    return names


def has_fused_qkv(transformer: torch.nn.Module) -> bool:
    """Whether any attention runs one fused Q/K/V projection (``fuse_qkv_projections``)."""
    return any(getattr(module, "fused_projections", False) for module in transformer.modules())


def resolve_fuse_qkv(transformer: torch.nn.Module, fuse_qkv: bool | str) -> bool | str:
    """``fuse_qkv`` as it may apply to ``transformer``: unfused while a LoRA on Q/K/V is live."""
    adapters = live_qkv_adapters(transformer)
    if not adapters or fuse_qkv is False:
        return fuse_qkv
    if fuse_qkv is True:
        raise ValueError(
            f"fuse_qkv=True would drop the LoRA on to_q/to_k/to_v (adapter {', '.join(sorted(adapters))}): "
            "merge it first with pipe.fuse_lora(), or pass fuse_qkv=False (or 'auto', which then leaves QKV unfused)"
        )
    return False


def check_cache_fits(pipe, cache: str | None) -> None:
    """Refuse a cache the pipeline cannot carry: one already on the transformer, or one that skips
    blocks under a ControlNet (its residuals are added between the skipped blocks)."""
    if cache is None:
        return
    if getattr(pipe.transformer, "_hf_hook", None) is not None:  # accelerate's offload hook
        raise ValueError(
            "this transformer is offloaded already (enable_model_cpu_offload or similar): its hooks are taken off "
            "after each call, and a cache's context with them; pass memory='offload-model' to optimize() instead"
        )
    if pipe.transformer.is_cache_enabled:
        raise ValueError(
            "this transformer has a cache already (diffusers' enable_cache): call pipe.transformer.disable_cache() "
            "first, or leave acceleration/cache/cache_threshold out of optimize()"
        )
    if getattr(pipe, "controlnet", None) is not None and cache not in CONTROLNET_SAFE_CACHES:
        raise ValueError(
            f"cache={cache!r} skips the blocks a ControlNet adds its residuals between and would add them twice on "
            f"every skipped step ({type(pipe).__name__}): use cache='taylorseer', or no cache"
        )


def guard_after_optimize(transformer: torch.nn.Module, *, compiled: bool) -> None:
    """Refuse, on this transformer only, what would be ignored or fail after ``optimize``."""
    if has_fused_qkv(transformer):
        transformer.load_lora_adapter = LoraUnlessOnFusedQkv(transformer)
    if compiled:
        transformer.enable_cache = Refusal(
            "enable_cache() after optimize(compile=True): the compiled blocks cannot take a cache hook now; "
            "pass acceleration= or cache= to optimize() on a fresh pipeline instead"
        )
        transformer.enable_layerwise_casting = Refusal(
            "enable_layerwise_casting() after optimize(compile=True): the compiled blocks cannot take its hooks "
            "now; pass quantize='fp8-weight' to optimize() instead, or cast without compile=True"
        )


class Refusal:
    """A method of one instance that raises its message (a plain object, so the module still pickles)."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, *args, **kwargs):
        raise ValueError(self.message)


class LoraUnlessOnFusedQkv:
    """``load_lora_adapter`` that removes the adapter again and refuses it while Q/K/V run fused and the
    adapter sits on them (an adapter elsewhere, or after ``unfuse_qkv_projections()``, loads as usual)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    def __call__(self, *args, **kwargs):
        transformer = self.transformer
        before = live_qkv_adapters(transformer)
        type(transformer).load_lora_adapter(transformer, *args, **kwargs)
        added = sorted(live_qkv_adapters(transformer) - before)
        if added and has_fused_qkv(transformer):
            transformer.delete_adapters(added)  # nothing half-loaded
            raise ValueError(
                "this LoRA's to_q/to_k/to_v layers would change nothing: optimize() fused this transformer's "
                "Q/K/V projections (fuse_qkv, on with compile=True). Pass lora= to optimize(), or load the LoRA "
                "before optimize() on a fresh pipeline"
            )
