"""LoRAs per request: ``generate(loras=[...])`` and ``serve --lora-dir``'s ``loras: [{path, scale}]``.
The same image as a pipeline loaded with the adapter, nothing left for the next request, no graph
compiled when moving between adapters under regional compile, and clear refusals."""

from __future__ import annotations

import base64
import io
import re

import httpx
import numpy as np
import pytest
import torch
from live_server import LiveServer
from loras import diffusers_lora, kohya_lora, lora_factors
from PIL import Image
from safetensors.torch import save_file

from srpo_infer import GenerationRequest
from srpo_infer.bench.deviation import relative_error
from srpo_infer.lora import LoraError, has_adapter

pytest.importorskip("peft")
pytest.importorskip("fastapi")
from helpers import load_tiny as load
from helpers import pixels, post

from srpo_infer.server import create_app
from srpo_infer.server.loras import LoraLibrary

WIDTH, BLOCKS = 64, 2  # the tiny transformer
KW = {"width": 512, "height": 512, "seed": 3, "num_inference_steps": 2, "acceleration": "none"}
BODY = {
    "prompt": "a red fox in snow",
    "image_size": "square",
    "seed": 3,
    "num_inference_steps": 2,
    "acceleration": "none",
    "response_format": "b64_json",
    "output_format": "png",
}
SCALE = 0.7


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    save_file(diffusers_lora(lora_factors(WIDTH, BLOCKS, 4, seed=1)), d / "a.safetensors")
    save_file(kohya_lora(lora_factors(WIDTH, BLOCKS, 8, seed=2)), d / "b.safetensors")
    save_file(diffusers_lora(lora_factors(WIDTH, BLOCKS, 160, seed=3)), d / "huge.safetensors")  # rank > 128
    save_file(diffusers_lora(lora_factors(WIDTH * 2, BLOCKS, 4, seed=4)), d / "wide.safetensors")  # other widths
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        },
        d / "sdxl.safetensors",
    )
    (d / "junk.safetensors").write_bytes(b"not a safetensors file")
    (d / "sub").mkdir()
    save_file(diffusers_lora(lora_factors(WIDTH, BLOCKS, 4, seed=1)), d / "sub" / "hidden.safetensors")
    return d


@pytest.fixture(scope="module")
def reference(folder):
    """Images of pipelines loaded the usual way: no LoRA, lora=a at SCALE, and a + b merged in weights."""
    return {
        "base": load().generate("a red fox in snow", **KW).images[0],
        "a": load(lora=str(folder / "a.safetensors"), lora_scale=SCALE).generate("a red fox in snow", **KW).images[0],
    }


def test_a_request_lora_gives_the_loaded_lora_image_and_leaves_nothing(tiny_pipe, folder, reference):
    a = str(folder / "a.safetensors")
    got = tiny_pipe.generate("a red fox in snow", loras=[{"path": a, "scale": SCALE}], **KW).images[0]
    assert np.abs(pixels(got) - pixels(reference["a"])).max() <= 1  # within 1/255
    assert not has_adapter(tiny_pipe.transformer)
    after = tiny_pipe.generate("a red fox in snow", **KW).images[0]
    assert np.array_equal(pixels(after), pixels(reference["base"]))  # nothing bled into the next request
    req = GenerationRequest("a red fox in snow", 512, 512, seed=3, num_inference_steps=2, loras=((a, SCALE),))
    loaded = load(lora=a, lora_scale=SCALE).generate_latents(dataclasses_replace(req, loras=()))
    assert relative_error(tiny_pipe.generate_latents(req), loaded) < 1e-4
    two = tiny_pipe.generate_latents(dataclasses_replace(req, loras=((a, 0.5), (a, 0.2))))  # a sum of adapters
    assert relative_error(two, loaded) < 1e-4


def test_the_library_refuses_bad_adapters_and_leaves_nothing(tiny_pipe, folder, reference):
    for name, words in (
        ("wide", "does not fit"),
        ("sdxl", "a LoRA for another model?"),
        ("junk", "not a readable safetensors file"),
    ):
        with pytest.raises(LoraError, match=re.escape(words)):
            tiny_pipe.generate("a red fox in snow", loras=[(str(folder / f"{name}.safetensors"), 1.0)], **KW)
        assert not has_adapter(tiny_pipe.transformer)
    assert np.array_equal(pixels(tiny_pipe.generate("a red fox in snow", **KW).images[0]), pixels(reference["base"]))


