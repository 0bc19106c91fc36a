"""The same ``flux/srpo`` HTTP API on Ray Serve: N model replicas (one GPU each), one endpoint.

``pip install 'srpo-infer[ray]'``; ``srpo-infer serve --replicas N [--max-replicas M] [--ray-address ADDR]``.

Two deployments in one Ray Serve application:

- ``SRPOModel``: each replica loads and warms the pipeline once and generates; it asks Ray for one GPU
  (``ray_actor_options={"num_gpus": 1}``; one CPU for a CPU model such as ``tiny-random``). Between
  ``--replicas`` and ``--max-replicas`` Ray Serve autoscales on ongoing requests (its own
  ``autoscaling_config``, ``target_ongoing_requests=1``: a replica runs one generation at a time).
- ``SRPOIngress``: our FastAPI app (:func:`create_app`, built on the replica by Ray's
  ``serve.ingress`` builder), so requests are checked by exactly the same rules and answered in the
  same shape; instead of the in-process worker its backend is a :class:`RayBackend` that sends each
  job to a model replica through a deployment handle. The response's ``meta.replica`` names the
  replica that made the images. Images are stored by the ingress (one replica: one folder).

A replica that dies (out of memory, killed) takes its running request with it: the backend retries
that request once on another replica, and answers 503 if that fails too; Ray Serve restarts the
replica. ``/health`` is ``ok`` only while at least one model replica is running. A request the
ingress cancels (its client hung up) is cancelled on its replica too, which stops the generation
before its next denoising step.
"""

from __future__ import annotations

import logging
import threading
import time

from .backend import Capabilities, Job, QueueFull, ShuttingDown
from .worker import ServiceTimes

log = logging.getLogger(__name__)

APP_NAME = "srpo"
MODEL_DEPLOYMENT = "SRPOModel"
RETRIES_ON_REPLICA_DEATH = 1


def require_ray():
    """The ``ray.serve`` module, or a one-line error that names the extra to install."""
    try:
        from ray import serve
    except ImportError:
        raise ValueError("several replicas run on Ray Serve: pip install 'srpo-infer[ray]'") from None
    return serve


class SRPOModel:
    """One replica: a loaded, warmed pipeline that generates for the ingress."""

    def __init__(self, model: str, pipeline_options: dict, warmup_sizes: list, accelerations: tuple):
        from ray import serve

        from ..loading import load_pipeline
        from .serve import warm_up

        self.replica = serve.get_replica_context().replica_id.unique_id
        if str(pipeline_options.get("device") or "").startswith("cpu"):
            import torch

            torch.set_num_threads(1)  # CPU replicas share the host's cores: do not oversubscribe them
        self.pipe = load_pipeline(model, progress=False, **pipeline_options)
        self.cancelled = 0
        self.steps_begun = 0  # denoising steps begun by this replica's generations (health, tests)
        self.running = 0
        warm_up(self.pipe, warmup_sizes, accelerations)
        log.info("replica %s ready", self.replica)

    async def generate(self, request):
        """Generate in a worker thread. When the ingress cancels the request (its client hung up, or it
        drains), Ray Serve cancels this coroutine; the stop event then ends the generation at its next
        step instead of letting it run to the end on a replica others are waiting for."""
        import asyncio

        from ..pipeline import GenerationCancelled

        stop = threading.Event()

        def at_step() -> bool:
            self.steps_begun += 1
            return stop.is_set()

        def work():
            self.running += 1
            try:
                return self.pipe.generate(request, progress=False, should_stop=at_step)
            except GenerationCancelled:
                self.cancelled += 1
                raise
            finally:
                self.running -= 1

        try:
            result = await asyncio.get_running_loop().run_in_executor(None, work)
        except asyncio.CancelledError:
            stop.set()
            raise
        result.replica = self.replica
        return result

    def info(self) -> dict:
        """This replica's id, process id (tests kill replicas by pid), how many generations it stopped
        early because their request was cancelled, how many run now and the steps they have begun."""
        import os

        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "cancelled": self.cancelled,
            "running": self.running,
            "steps_begun": self.steps_begun,
        }


