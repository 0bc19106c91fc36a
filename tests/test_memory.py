"""Memory modes on the tiny model: the choice ``auto`` makes, the same pixels in every mode, only one
stage's component on the device at a time with ``offload-model``, and options that cannot mix."""

from __future__ import annotations

import pytest
import torch
from checkpoints import write_checkpoint
from helpers import standard_request

import srpo_infer
from srpo_infer.checkpoint import count_parameters
from srpo_infer.components import estimate_component_bytes
from srpo_infer.memory import expected_peak, plan_memory

REQ = standard_request()
GiB = 2**30
CUDA = torch.device("cuda")


def test_auto_fits_the_card_it_finds():
    """SRPO in bf16: 23.8 GB transformer, 9.5 GB T5-XXL; with fp8-weight the transformer halves."""
    bf16 = {"transformer": int(23.8 * GiB), "text_encoder_2": int(8.9 * GiB), "text_encoder": GiB // 4, "vae": GiB // 6}
    assert plan_memory("auto", CUDA, bf16, free_bytes=75 * GiB).mode == "gpu"  # H100
    assert plan_memory("auto", CUDA, bf16, free_bytes=int(30 * GiB)).mode == "offload-model"
    assert plan_memory("auto", CUDA, bf16, free_bytes=int(23 * GiB)).mode == "offload-group"  # a 24 GB card
    fp8_weight = {**bf16, "transformer": int(11.9 * GiB)}
    plan = plan_memory("auto", CUDA, fp8_weight, free_bytes=int(15.5 * GiB))  # a 16 GB card
    assert plan.mode == "offload-model" and plan.expected_peak_bytes == expected_peak("offload-model", fp8_weight)
    assert "free on cuda" in plan.describe() and "expected peak" in plan.describe()
    assert plan_memory("auto", torch.device("cpu"), bf16).mode == "gpu"


def test_every_mode_gives_the_same_pixels(tiny_pipe):
    want = tiny_pipe.generate_latents(REQ)
    for mode in ("gpu", "offload-model", "offload-group"):
        pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, memory=mode)
        assert pipe.memory_plan.mode == mode
        assert torch.equal(pipe.generate_latents(REQ), want), mode


def test_offload_model_keeps_one_stage_on_the_device_at_a_time():
    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, memory="offload-model")
    seen = {}

    def record(name):
        def hook(*_):
            seen.setdefault(name, pipe.resident)  # a pre-hook returning a value replaces the args

        return hook

    pipe.flux.text_encoder_2.register_forward_pre_hook(record("t5"))
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(record("block"))
    pipe.vae.decoder.register_forward_pre_hook(record("vae"))
    pipe.generate("a fox", width=512, height=512, seed=1, num_inference_steps=1)
    assert seen == {"t5": {"text_encoder", "text_encoder_2"}, "block": {"transformer"}, "vae": {"vae"}}


def test_estimates_before_loading_match_what_loads(tmp_path, tiny_state):
    from srpo_infer.config import PipelineConfig
    from srpo_infer.memory import component_bytes

    path = write_checkpoint(tiny_state, tmp_path / "t.safetensors")
    assert count_parameters(str(path)) == sum(t.numel() for t in tiny_state.values())
    config = PipelineConfig(model="tiny-random", device="cpu", progress=False).resolved()
    estimate = estimate_component_bytes(config)
    loaded = component_bytes(srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False).flux.components)
    assert estimate["transformer"] == loaded["transformer"]  # parameters only: the tiny transformer has no buffers
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert 0.9 * loaded[name] <= estimate[name] <= loaded[name], name  # buffers are not estimated


def test_memory_options_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"memory must be one of \['auto', 'gpu', 'offload-model', 'offload-group'\]"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", memory="swap")
    with pytest.raises(ValueError, match="use compile=False"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", memory="offload-model", compile=True)


class _Moved(torch.nn.Module):
    """A component that records where it was sent."""

    def __init__(self, name: str, nbytes: int, moves: list):
        super().__init__()
        self.name, self.moves = name, moves
        self.weight = torch.nn.Parameter(torch.zeros(nbytes // 4))

    def to(self, device):
        self.moves.append((self.name, str(device)))
        return self


def _residency(budget):
    from srpo_infer.memory import Residency

    moves: list = []
    sizes = {"transformer": 24, "text_encoder_2": 9, "text_encoder": 1, "vae": 1}  # SRPO bf16, in "GB" of 4 bytes
    components = {name: _Moved(name, 4 * gb, moves) for name, gb in sizes.items()}
    return Residency(components, torch.device("meta"), budget_bytes=budget), moves  # "meta": the device, here


def _request(residency, prompt_cached: bool):
    if not prompt_cached:
        with residency.use("text_encoder", "text_encoder_2"):
            pass
    with residency.use("transformer"):
        pass
    with residency.use("vae"):
        pass


def test_offload_model_keeps_what_fits_the_budget_across_requests():
    """A card with room for the transformer and the VAE but not T5 too: T5 leaves for the transformer,
    the transformer stays through the decode, and a request whose prompt is cached moves nothing."""
    residency, moves = _residency(budget=4 * 27)
    _request(residency, prompt_cached=False)
    assert residency.resident == {"transformer", "vae", "text_encoder"}
    assert ("transformer", "cpu") not in moves and ("text_encoder_2", "cpu") in moves
    moves.clear()
    _request(residency, prompt_cached=True)
    assert moves == []
    _request(residency, prompt_cached=False)  # a new prompt: T5 needs room, the transformer leaves for it
    assert ("transformer", "cpu") in moves and residency.resident == {"transformer", "vae", "text_encoder"}


def test_offload_model_without_a_budget_keeps_one_stage_at_a_time():
    residency, moves = _residency(budget=None)
    _request(residency, prompt_cached=True)
    assert residency.resident == {"vae"} and ("transformer", "cpu") in moves


def test_a_cached_prompt_does_not_bring_the_text_encoders_back(tiny_pipe):
    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, memory="offload-model")
    seen = []
    pipe.flux.text_encoder_2.register_forward_pre_hook(lambda *_: seen.append(set(pipe.resident)) and None)
    pipe.generate("a fox", width=512, height=512, seed=1, num_inference_steps=1)
    pipe.generate("a fox", width=512, height=512, seed=2, num_inference_steps=1)
    assert seen == [{"text_encoder", "text_encoder_2"}]  # encoded once, while only the encoders were there
    assert pipe.resident == {"vae"}  # no budget on a CPU: one stage at a time


def test_group_offloading_on_a_gpu_streams_with_record_stream(monkeypatch):
    """On CUDA the copies run on a side stream and each onloaded weight is recorded on the compute
    stream (no host synchronize per offload); diffusers' call is recorded here, no GPU needed."""
    import diffusers.hooks

    from srpo_infer.memory import move_components

    calls, moves = [], []
    monkeypatch.setattr(diffusers.hooks, "apply_group_offloading", lambda module, **kw: calls.append((module.name, kw)))
    components = {name: _Moved(name, 4, moves) for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    move_components(components, "offload-group", torch.device("cuda"))
    assert [name for name, _ in calls] == ["transformer", "text_encoder", "text_encoder_2"]
    assert all(kw["use_stream"] and kw["record_stream"] and kw["offload_type"] == "leaf_level" for _, kw in calls)
    assert ("vae", "cuda") in moves