def dataclasses_replace(req, **kw):
    import dataclasses

    return dataclasses.replace(req, **kw)


@pytest.fixture(scope="module")
def compiled_server(folder, tmp_path_factory):
    torch._dynamo.reset()
    library = LoraLibrary(folder)
    pipe = load(compile=True, compile_backend="eager", cache_dir=None, lora_slot=library.slot_layers())
    library.install(pipe)
    pipe.warmup([(512, 512)])
    app = create_app(pipe, output_dir=tmp_path_factory.mktemp("out"), loras=library)
    with LiveServer(app) as live:
        live.pipe, live.folder = pipe, folder
        yield live


def post_changed(server, **change):
    """The standard body, with ``change``."""
    return post(server, {**BODY, **change})


def image_of(r) -> Image.Image:
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))


def test_moving_between_adapters_compiles_nothing_and_nothing_bleeds(compiled_server, reference):
    pipe = compiled_server.pipe
    base = image_of(post_changed(compiled_server))
    assert np.array_equal(pixels(base), pixels(reference["base"]))
    graphs = pipe.compiled_graphs()
    a = [{"path": "a.safetensors", "scale": SCALE}]
    first = image_of(post_changed(compiled_server, loras=a))
    b = image_of(post_changed(compiled_server, loras=[{"path": "b", "scale": 1.0}]))
    none = image_of(post_changed(compiled_server))
    again = image_of(post_changed(compiled_server, loras=a))
    assert pipe.compiled_graphs() == graphs, "moving between adapters compiled a graph"
    with pytest.raises(LoraError, match=r"rank 160 .* is over this pipeline's maximum, 128"):  # the library's own check
        pipe.generate("a red fox in snow", loras=[(str(library_file(compiled_server, "huge")), 1.0)], **KW)
    assert np.abs(pixels(first) - pixels(reference["a"])).max() <= 1
    assert np.array_equal(pixels(again), pixels(first))
    assert np.array_equal(pixels(none), pixels(base))
    assert np.abs(pixels(b) - pixels(base)).max() > 10  # b did something


def library_file(server, name):
    return server.folder / f"{name}.safetensors"


def test_the_folder_is_listed_with_rank_and_target(compiled_server):
    listing = httpx.get(f"{compiled_server.url}/v1/loras").json()
    rows = {row["name"]: row for row in listing["data"]}
    assert set(rows) == {
        "a.safetensors",
        "b.safetensors",
        "huge.safetensors",
        "wide.safetensors",
        "sdxl.safetensors",
        "junk.safetensors",
    }
    assert (rows["a.safetensors"]["rank"], rows["a.safetensors"]["target_model"]) == (4, "FLUX.1 transformer")
    assert rows["b.safetensors"]["rank"] == 8 and "problem" in rows["wide.safetensors"]
    assert "junk.safetensors" in rows["junk.safetensors"]["problem"] and str(compiled_server.folder) not in str(rows)
    assert listing["max_loras"] == 3 and listing["max_rank"] == 128


@pytest.mark.parametrize(
    "loras, words",
    [
        ([{"path": "https://example.com/a.safetensors"}], "is a URL"),
        ([{"path": "/etc/passwd"}], "is an absolute path"),
        ([{"path": "../a.safetensors"}], "climbs out of the LoRA folder"),
        ([{"path": "sub/hidden.safetensors"}], "names a subfolder"),
        ([{"path": "c.safetensors"}], "is not in this server's LoRA folder"),
        ([{"path": "junk.safetensors"}], "not a readable safetensors file"),
        ([{"path": "sdxl"}], "a LoRA for another model?"),
        ([{"path": "wide"}], "does not fit the transformer"),
        ([{"path": "huge"}], "loras rank 160 (summed over the request's adapters) is over this server's maximum, 128"),
        ([{"path": "a", "scale": 9.0}], "loras scale must be a number in [-4, 4], got 9.0"),
        ([{"path": "a"}] * 4, "loras"),
        ([{"path": "a", "weight": 1}], "loras"),
    ],
)
def test_bad_loras_are_refused_in_one_line_and_leave_nothing(compiled_server, reference, loras, words):
    r = post_changed(compiled_server, loras=loras)
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
    assert str(compiled_server.folder) not in r.text  # the server's folder is never shown to a client
    assert r.json()["error"]["field"].startswith("loras") and "\n" not in r.json()["error"]["message"]
    assert np.array_equal(pixels(image_of(post_changed(compiled_server))), pixels(reference["base"]))