class RayBackend:
    """:class:`~srpo_infer.server.backend.Backend` over a Ray Serve deployment handle. It does not stream
    previews (``stream: true`` is refused in one line): a replica's previews would need a second
    channel back."""

    # No previews: a replica's would need a second channel back; no --lora-dir on replicas yet.
    capabilities = Capabilities(streams=False, adapters=False)

    def __init__(self, max_queue: int = 64, app_name: str = APP_NAME):
        from ray import serve

        self.handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=app_name)
        self.app_name, self.max_queue = app_name, max_queue
        self.times = ServiceTimes()  # a request's whole time on a replica, for Retry-After
        self._jobs: set[Job] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._ready_at = 0.0
        self._ready = False
        self._replicas = 0

    @property
    def ready(self) -> bool:
        """At least one model replica is running (asked of Ray at most once a second)."""
        if time.monotonic() - self._ready_at > 1.0:
            self._ready_at = time.monotonic()
            try:
                from ray import serve

                app = serve.status().applications.get(self.app_name)
                states = app.deployments[MODEL_DEPLOYMENT].replica_states if app else {}
                self._replicas = states.get("RUNNING", 0)
                self._ready = self._replicas > 0
            except Exception:  # the controller may be restarting: not ready until it answers
                log.debug("serve.status failed", exc_info=True)
                self._ready = False
        return self._ready

    @property
    def depth(self) -> int:
        return len(self._jobs)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def expected_wait(self) -> float:
        """The jobs in flight at the measured times, shared by the running replicas."""
        with self._lock:
            work = sum(self.times.estimate(j.cost) for j in self._jobs)
        return work / max(1, self._replicas)

    def attach(self, pipeline) -> None:
        """Nothing to attach: each replica loads its own pipeline."""

    def cancel(self, job: Job) -> None:
        """Stop ``job``: its replica call is cancelled at the next check (a quarter second)."""
        job.cancel()

    def submit(self, request, previews: int = 0, on_preview=None) -> Job:
        if previews:
            raise ValueError("the Ray Serve backend sends no previews (capabilities.streams is False)")
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        job = Job(request)
        with self._lock:
            if len(self._jobs) >= self.max_queue:
                raise QueueFull
            self._jobs.add(job)
        threading.Thread(target=self._run, args=(job,), name="srpo-ray-job", daemon=True).start()
        return job

    def _run(self, job: Job) -> None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        try:
            if not job.future.set_running_or_notify_cancel():
                return
            for attempt in range(RETRIES_ON_REPLICA_DEATH + 1):
                response = self.handle.generate.remote(job.request)
                t0 = time.monotonic()
                try:
                    job.future.set_result(self._wait(response, job))
                    self.times.record(job.cost, time.monotonic() - t0)
                    return
                except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                    log.warning("a model replica died during a request (attempt %d): %s", attempt + 1, exc)
                    last = exc
            job.future.set_exception(
                ShuttingDown(f"the model replica died twice while serving this request ({type(last).__name__})")
            )
        except BaseException as exc:  # every failure goes back to its own request
            if not job.future.done():
                job.future.set_exception(exc)
        finally:
            with self._lock:
                self._jobs.discard(job)

    @staticmethod
    def _wait(response, job: Job):
        from ..pipeline import GenerationCancelled

        while True:
            if job.stop.is_set():  # the client hung up, or the server drains
                response.cancel()
                raise GenerationCancelled("cancelled")
            try:
                return response.result(timeout_s=0.25)
            except TimeoutError:
                continue

    def stop(self, drain_timeout: float = 60.0) -> int:
        self._closed = True
        deadline = time.monotonic() + drain_timeout
        while self._jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._jobs)
        for job in left:
            job.stop.set()
        return len(left)


class _Ingress:
    """The ingress replica's class; Ray wraps it with our FastAPI app (built on the replica)."""

    def __init__(self, model=None):
        self.model = model  # the bound model deployment: passing it makes it part of the application


def build_application(
    model: str,
    *,
    replicas: int = 2,
    max_replicas: int | None = None,
    use_gpu: bool = True,
    pipeline_options: dict | None = None,
    app_options: dict | None = None,
    warmup_sizes: list | None = None,
    default_acceleration: str | None = None,
):
    """The Ray Serve application: ``SRPOModel`` replicas behind the ``SRPOIngress`` FastAPI app.
    ``default_acceleration`` None: the hosted API's (``regular``)."""
    from .serve import resolve_default_acceleration

    serve = require_ray()
    default_acceleration = resolve_default_acceleration(default_acceleration)

    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ValueError(f"--replicas must be >= 1 and --max-replicas >= --replicas, got {replicas}, {max_replicas}")
    scaling: dict = {"num_replicas": replicas}
    if max_replicas is not None and max_replicas > replicas:
        scaling = {
            "autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas, "target_ongoing_requests": 1}
        }
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    model_deployment = serve.deployment(
        SRPOModel, name=MODEL_DEPLOYMENT, ray_actor_options=resources, max_ongoing_requests=2, **scaling
    )
    options = dict(app_options or {})
    max_queue = options.pop("max_queue", 64)

    def build_ingress():
        from .app import create_app

        return create_app(backend=RayBackend(max_queue=max_queue), default_acceleration=default_acceleration, **options)

    ingress = serve.deployment(
        serve.ingress(build_ingress)(_Ingress), name="SRPOIngress", num_replicas=1, ray_actor_options={"num_cpus": 0}
    )
    accelerations = tuple(dict.fromkeys(("none", default_acceleration)))
    model_app = model_deployment.bind(model, dict(pipeline_options or {}), warmup_sizes or [(1024, 768)], accelerations)
    return ingress.bind(model_app)


def serve_replicas(
    model: str, *, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None, **build_options
) -> int:
    """Run the application on a local Ray instance (or the cluster at ``ray_address``) until SIGTERM
    or SIGINT; returns the exit code."""
    import signal

    import ray

    serve = require_ray()
    ray.init(address=ray_address, include_dashboard=False, ignore_reinit_error=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(model, **build_options), name=APP_NAME, route_prefix="/")
        log.info("Ray Serve application %r ready on http://%s:%d", APP_NAME, host, port)
        stop.wait()
        log.info("shutting down the Ray Serve application")
    except Exception as exc:
        log.error("the Ray Serve application failed: %s", exc)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
