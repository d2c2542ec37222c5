"""Where outputs live: local paths and URIs as pyarrow filesystems, whole-file writes, output locks.

    fs, path = get_fs("s3://bucket/run/vstar")     # or a local path
    fs_write_json(fs, f"{path}/manifest.json", {...})
    lock = OutputLock(fs, path, uri); lock.acquire(); ...; lock.release()

Local writes are atomic (tmp file + rename); on object stores a file is a single PUT, so a
reader sees either nothing or the whole file there too. Nothing here imports Ray or torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from apo_ray.errors import ConfigError, OutputLockedError, StorageError

log = logging.getLogger("apo_ray.storage")

LOCK_STALE_S = 120.0  # a lock whose heartbeat is older than this (and whose pid is gone) is stale


def get_fs(uri: str):
    """(pyarrow FileSystem, path) for a local path or a URI such as s3://bucket/x or gs://b/x.

    Raises:
        ValueError (pyarrow.ArrowInvalid) or OSError: a URI pyarrow cannot open.
    """
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    fs, path = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.S3FileSystem) and os.environ.get("AWS_ACCESS_KEY_ID"):
        # The keys go into the filesystem object itself, so a copy pickled to another process
        # (Ray Train's controller writes the checkpoints' index) uses them too.
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        fs = pafs.S3FileSystem(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
            region=fs.region,
            endpoint_override=endpoint or None,
            scheme="http" if endpoint.startswith("http://") else "https",
        )
    return fs, path


def open_output(uri: str, key: str):
    """`get_fs` for the output named by config key `key`: a URI pyarrow cannot open is a ConfigError naming it."""
    try:
        return get_fs(uri)
    except (ValueError, OSError) as e:
        raise ConfigError(f"config key '{key}': cannot open {uri!r}: {e}") from None


def fs_exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def fs_write_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole file; atomic on local disks (tmp + rename), a single PUT on object stores.

    Raises:
        StorageError: the write failed (e.g. disk full); no partial file is left under `path`.
    """
    import pyarrow.fs as pafs

    try:
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):  # the write or the rename failed: leave nothing half-written
                    os.unlink(tmp)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e}") from None


def fs_read_json(fs, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (numpy scalars become Python numbers)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            return obj
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that strict readers accept: NaN and +-Infinity are written as null (never as bare tokens)."""
    return json.dumps(_finite(obj), allow_nan=False, default=str, **kwargs)


def fs_write_json(fs, path: str, obj: Any) -> None:
    fs_write_bytes(fs, path, (strict_json(obj, indent=2) + "\n").encode())


def check_writable(fs, path: str, key: str) -> None:
    """Create `path` and write/delete a probe file; ConfigError naming `key` if that fails."""
    try:
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.write-probe-{uuid.uuid4().hex[:8]}"
        fs_write_bytes(fs, probe, b"ok")
        fs.delete_file(probe)
    except Exception as e:  # noqa: BLE001 - any failure means "not writable"; we re-raise with the key
        raise ConfigError(f"config key '{key}': output directory {path!r} is not writable: {e}") from None


def remove_partial_writes(fs, out: str) -> None:
    """Delete the temp files of `fs_write_bytes` that a crashed run left under `out`."""
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(out, recursive=True)):
        if ".tmp-" in info.base_name:
            fs.delete_file(info.path)


# ---------------------------------------------------------------- output locks


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


class OutputLock:
    """`.lock` in an output directory, with a heartbeat. A second writer is refused while the
    holder's process is alive (same host) or its heartbeat is fresh (other hosts, object stores).

    Args:
        fs, out: the directory, as `get_fs` returns it.
        uri: the directory as the user wrote it (for messages).
        key: the config key that names the directory (for messages).
    """

    def __init__(self, fs, out: str, uri: str, key: str = "vstar.output_dir"):
        self.fs, self.path, self.uri, self.key = fs, f"{out}/.lock", uri, key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        me = host_and_pid()
        if fs_exists(self.fs, self.path):
            try:
                other = fs_read_json(self.fs, self.path)
            except Exception:  # noqa: BLE001 - unreadable lock: treat as stale
                other = {}
            alive = other.get("host") == me["host"] and pid_alive(int(other.get("pid", -1)))
            fresh = other.get("host") != me["host"] and time.time() - float(other.get("time", 0)) < LOCK_STALE_S
            if alive or fresh:
                raise OutputLockedError(
                    f"{self.key} {self.uri!r} is being written by another job "
                    f"(host {other.get('host')}, pid {other.get('pid')}); wait for it or use another directory. "
                    f"If that job is dead, delete {self.path}."
                )
            log.warning(
                "taking over a stale lock in %s (host %s, pid %s)", self.uri, other.get("host"), other.get("pid")
            )
        fs_write_json(self.fs, self.path, me)
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_STALE_S / 4):
            fs_write_json(self.fs, self.path, host_and_pid())

    def release(self) -> None:
        """Remove the lock file if this object took it (after a refused `acquire` the file is another job's)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        try:
            self.fs.delete_file(self.path)
        except Exception:  # noqa: BLE001 - already gone
            pass