def test_a_server_without_a_lora_folder_refuses_loras(tiny_pipe, tmp_path):
    with LiveServer(create_app(tiny_pipe, output_dir=tmp_path)) as live:
        r = post_changed(live, loras=[{"path": "a"}])
        assert r.status_code == 422 and "serve --lora-dir" in r.json()["error"]["message"]
        assert httpx.get(f"{live.url}/v1/loras").json()["data"] == []


def _ops_per_run(pipe) -> int:
    """aten ops one 2-step request dispatches (each a kernel launch or more on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        pipe.run(GenerationRequest("a red fox in snow", 512, 512, seed=3, num_inference_steps=2))
    return Count.ops


def test_the_lora_slot_costs_no_op_while_no_request_names_a_lora(folder):
    """The slot, installed by the ordered optimization function (``lora_slot``), is switched off between
    requests that name no LoRA: the same ops as a pipeline without one (before: its zero adapters ran
    two GEMMs and a scale per adapted layer, every step)."""
    from srpo_infer.lora import has_slot, slot_on
    from srpo_infer.server.loras import LoraLibrary

    plain = load(fuse_qkv=False)
    slotted = load(lora_slot=LoraLibrary(folder).slot_layers())
    assert has_slot(slotted.transformer) and slotted.optimized.steps[0].startswith("lora_slot(")
    assert _ops_per_run(slotted) == _ops_per_run(plain)
    with slot_on(slotted.transformer):  # the counter sees the slot when it is on
        assert _ops_per_run(slotted) > _ops_per_run(plain)


def test_an_eager_pipeline_with_a_slot_swaps_request_loras_into_it(folder, reference):
    """Without compile too, a slot takes each request's adapter in place and nothing bleeds."""
    from srpo_infer.lora import has_slot
    from srpo_infer.server.loras import LoraLibrary

    library = LoraLibrary(folder)
    pipe = load(lora_slot=library.slot_layers())
    library.install(pipe)
    a = str(folder / "a.safetensors")
    got = pipe.generate("a red fox in snow", loras=[{"path": a, "scale": SCALE}], **KW).images[0]
    assert np.abs(pixels(got) - pixels(reference["a"])).max() <= 1
    assert has_slot(pipe.transformer)
    assert np.array_equal(pixels(pipe.generate("a red fox in snow", **KW).images[0]), pixels(reference["base"]))


def test_a_pipeline_with_a_slot_refuses_a_lora_of_its_own(folder):
    """The slot is the requests': load_lora or set_lora_scale on it would do nothing visible (the slot is
    off between requests) and be overwritten by the next request, so each is refused in one line."""
    from srpo_infer.server.loras import LoraLibrary

    pipe = load(lora_slot=LoraLibrary(folder).slot_layers())
    with pytest.raises(LoraError, match=r"LoRA slot \(lora_slot\) takes the adapters requests name"):
        pipe.load_lora(folder / "a.safetensors", scale=0.7)
    with pytest.raises(LoraError, match="LoRA slot serves the loras requests name"):
        pipe.set_lora_scale(1.0)


def test_a_request_lora_never_replaces_the_pipelines_own_lora(folder, reference):
    """A pipeline loaded with its own separate LoRA keeps it: a request naming loras is refused in one
    line instead of deleting it (before, the request's adapter replaced it for good)."""
    a = str(folder / "a.safetensors")
    pipe = load(lora=a, lora_scale=SCALE, lora_fuse=False)
    with pytest.raises(LoraError, match=r"carries a LoRA of its own .* would replace it"):
        pipe.generate("a red fox in snow", loras=[(str(folder / "b.safetensors"), 1.0)], **KW)
    assert has_adapter(pipe.transformer)
    assert np.abs(pixels(pipe.generate("a red fox in snow", **KW).images[0]) - pixels(reference["a"])).max() <= 1
