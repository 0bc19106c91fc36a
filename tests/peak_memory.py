"""Peak host memory of loading one checkpoint, measured in a forked child of the test process.

A fork starts with every import already done (a fresh interpreter spent about 5 s per test importing
torch and diffusers, most of these tests' time), and the child trims the C heap before its baseline,
so memory the test process freed earlier cannot be reused unseen: every page the load touches counts.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import threading
import traceback
import warnings

import torch

# A transformer of about 150 MB in fp32: large next to what the loader itself allocates, small to write.
MEDIUM_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=128,
    num_attention_heads=4,
    joint_attention_dim=512,
    pooled_projection_dim=256,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def medium_state_dict() -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**MEDIUM_TRANSFORMER).state_dict()


def _anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _measure(conn, path: str) -> None:
    try:
        from srpo_infer.checkpoint import load_transformer

        torch.set_num_threads(1)  # as DataLoader workers do: no OpenMP pool inherited across the fork
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so reusing them counts
        base = _anon_bytes()
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _anon_bytes())
                done.wait(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        model = load_transformer(path, dtype=torch.bfloat16)
        done.set()
        sampler.join()
        peak[0] = max(peak[0], _anon_bytes())
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        conn.send({"peak_delta": peak[0] - base, "model_bytes": nbytes})
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def peak_memory_of_loading(path: str, timeout: float = 240) -> dict:
    """``{"peak_delta": bytes, "model_bytes": bytes}`` of ``load_transformer(path, dtype=bfloat16)``."""
    import importlib

    # Every module the loader may import lazily is imported before the fork: the baseline holds them.
    modules = ("gguf", "tqdm.auto", "safetensors.torch", "diffusers.models.transformers.transformer_flux")
    for name in (*modules, "srpo_infer.checkpoint"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    with warnings.catch_warnings():
        # Python 3.12+ warns on fork() in a threaded process; the child runs only the code above.
        warnings.simplefilter("ignore", DeprecationWarning)
        child = context.Process(target=_measure, args=(send, path), daemon=True)
        child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            child.kill()
            raise TimeoutError(f"loading {path} in a child process took over {timeout} s")
        try:
            result = receive.recv()
        except EOFError:  # the child died without a word: killed for memory, or crashed
            child.join()
            raise AssertionError(f"the child process ended with exit code {child.exitcode} and no result") from None
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
    if "error" in result:
        raise AssertionError(f"the child process failed:\n{result['error']}")
    return result
