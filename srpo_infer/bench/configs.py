"""What the bench runs: the configurations (one optimization added at a time), the settings (size and
steps), the defaults per device, and what cannot run on this machine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import PipelineConfig

PROMPT = "A T-Rex relaxing on a beach, lying on a sun lounger and wearing sunglasses."
SEED = 490733907


@dataclass(frozen=True)
class BenchConfig:
    """One column of the ablation: our pipeline with these switches (``baseline`` = stock diffusers)."""

    name: str
    baseline: bool = False
    compile: bool = False
    quantize: str | None = None
    attention: str = "sdpa"
    acceleration: str = "none"
    compile_scope: str = "regional"
    compile_mode: str = "default"
    memory: str = "gpu"


# Each adds one optimization on top of compile, then everything together. "+compile" is regional;
# "+compile-full" (whole model) and "+compile-max" (max-autotune, CUDA graphs) compare compile styles.
ABLATION = (
    BenchConfig("diffusers", baseline=True),
    BenchConfig("ours-eager"),
    BenchConfig("+compile", compile=True),
    BenchConfig("+compile-full", compile=True, compile_scope="full"),
    BenchConfig("+compile-max", compile=True, compile_mode="max-autotune"),
    BenchConfig("+compile+fp8", compile=True, quantize="fp8"),
    BenchConfig("+compile+triton", compile=True, attention="triton"),
    BenchConfig("+compile+triton-int8", compile=True, attention="triton-int8"),
    BenchConfig("+compile+triton-int8-fp8", compile=True, attention="triton-int8-fp8"),
    BenchConfig("+compile+cache-regular", compile=True, acceleration="regular"),
    BenchConfig("+compile+cache-high", compile=True, acceleration="high"),
    BenchConfig("all", compile=True, quantize="fp8", attention="triton-int8-fp8"),
    BenchConfig("all+cache-high", compile=True, quantize="fp8", attention="triton-int8-fp8", acceleration="high"),
    # Memory modes, eager: what fitting a smaller card costs (peak GPU memory, seconds per image).
    BenchConfig("mem:offload-model", memory="offload-model"),
    BenchConfig("mem:offload-group", memory="offload-group"),
)
CPU_SMOKE = (
    BenchConfig("diffusers", baseline=True),
    BenchConfig("ours-eager"),
    BenchConfig("+fp8-weight", quantize="fp8-weight"),
    BenchConfig("+compile", compile=True),
    BenchConfig("+cache-high", acceleration="high"),
)
CPU_EXTRA = (BenchConfig("+compile-full", compile=True, compile_scope="full"),)  # by name: a second C++ build


@dataclass(frozen=True)
class Defaults:
    """What ``srpo-infer bench`` runs when not told: the real settings on a GPU; on a CPU a set that
    shows every mechanism and finishes in about a minute (measured: ``CPU_DEFAULTS_SECONDS``)."""

    sizes: tuple[str, ...]
    steps: int
    official: bool  # also 1024x1024 at 50 steps, SRPO's own setting
    repeats: int


GPU_DEFAULTS = Defaults(("1024x768", "1440x512", "1024x1024"), 28, True, 3)
CPU_DEFAULTS = Defaults(("512x512", "768x512"), 4, False, 2)
CPU_DEFAULTS_SECONDS = 59  # `srpo-infer bench --model tiny-random`, idle 2-core machine, empty compile cache


def select_configs(names: list[str] | None, device: torch.device) -> list[BenchConfig]:
    """The configurations to run, in the order given (default: those of the device's whole table that
    can run here: see :func:`cannot_run`)."""
    if names is None:
        return [c for c in (ABLATION if device.type == "cuda" else CPU_SMOKE) if cannot_run(c, device) is None]
    known = {c.name: c for c in (*CPU_SMOKE, *CPU_EXTRA, *ABLATION)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--configs: unknown configuration(s) {unknown}; known: {list(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def cannot_run(bench: BenchConfig, device: torch.device) -> str | None:
    """Why ``bench`` cannot run on this machine (a package or a GPU feature missing), else None."""
    if bench.baseline:
        return None
    try:
        from ..optimize import check_available

        plain = PipelineConfig(
            model="tiny-random",
            device=str(device),
            attention=bench.attention,
            quantize=bench.quantize,
            memory=bench.memory,
            compile=False,
        ).resolved()
        check_available(plain)
    except ValueError as exc:
        return str(exc)
    return None


def skipped_configs(names: list[str] | None, device: torch.device) -> dict[str, str]:
    """The default table's configurations left out because they cannot run here, with the reason (named
    configurations are never left out: they become error rows that say why)."""
    if names is not None:
        return {}
    table = ABLATION if device.type == "cuda" else CPU_SMOKE
    return {c.name: why for c in table if (why := cannot_run(c, device)) is not None}


@dataclass
class Setting:
    width: int
    height: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}@{self.steps}"


@dataclass
class BenchArgs:
    model: str = "full-random"
    base: str | None = None
    device: str | None = None
    settings: list[Setting] = field(default_factory=list)
    configs: list[str] | None = None
    repeats: int = 3
    compile_backend: str = "inductor"
    config_timeout: float | None = None  # seconds per configuration (all its settings); None: no limit
    context_parallel: int = 1  # processes per image (under torchrun) for every configuration but the baseline
