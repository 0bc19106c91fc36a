"""Fuzz the server through its own OpenAPI schema (schemathesis): no input may produce a 5xx.

The model behind the server is a stand-in that applies the real request rules and returns blank
images at once: fuzzing explores thousands of sizes and step counts that would take the tiny model
minutes each on a CPU. The real model is behind every other HTTP test (tests/test_server.py).
"""

from __future__ import annotations

import dataclasses

import pytest
from live_server import LiveServer
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402

from srpo_infer.request import GenerationRequest  # noqa: E402
from srpo_infer.result import GenerationResult  # noqa: E402
from srpo_infer.server import create_app  # noqa: E402


class EchoPipeline:
    """Takes the one typed request the server hands over, as SRPOPipeline.generate does, and answers
    with black images of the asked size."""

    def generate(self, request, *, progress=None, should_stop=None):
        assert isinstance(request, GenerationRequest)  # checked when built: a bad one cannot reach here
        req = request if request.seed is not None else dataclasses.replace(request, seed=0)
        return GenerationResult(
            images=[Image.new("RGB", (req.width, req.height)) for _ in range(req.num_images)],
            request=req,
            timings={"inference": 0.0},
            has_nsfw_concepts=[None] * req.num_images,
            tokens_used=req.image_tokens,
        )


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    app = create_app(EchoPipeline(), output_dir=tmp_path_factory.mktemp("fuzz-out"), max_queue=64)
    with LiveServer(app) as server:
        yield server


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_fuzz_has_no_server_errors(fuzz_server, mode):
    """Valid (positive) and schema-violating (negative) cases for every operation of the schema."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/images/generations", "/files/{name}", "/health", "/metrics"}
    failures, cases = [], []
    for operation in operations:

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        def fuzz(case):
            cases.append(case)
            response = case.call(base_url=fuzz_server.url, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:200]))
            case.validate_response(response, checks=[not_a_server_error])

        try:
            fuzz()
        except Unsatisfiable:
            # Negative data needs a constraint to break: the GETs take none (any file name is a valid string).
            assert mode == "negative" and operation.method.lower() == "get", operation.path
    assert not failures, failures[:5]
    assert any(c.path == "/v1/images/generations" for c in cases)
    assert mode == "negative" or any(c.path == "/files/{name}" for c in cases)
    assert len(cases) >= 100  # it really ran
