"""Pipeline configuration: one dataclass that says what to load and how to run it.

Plain data: the names of the options and what ``auto`` resolves to. Whether an option can run on
this machine (a GPU with fp8 tensor cores, an installed package) is checked where it is applied,
in :func:`srpo_infer.optimize.check_available`, which ``load_pipeline`` calls before loading weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .request import MAX_SEQUENCE_LENGTH

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tencent/SRPO"
DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"
TINY_RANDOM = "tiny-random"
FULL_RANDOM = "full-random"  # FLUX.1-dev sizes, random weights, built on the GPU
COMPILE_SCOPES = ("regional", "full")
COMPILE_MODES = ("default", "max-autotune")
ATTENTION_BACKENDS = ("sdpa", "triton", "triton-int8", "triton-int8-fp8")
RING_BACKENDS = ("sdpa",)  # ring attention needs the log-sum-exp, which only the reference path returns
ATTENTION_DESIGNS = ("auto", "pointer", "tma", "ws")  # our kernels' designs (srpo_infer.kernels.launch.DESIGNS)
# Names that are gone, with what replaced them (an old script gets told, not a bare "must be one of").
RETIRED_BACKENDS = {
    "triton-fp8": "triton-int8-fp8 (INT8 q·kᵀ with smoothed keys, e4m3 p·v: 3.8% error where e4m3 q·kᵀ had 5.4%)"
}
MEMORY_MODES = ("auto", "gpu", "offload-model", "offload-group")  # see srpo_infer.memory
QUANTIZE_MODES = ("fp8", "fp8-weight")
# Module-name patterns (fnmatch, full dotted names) kept in the compute dtype when quantizing: the
# input embedders, the timestep/guidance/pooled-text embedders and the final modulation + projection.
DEFAULT_QUANTIZE_SKIP = ("x_embedder", "context_embedder", "time_text_embed*", "norm_out*", "proj_out")


def default_cache_dir() -> Path:
    """Where compiled artifacts persist: ``$SRPO_CACHE_DIR/compile``, else ``~/.cache/srpo_infer/compile``.

    Read when a config is made, never at import, so a process can set the variable late.
    """
    return Path(os.environ.get("SRPO_CACHE_DIR", Path.home() / ".cache" / "srpo_infer")) / "compile"


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU. A CUDA device without CUDA is a clear error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine; use 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means bfloat16 on CUDA (the official SRPO setting) and float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    return dtype


def _option(default, help: str, choices: tuple | None = None, cli: bool = True, factory=None):
    """A :class:`PipelineConfig` field with what a command line needs to offer it: the help text, the
    allowed values (``True``/``False``/``None`` shown as on/off/none) and whether commands get a flag.
    ``srpo_infer.cli`` builds every command's load options from these, so a new field appears on every
    command at once."""
    metadata = {"help": help, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PipelineConfig:
    """What :func:`srpo_infer.load_pipeline` loads and how the pipeline runs.

    ``model`` is a Hugging Face repo id, a local folder, a single ``.safetensors`` file, or
    ``"tiny-random"``. ``base`` supplies VAE, text encoders, tokenizers and scheduler; ``"tiny-random"``
    pairs any transformer with the tiny in-code components.

    >>> PipelineConfig(model="tiny-random").resolved().device.type in ("cpu", "cuda")
    True
    """

    model: str = _option(
        DEFAULT_MODEL,
        "transformer: HF repo id, folder, .safetensors file, 'tiny-random' (no "
        "download, CPU) or 'full-random' (FLUX.1-dev sizes, random weights, GPU)",
    )
    base: str | None = _option(
        None, "VAE/text encoders/scheduler: HF repo id or folder [default: FLUX.1-dev; the tiny ones for tiny-random]"
    )
    device: torch.device | str | None = _option(None, "cpu, cuda, cuda:1 … [default: cuda if available]")
    dtype: torch.dtype | str | None = _option(
        None, "compute dtype [default: bfloat16 on CUDA, float32 on CPU]", choices=("bfloat16", "float16", "float32")
    )
    max_sequence_length: int = _option(MAX_SEQUENCE_LENGTH, "T5 tokens of the prompt (1–512)", cli=False)
    prompt_cache_mb: int = _option(
        256, "memory for encoded prompts kept for reuse, in MB (0: encode every prompt every time)", cli=False
    )
    attention: str = _option(
        "auto",
        "attention backend (auto: sdpa until ours are measured faster on a GPU)",
        choices=("auto", *ATTENTION_BACKENDS),
    )
    attention_design: str = _option(
        "auto",
        "how our kernels load tiles: pointer (any GPU), tma (Hopper's tensor "
        "memory accelerator, sm >= 90), ws (warp-specialized, softmax under the MMAs: "
        "sm_90 only, never run on a GPU yet); auto: pointer until the sweep times the "
        "others, or $SRPO_ATTENTION_DESIGN",
        choices=ATTENTION_DESIGNS,
    )
    quantize: str | None = _option(
        "auto",
        "transformer linears: fp8 (torchao, CUDA sm >= 89), fp8-weight "
        "(optimum-quanto, memory only), none (auto: none for now)",
        choices=("auto", *QUANTIZE_MODES, None),
    )
    quantize_skip: tuple[str, ...] = _option(
        DEFAULT_QUANTIZE_SKIP, "module patterns kept in the compute dtype", cli=False
    )
    quantize_text_encoder: bool = _option(False, "store T5 in fp8-weight (~4.7 GB less memory; [fp8-weight] extra)")
    compile: bool | str = _option(
        "auto", "torch.compile the transformer (auto: off until measured on a GPU)", choices=("auto", True, False)
    )
    compile_scope: str = _option(
        "regional", "regional: the repeated blocks only; full: whole transformer + VAE decoder", choices=COMPILE_SCOPES
    )
    compile_mode: str = _option(
        "default",
        "max-autotune adds GEMM/coordinate-descent tuning and CUDA graphs (slow first call)",
        choices=COMPILE_MODES,
    )
    compile_backend: str = _option("inductor", "torch.compile backend")
    fuse_qkv: bool | str = _option(
        "auto", "one QKV projection per attention (auto: with compile)", choices=("auto", True, False)
    )
    cuda_graphs: bool | str = _option(
        "auto",
        "CUDA graphs over the compiled code (auto: on CUDA with compile_scope=full or compile_mode=max-autotune)",
        choices=("auto", True, False),
    )
    cache_dir: Path | None = _option(
        None,
        "compiled artifacts [default: $SRPO_CACHE_DIR/compile, else ~/.cache/srpo_infer/compile]",
        factory=default_cache_dir,
    )
    memory: str = _option(
        "auto", "where the weights live (offload modes fit smaller GPUs; auto: from free memory)", choices=MEMORY_MODES
    )
    lora: str | None = _option(None, "a LoRA file, folder or repo id applied on load ([lora] extra)")
    lora_scale: float = _option(1.0, "the LoRA's strength")
    lora_fuse: bool = _option(True, "merge the LoRA into the weights (fast); off keeps it separate, to rescale or swap")
    lora_max_rank: int | None = _option(
        None, "with --no-lora-fuse and compile: the largest rank a swap may bring", cli=False
    )
    lora_slot: tuple[str, ...] = _option(
        (),
        "layers (diffusers names) of a zero adapter slot that per-request LoRAs swap into (serve --lora-dir)",
        cli=False,
    )
    context_parallel: int = _option(
        1,
        "processes (one per GPU) that split each image's tokens: run under torchrun "
        "--nproc-per-node N (diffusers' context parallelism)",
    )
    ring_degree: int | str = _option(
        "auto",
        "with --context-parallel: processes in ring attention, the rest Ulysses "
        "(auto: Ulysses as far as the heads divide)",
    )
    progress: bool = True

    def resolved(self) -> PipelineConfig:
        """A copy with every ``auto`` and ``None`` default turned into a concrete value, and every name
        checked (availability on this machine is :func:`srpo_infer.optimize.check_available`'s)."""
        device = resolve_device(self.device)
        base = self.base
        if base is None:
            base = self.model if self.model in (TINY_RANDOM, FULL_RANDOM) else DEFAULT_BASE
        compile = resolve_compile(self.compile, device)
        if self.fuse_qkv not in (True, False, "auto"):
            raise ValueError(f"fuse_qkv must be True, False or 'auto', got {self.fuse_qkv!r}")
        if self.cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs must be True, False or 'auto', got {self.cuda_graphs!r}")
        memory = _one_of("memory", self.memory, MEMORY_MODES)
        quantize = resolve_quantize(self.quantize)
        if memory in ("offload-model", "offload-group") and (compile or quantize == "fp8"):
            raise ValueError(
                f"memory={memory!r} runs eager with weights moving between host and device: use "
                "compile=False and quantize=None or 'fp8-weight' with it (or memory='gpu')"
            )
        separate_lora = self.lora is not None and not self.lora_fuse
        if separate_lora and self.fuse_qkv is True:
            raise ValueError(
                "fuse_qkv=True cannot keep a separate LoRA (its layers are to_q/to_k/to_v): "
                "use lora_fuse=True or fuse_qkv='auto'"
            )
        slot = tuple(self.lora_slot)
        if not all(isinstance(layer, str) for layer in slot):
            raise ValueError(f"lora_slot must be layer names (strings), got {self.lora_slot!r}")
        if slot and (self.lora is not None or self.fuse_qkv is True):
            raise ValueError(
                "lora_slot takes the request's adapters on to_q/to_k/to_v: it goes with no lora= of its own "
                "and fuse_qkv='auto' or False"
            )
        if separate_lora and resolve_quantize(self.quantize) is not None:
            raise ValueError(
                "a separate LoRA (lora_fuse=False) cannot be quantized with the transformer: "
                "use lora_fuse=True to merge it first"
            )
        cache_mb = self.prompt_cache_mb
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, int) or cache_mb < 0:
            raise ValueError(f"prompt_cache_mb must be an integer >= 0 (0: off), got {cache_mb!r}")
        context_parallel, ring_degree = resolve_context_parallel(self.context_parallel, self.ring_degree)
        if context_parallel > 1:
            scope = self.compile_scope if compile else None
            _check_context_parallel(context_parallel, ring_degree, self.attention, memory, scope)
        return PipelineConfig(
            model=os.fspath(self.model),
            base=os.fspath(base),
            device=device,
            dtype=resolve_dtype(self.dtype, device),
            max_sequence_length=self.max_sequence_length,
            prompt_cache_mb=cache_mb,
            attention=resolve_attention(self.attention),
            attention_design=_one_of("attention_design", self.attention_design, ATTENTION_DESIGNS),
            quantize=resolve_quantize(self.quantize),
            quantize_skip=tuple(self.quantize_skip),
            quantize_text_encoder=bool(self.quantize_text_encoder),
            compile=compile,
            compile_scope=_one_of("compile_scope", self.compile_scope, COMPILE_SCOPES),
            compile_mode=_one_of("compile_mode", self.compile_mode, COMPILE_MODES),
            compile_backend=self.compile_backend,
            fuse_qkv=(compile and not separate_lora and not slot) if self.fuse_qkv == "auto" else self.fuse_qkv,
            cuda_graphs=resolve_cuda_graphs(self.cuda_graphs, device, self.compile_scope, self.compile_mode)
            if compile
            else False,
            cache_dir=Path(self.cache_dir).expanduser() if self.cache_dir is not None else None,
            progress=self.progress,
            memory=memory,
            lora=None if self.lora is None else os.fspath(self.lora),
            lora_scale=self.lora_scale,
            lora_fuse=bool(self.lora_fuse),
            lora_max_rank=self.lora_max_rank,
            lora_slot=slot,
            context_parallel=context_parallel,
            ring_degree=ring_degree,
        )

    def describe(self) -> dict:
        """Plain-JSON view, for logs and benchmark records. Memory mode ``gpu`` (everything resident) on a
        CPU reads as what it is there.

        >>> PipelineConfig(model="tiny-random", device="cpu", memory="gpu").resolved().describe()["memory"]
        'gpu (on a cpu: everything in host memory)'
        """
        d = asdict(self)
        if isinstance(self.device, torch.device) and self.device.type == "cpu" and self.memory == "gpu":
            d["memory"] = "gpu (on a cpu: everything in host memory)"
        d["device"] = str(self.device)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["quantize_skip"] = list(self.quantize_skip)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return d


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def resolve_attention(backend: str) -> str:
    """``auto`` → ``sdpa`` for now: our kernels become the default once the attention benchmark shows
    them faster than the best stock path on the device at equal accuracy (what has been measured:
    ``benchmarks/results``, and the README's "Attention backends")."""
    if backend == "auto":
        return "sdpa"
    if backend in RETIRED_BACKENDS:
        raise ValueError(f"attention={backend!r} was replaced by {RETIRED_BACKENDS[backend]}")
    return _one_of("attention", backend, ("auto", *ATTENTION_BACKENDS))


