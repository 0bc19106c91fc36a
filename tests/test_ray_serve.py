"""The flux/srpo API on Ray Serve with a local Ray: 2 replicas of the tiny model behind our ingress.

Marked ``ray``: the README's ``pytest`` leaves them out (they need ``pip install '.[ray]'`` and about a
minute and a half on 2 cores); ``.ci/run`` runs them as a second step, ``pytest -m ray``.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import post, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]  # a replica restart on a busy 2-core machine
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from srpo_infer.server.ray_serve import APP_NAME, MODEL_DEPLOYMENT, build_application  # noqa: E402

RAY_TIMEOUT = 1800  # a replica's first request on a busy CPU includes its start-up

# The hosted API's example body, at 4 steps: 16 of them at its 28 steps took over 5 minutes on a busy 2-core box.
SEED_BODY = {
    "model": "flux/srpo",
    "prompt": "A T-Rex relaxing on a beach, lying on a sun lounger and wearing sunglasses.",
    "image_size": {"width": 1440, "height": 512},
    "num_inference_steps": 4,
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # no /dev/shm, no room: this machine cannot run Ray
        pytest.skip(f"a local Ray cannot start here: {exc}")
    port = _port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_application(
            "tiny-random",
            replicas=2,
            use_gpu=False,
            pipeline_options={"device": "cpu"},
            app_options={"output_dir": str(tmp_path_factory.mktemp("ray-out"))},
            warmup_sizes=[(512, 512)],
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sixteen_concurrent_seed_requests_are_all_answered_by_both_replicas(cluster):
    wait_healthy(cluster, timeout=120)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post(cluster, SEED_BODY, timeout=RAY_TIMEOUT), range(16)))
    assert [a.status_code for a in answers] == [200] * 16, [a.text[:200] for a in answers if a.status_code != 200]
    for a in answers:
        image = a.json()["images"][0]
        assert (image["width"], image["height"], image["content_type"]) == (1440, 512, "image/jpeg")
        fetched = httpx.get(cluster + image["url"])
        assert fetched.status_code == 200 and fetched.content[:2] == b"\xff\xd8"  # a JPEG, from the ingress
    assert len({a.json()["meta"]["replica"] for a in answers}) >= 2


def test_bad_requests_get_the_same_422_as_the_single_process_server(cluster):
    r = post(cluster, {"prompt": "a cat", "num_inferance_steps": 1}, timeout=RAY_TIMEOUT)
    assert r.status_code == 422
    assert r.json() == {
        "error": {
            "message": "unknown field 'num_inferance_steps': did you mean 'num_inference_steps'?",
            "field": "num_inferance_steps",
            "status": 422,
        }
    }
    r = post(cluster, {"prompt": "a cat", "seed": True}, timeout=RAY_TIMEOUT)
    assert r.status_code == 422 and r.json()["error"]["field"] == "seed"


def _replica_infos(handle, calls: int = 8) -> dict:
    """``info()`` of each replica, by pid (the handle routes each call to any replica)."""
    return {i["pid"]: i for i in (handle.info.remote().result() for _ in range(calls))}


def test_a_client_that_hangs_up_stops_its_generation_on_the_replica(cluster):
    wait_healthy(cluster, timeout=120)
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP_NAME)
    before = sum(i["cancelled"] for i in _replica_infos(handle).values())
    long = {"prompt": "a long one", "image_size": "square_hd", "num_inference_steps": 50}
    with pytest.raises(httpx.TimeoutException):
        post(cluster, long, timeout=3)  # the client gives up while the replica is generating
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # far less than 50 steps at 1024² would take to finish
        if sum(i["cancelled"] for i in _replica_infos(handle).values()) > before:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("no replica stopped the abandoned generation")


def test_a_killed_replica_loses_no_request_and_the_deployment_serves_again(cluster):
    wait_healthy(cluster, timeout=120)
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP_NAME)
    pids = {handle.info.remote().result()["pid"] for _ in range(8)}
    assert len(pids) == 2
    body = {"prompt": "a lighthouse", "image_size": "square_hd", "num_inference_steps": 10}
    victim = sorted(pids)[0]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, cluster, body, RAY_TIMEOUT) for _ in range(6)]
        # Kill the replica only once it is inside a generation (a step begun, not yet finished): the kill
        # must hit a running request, which the backend then retries on the live replica.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            info = _replica_infos(handle).get(victim, {})
            if info.get("running", 0) > 0 and info.get("steps_begun", 0) > 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the replica to kill never ran a request")
        os.kill(victim, signal.SIGKILL)
        answers = [f.result() for f in futures]  # a request left without an answer would raise here
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503}, [a.text[:200] for a in answers]
    assert codes.count(200) >= 3  # the live replica's, and the retried ones
    for a in answers:
        if a.status_code == 503:
            assert "replica died" in a.json()["error"]["message"]
    wait_healthy(cluster, timeout=120)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Ray Serve restarts the dead replica
        if len({handle.info.remote().result()["pid"] for _ in range(8)}) == 2:
            break
        time.sleep(1)
    assert (
        post(
            cluster, {"prompt": "after", "image_size": "square", "num_inference_steps": 2}, timeout=RAY_TIMEOUT
        ).status_code
        == 200
    )
