"""The bench's reports: the Markdown table (printed row by row as they land), the PNG chart, and strict
JSON."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("srpo_infer.bench")


def markdown_header() -> str:
    """The table's column header (two lines)."""
    return (
        "| setting | config | s/image | ms/step | full evals | × baseline | TFLOP/s | peak GB | first call s | "
        "recompiles | latent rel. err | PSNR dB |\n" + "|" + "---|" * 12
    )


def markdown_row(r: dict) -> str:
    """One row of the table (an error row says what failed)."""

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    if "error" in r:
        return f"| {r.get('setting', '–')} | {r['config']} | error: {r['error'][:80]} |" + " |" * 9
    config = f"{r['config']} ({r['context_parallel']})" if r.get("context_parallel") else r["config"]
    return (
        f"| {r['setting']} | {config} | {f(r['seconds_per_image'], '.3f')} | {f(r['ms_per_step'], '.1f')} | "
        f"{r['transformer_evaluations']}/{r['steps']} | "
        f"{f(r.get('speedup_vs_baseline'), '.2f')} | {f(r['transformer_tflops'], '.3g')} | "
        f"{f(r['peak_memory_gb'], '.1f')} | {f(r['first_call_seconds'], '.1f')} | "
        f"{r['recompiles_after_first_size']} | {f(r.get('latent_rel_err_vs_baseline'), '.2e')} | "
        f"{f(r.get('psnr_vs_baseline_db'), '.1f')} |"
    )


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table."""
    head = (
        f"Pipeline benchmark: {result['model']} on {result['device']} ({result['dtype']}), {result['date']}, "
        f"median of {result['repeats']}"
    )
    lines = [head, "", markdown_header(), *(markdown_row(r) for r in result["rows"]), "", *markdown_notes(result)]
    return "\n".join(lines)


def markdown_notes(result: dict) -> list[str]:
    """What follows the table: what recompiles means, each recompile's reason (when there are any),
    the configurations skipped and the note on random weights."""
    reasons = [
        f"- {r['config']} at {r['setting']}: {reason}"
        for r in result["rows"]
        for reason in r.get("recompile_reasons", [])
    ]
    lines = [RECOMPILES_EXPLAINED + (" Each recompile's reason (the guard that failed):" if reasons else ""), *reasons]
    if result.get("skipped"):
        lines += ["", "Skipped (cannot run here): " + "; ".join(f"{n}: {why}" for n, why in result["skipped"].items())]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    return lines


RECOMPILES_EXPLAINED = (
    "recompiles: graphs torch.compile built at this setting after the configuration's first setting. The "
    "bench calls no warmup() (it times the first call instead), so a whole-model compile may build its VAE "
    "decoder's large-size graph here: convolution guards split the decoder into a small and a large graph, "
    "which warmup() builds ahead of any request."
)


def chart(result: dict, path: Path) -> None:
    """Seconds per image per configuration, one group of bars per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "seconds_per_image" in r]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(settings) * max(1, len(configs)) / 3), 4.5))
    width = 0.8 / max(1, len(configs))
    for i, name in enumerate(configs):
        mine = {r["setting"]: r for r in rows if r["config"] == name}
        points = [
            (j + i * width, mine[s]["seconds_per_image"], mine[s].get("speedup_vs_baseline"))
            for j, s in enumerate(settings)
            if s in mine
        ]
        ax.bar([p[0] for p in points], [p[1] for p in points], width, label=name)
        for x, y, speed in points:
            if speed:
                ax.annotate(f"{speed:.1f}×", (x, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(settings))], settings)
    ax.set_ylabel("seconds per image (median)")
    ax.set_title(f"{result['model']} on {result['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    # Strict JSON (no bare Infinity or NaN, which JSON.parse refuses): an infinite PSNR (identical
    # images) and any other non-finite number become null.
    paths["json"].write_text(json.dumps(_finite(result), indent=2, default=str, allow_nan=False) + "\n")
    paths["md"].write_text(markdown_table(result) + "\n")
    try:
        chart(result, paths["png"])
    except ImportError:  # the chart is a convenience; the numbers are in the JSON and the table
        if not _said["no matplotlib"]:  # reports are rewritten after every row: say it once
            log.warning("no chart: matplotlib is missing (pip install 'srpo-infer[bench]')")
            _said["no matplotlib"] = True
        del paths["png"]
    return paths


_said = {"no matplotlib": False}


def _finite(value):
    """``value`` with every non-finite float replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