def resolve_quantize(mode: str | None) -> str | None:
    """``auto`` → no quantization, on every device, until the benchmark has measured fp8's deviation
    from bf16 on real SRPO weights (the model card warns naive fp8 can under-denoise)."""
    if mode == "auto" or mode is None:
        return None
    return _one_of("quantize", mode, ("auto", *QUANTIZE_MODES, None))


def resolve_compile(value: bool | str, device: torch.device) -> bool:
    """``auto`` → eager, on every device, for now: the regional compile (the default scope) becomes the
    default once it has been measured on a GPU (``benchmarks/results``; a default must not be its first
    test). On a CPU compiling costs more than it saves. ``compile=True`` opts in."""
    if value == "auto":
        return False
    if not isinstance(value, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {value!r}")
    return value


def resolve_context_parallel(degree: int, ring_degree: int | str) -> tuple[int, int | str]:
    """``context_parallel`` as a positive int and ``ring_degree`` as ``"auto"`` or a divisor of it (a
    command line's ``"2"`` becomes 2)."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"context_parallel must be a whole number of processes >= 1, got {degree!r}")
    if isinstance(ring_degree, str) and ring_degree.isdigit():
        ring_degree = int(ring_degree)
    if ring_degree == "auto":
        return degree, ring_degree
    if isinstance(ring_degree, bool) or not isinstance(ring_degree, int) or ring_degree < 1 or degree % ring_degree:
        raise ValueError(f"ring_degree must be 'auto' or a divisor of context_parallel={degree}, got {ring_degree!r}")
    return degree, ring_degree


def resolve_cuda_graphs(cuda_graphs: bool | str, device: torch.device, scope: str, mode: str) -> bool:
    """``auto``: CUDA graphs on a GPU for the whole-model compile (a step's kernels launched by one
    replay, recorded once per size) and with ``max-autotune``; the regional compile's blocks are
    launched one by one unless asked for (each block call would record and hold its own graph)."""
    if cuda_graphs == "auto":
        return device.type == "cuda" and (scope == "full" or mode == "max-autotune")
    return bool(cuda_graphs) and device.type == "cuda"


def _check_context_parallel(
    degree: int, ring_degree: int | str, attention: str, memory: str, compile_scope: str | None
) -> None:
    """The combinations context parallelism does not run with, each named with what to use instead."""
    if attention not in ("auto", *RING_BACKENDS) and ring_degree not in ("auto", 1):
        raise ValueError(
            f"attention={attention!r} splits an image with Ulysses only (our kernels return no log-sum-exp for "
            f"ring attention): use ring_degree=1 with it, or attention='sdpa' for ring_degree={ring_degree}"
        )
    if memory in ("offload-model", "offload-group"):
        raise ValueError(
            f"memory={memory!r} cannot split an image over processes (each process holds the whole "
            "transformer on its GPU): use memory='gpu' with context_parallel"
        )
    if compile_scope == "full":
        raise ValueError(
            "compile_scope='full' does not run with context_parallel (diffusers splits the inputs "
            "with hooks around the transformer): use compile_scope='regional'"
        )
