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

import contextlib
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


def apply_lora(
    flux, state_dict: dict[str, torch.Tensor], scale: float = 1.0, fuse: bool = True, hotswap: bool = False
) -> None:
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
        raise LoraError(
            f"this LoRA does not fit the transformer (another model's, or a rank/shape mismatch): {first}"
        ) from exc
    if not has_adapter(transformer):
        _remove(flux, hotswap)
        raise LoraError(
            "no key of this LoRA matches a layer of the Flux transformer: is it a LoRA for another "
            "model? (Flux LoRAs name transformer_blocks / single_transformer_blocks or "
            "double_blocks / single_blocks)"
        )
    flux.set_adapters([ADAPTER], [float(scale)])
    if fuse:
        flux.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[ADAPTER])
        flux.unload_lora_weights()  # the merged weights stay; the adapter layers go
    log.info("LoRA applied at scale %g (%s)", scale, "fused into the weights" if fuse else "kept separate")


def _remove(flux, hotswap: bool) -> None:
    # A hotswap that failed leaves the previous adapter in place; a first load that failed leaves nothing.
    if not hotswap and has_adapter(flux.transformer):
        flux.delete_adapters(ADAPTER)


# ---------------------------------------------------------------------------------- per-request LoRAs

MAX_REQUEST_RANK = 128  # the summed rank of one request's adapters (the hotswap slot's size)
DEFAULT_CACHE_BYTES = 2 * 1024**3  # converted adapters kept in host memory, least recently used dropped


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported key format → diffusers/PEFT names (``transformer.….lora_A/B.weight``, alphas
    folded in) through diffusers' own converter; refuses keys a per-request merge cannot carry."""
    from .components import flux_pipeline_class

    max_rank(state_dict)
    try:
        converted = flux_pipeline_class().lora_state_dict(dict(state_dict))
    except Exception as exc:  # the converter's own sentence for a file it cannot read as a Flux LoRA
        said = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise LoraError(
            f"this file is not a LoRA diffusers can read for Flux (a LoRA for another model?): {said}"
        ) from exc
    converted = converted[0] if isinstance(converted, tuple) else converted
    if not any(k.startswith("transformer.") for k in converted):
        raise LoraError(
            "no key of this LoRA names a Flux transformer layer: is it a LoRA for another model? "
            "(Flux LoRAs name transformer_blocks or double_blocks / single_blocks)"
        )
    other = sorted(k for k in converted if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if other:
        raise LoraError(f"this LoRA holds keys other than lora_A/B pairs ({other[0]!r}…): not usable per request")
    return converted


def merge_loras(adapters: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """One adapter equal to the scaled sum of ``adapters`` (diffusers names): per layer the down matrices
    stacked and the up matrices side by side, each times its scale (``Σ sᵢ·Bᵢ·Aᵢ = [s₁B₁ s₂B₂]·[A₁; A₂]``)."""
    merged: dict[str, torch.Tensor] = {}
    layers = dict.fromkeys(k[: -len(".lora_A.weight")] for state, _ in adapters for k in state if ".lora_A." in k)
    for layer in layers:
        parts = [
            (s[f"{layer}.lora_A.weight"], s[f"{layer}.lora_B.weight"] * scale)
            for s, scale in adapters
            if f"{layer}.lora_A.weight" in s
        ]
        merged[f"{layer}.lora_A.weight"] = torch.cat([a for a, _ in parts], dim=0)
        merged[f"{layer}.lora_B.weight"] = torch.cat([b for _, b in parts], dim=1)
    return merged


class LoraCache:
    """Converted adapters in host memory, keyed by file, least recently used dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._states: dict[tuple, dict[str, torch.Tensor]] = {}

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._states.values() for t in s.values())

    @staticmethod
    def _key(source: str | Path) -> tuple:
        path = Path(source).expanduser()
        return (str(path.resolve()), *((path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else ()))

    def put(self, source: str | Path, state: dict[str, torch.Tensor]) -> None:
        """Keep an adapter already read and converted (:func:`to_diffusers`)."""
        self._states[self._key(source)] = state
        self._trim()

    def _trim(self) -> None:
        while len(self._states) > 1 and self.bytes > self.max_bytes:
            self._states.pop(next(iter(self._states)))

    def get(self, source: str | Path) -> dict[str, torch.Tensor]:
        key = self._key(source)
        if key in self._states:
            self._states[key] = self._states.pop(key)  # most recent last
            return self._states[key]
        state = to_diffusers(read_lora(source))
        self._states[key] = state
        self._trim()
        return state


def check_fits(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The layers (diffusers names) an adapter targets, or a LoraError when one is missing from this
    transformer or has other widths (a LoRA for another model)."""
    layers = []
    for key, tensor in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[: -len(".lora_A.weight")]
        try:
            module = transformer.get_submodule(layer.removeprefix("transformer."))
        except AttributeError:
            raise LoraError(
                f"this LoRA targets {layer!r}, which this Flux transformer does not have: is it a LoRA "
                "for another model?"
            ) from None
        up = state[f"{layer}.lora_B.weight"]
        width = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if width != (tensor.shape[1], up.shape[0]):
            raise LoraError(
                f"this LoRA does not fit the transformer (another model's?): {layer!r} takes {width[0]} "
                f"→ {width[1]} features, the file has {tensor.shape[1]} → {up.shape[0]}"
            )
        layers.append(layer)
    return layers


SLOT_MARK = "srpo_lora_slot"  # the attribute a slot leaves on its transformer: the rank it takes


def add_slot(flux, layers, rank: int = MAX_REQUEST_RANK) -> int:
    """Give ``flux``'s transformer (not called yet, QKV unfused) a zero adapter on those of ``layers``
    it has: the slot per-request adapters swap into, hotswap-ready up to ``rank`` (a compiled pipeline
    then moves between adapters without compiling), switched off until a request names a LoRA.
    Returns the number of layers. :func:`~srpo_infer.optimize.apply_optimizations` calls it for
    ``lora_slot``; a layer another model's adapter names is left out here and that adapter refused
    by :func:`check_fits`."""
    transformer = flux.transformer
    flux.enable_lora_hotswap(target_rank=rank)
    state = {}
    for layer in dict.fromkeys(layers):
        try:
            module = transformer.get_submodule(layer.removeprefix("transformer."))
        except AttributeError:
            continue
        if isinstance(module, torch.nn.Linear):
            state[f"{layer}.lora_A.weight"] = torch.zeros(1, module.in_features)
            state[f"{layer}.lora_B.weight"] = torch.zeros(module.out_features, 1)
    if not state:
        return 0
    with _quiet("diffusers.loaders.lora_base"):
        apply_lora(flux, state, 0.0, fuse=False)
    transformer.disable_lora()  # a request without loras runs the base layers only: no slot GEMMs
    setattr(transformer, SLOT_MARK, rank)
    return len(state) // 2


def has_slot(transformer: torch.nn.Module) -> bool:
    """The transformer carries our zero slot for per-request adapters (:func:`add_slot`)."""
    return getattr(transformer, SLOT_MARK, None) is not None and has_adapter(transformer)


@contextlib.contextmanager
def slot_on(transformer: torch.nn.Module):
    """The slot switched on (at whatever scale it holds) while the block runs, off again after: warm-up
    runs through it so that the first request naming a LoRA compiles nothing."""
    transformer.enable_lora()
    try:
        yield
    finally:
        transformer.disable_lora()


def _read_for_request(cache: LoraCache, path: str) -> dict[str, torch.Tensor]:
    """An adapter from the cache; an error names the file, never its folder (a server's clients read it)."""
    try:
        return cache.get(path)
    except LoraError as exc:
        name = Path(path).name
        raise LoraError(f"loras {name!r}: {str(exc).replace(str(Path(path).expanduser()), name)}") from exc


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def slot_rank(transformer: torch.nn.Module) -> int:
    """The largest rank the loaded adapter slot holds (what a hotswap may bring at most)."""
    config = transformer.peft_config[ADAPTER]
    return max([config.r, *(config.rank_pattern or {}).values()])


@contextlib.contextmanager
def request_adapter(pipe, loras: tuple[tuple[str, float], ...]):
    """While the block runs, ``pipe`` carries the scaled sum of ``loras`` (``(path, scale)`` pairs, read
    through ``pipe.lora_cache``); afterwards nothing of them is left. On a pipeline with a slot
    (``lora_slot``) the sum is swapped into it (compiled: without recompiling), and the slot goes back
    to scale 0 and off; on an eager pipeline without one the adapter is loaded and deleted again. A
    pipeline that carries a LoRA of its own refuses them: they would replace it."""
    merged = merge_loras([(_read_for_request(pipe.lora_cache, path), scale) for path, scale in loras])
    rank, transformer = max_rank(merged), pipe.transformer
    slot = has_slot(transformer)
    if not slot and has_adapter(transformer):  # never replace what the user loaded: it would be lost
        raise LoraError(
            "this pipeline carries a LoRA of its own (lora=... with lora_fuse=False, or load_lora): a request's "
            "loras would replace it; build the pipeline with lora_slot=LAYERS for per-request LoRAs (serve "
            "--lora-dir does), or merge yours with lora_fuse=True"
        )
    if slot and rank > slot_rank(transformer):
        raise LoraError(
            f"loras rank {rank} (summed over the request's adapters) is over this pipeline's maximum, "
            f"{slot_rank(transformer)}: use fewer or smaller adapters"
        )
    if not slot and (pipe.config.compile or pipe.config.fuse_qkv):
        raise LoraError(
            "loras need a LoRA slot on a compiled or QKV-fused pipeline: load it with lora_slot=LAYERS and "
            "fuse_qkv left to 'auto' (serve --lora-dir does)"
        )
    try:
        if slot:
            transformer.enable_lora()  # the slot is off between requests that name no LoRA
        try:
            with _quiet("diffusers.loaders.lora_base"):  # "no LoRA keys for CLIPTextModel", on every transformer LoRA
                apply_lora(pipe.flux, merged, 1.0, fuse=False, hotswap=slot)
        except LoraError as exc:
            names = ", ".join(repr(Path(path).name) for path, _ in loras)
            raise LoraError(f"loras {names}: {exc}") from exc
        yield
    finally:
        if slot:
            pipe.flux.set_adapters([ADAPTER], [0.0])  # the slot stays, at scale 0: the base model exactly
            transformer.disable_lora()  # and off: the next request without loras skips its GEMMs
        elif has_adapter(transformer):
            pipe.flux.delete_adapters(ADAPTER)
