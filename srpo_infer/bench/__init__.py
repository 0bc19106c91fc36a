"""``srpo-infer bench``: diffusers' FluxPipeline against our pipeline with each optimization added one
at a time, in one process, on the same weights, seeds and prompt.

Per configuration and setting (size, steps): median seconds per image, ms per transformer step,
speed-up against the baseline, achieved TFLOP/s (FLOPs counted with hooks on one forward), peak GPU
memory, first-call (compile) seconds, graphs compiled after the first size (recompiles), and the
deviation from the baseline output (latent relative error, PSNR of the decoded image).
Output: JSON, a Markdown table and a PNG chart.

Modules: ``configs`` (what runs), ``run`` (the run, one time box per configuration: ``timebox``; one
generation timed: ``timing``), ``flops``, ``deviation``, ``record`` and ``reports``. The 8-bit attention
schemes' float64 emulation (``quantised_attention``) measures the kernels' error for the tests and
``benchmarks/attention_error.py``.
"""

from .configs import CPU_DEFAULTS, CPU_DEFAULTS_SECONDS, CPU_SMOKE, GPU_DEFAULTS, BenchArgs, Setting, skipped_configs
from .reports import markdown_header, markdown_notes, markdown_row, write_reports
from .run import run_benchmark

__all__ = [
    "CPU_DEFAULTS",
    "CPU_DEFAULTS_SECONDS",
    "CPU_SMOKE",
    "GPU_DEFAULTS",
    "BenchArgs",
    "Setting",
    "markdown_header",
    "markdown_notes",
    "markdown_row",
    "run_benchmark",
    "skipped_configs",
    "write_reports",
]
