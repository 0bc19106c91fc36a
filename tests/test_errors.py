"""What a newcomer's mistakes get: the error names the fix (the extra to install, the nearest keyword),
in the same words in the library, the CLI and the server, before any weight loads."""

from __future__ import annotations

import sys

import pytest

import srpo_infer


def test_a_misspelled_keyword_names_the_real_one(tiny_pipe):
    with pytest.raises(
        TypeError,
        match=r"generate\(\): unknown keyword argument 'num_inferance_steps': did you "
        r"mean 'num_inference_steps'\?",
    ):
        tiny_pipe.generate("x", num_inferance_steps=2)
    with pytest.raises(TypeError, match=r"unknown keyword arguments 'guidence' \(did you mean 'guidance_scale'\?\)"):
        tiny_pipe.generate("x", guidence=3, seeed=1)


def test_module_generate_checks_keywords_before_loading_a_model(monkeypatch):
    from srpo_infer import loading

    monkeypatch.setattr(loading, "default_pipeline", lambda: pytest.fail("loaded a model for a misspelled keyword"))
    with pytest.raises(TypeError, match="did you mean 'num_inference_steps'"):
        srpo_infer.generate("x", num_inferance_steps=2)


def test_load_pipeline_names_the_nearest_option():
    with pytest.raises(TypeError, match=r"unknown keyword argument 'compile_scop': did you mean 'compile_scope'\?"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", compile_scop="full")


@pytest.mark.parametrize(
    "blocked, options, words",
    [
        (
            "optimum",
            dict(quantize="fp8-weight"),
            "quantize='fp8-weight' needs optimum-quanto: pip install 'srpo-infer[fp8-weight]'",
        ),
        (
            "optimum",
            dict(quantize_text_encoder=True),
            "quantize_text_encoder=True needs optimum-quanto: pip install 'srpo-infer[fp8-weight]'",
        ),
        ("accelerate", dict(memory="offload-group"), "need accelerate"),
        ("accelerate", dict(memory="offload-model"), "need accelerate"),
    ],
)
def test_a_missing_extra_is_named_before_any_weight_loads(monkeypatch, blocked, options, words):
    from srpo_infer import components

    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")] + [blocked]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (earlier tests may have imported it)
    monkeypatch.setattr(components, "load_components", lambda *_: pytest.fail("weights loaded before the check"))
    with pytest.raises(ValueError) as refused:
        srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, **options)
    assert words in str(refused.value), str(refused.value)


def test_an_uncached_base_offline_is_one_line_at_once(monkeypatch):
    """HF_HUB_OFFLINE set (as in these tests) and the base not cached: said at once, no retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as refused:
        srpo_infer.load_pipeline("tiny-random", base="someone/not-cached-flux", device="cpu", progress=False)
    message = str(refused.value)
    assert "'someone/not-cached-flux' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in message
    assert "\n" not in message and "gated" not in message


def test_an_unreachable_hub_is_named_instead_of_retried(monkeypatch, tmp_path):
    """No network: the Hub's host does not answer (here a closed local port refuses at once)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for kwargs, what in (
        (dict(model="someone/not-cached-srpo"), "model"),
        (dict(model="tiny-random", base="someone/not-cached-flux"), "base"),
    ):
        with pytest.raises(ValueError) as refused:
            srpo_infer.load_pipeline(device="cpu", progress=False, **kwargs)
        message = str(refused.value)
        assert f"{what} 'someone/not-cached-" in message and "127.0.0.1:9 cannot be reached (no network?)" in message
