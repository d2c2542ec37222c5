"""The output lock (pure: a local filesystem): a refused acquire leaves the other job's lock alone."""

from __future__ import annotations

import json
import time

import pytest
from pyarrow import fs as pafs

from apo_ray.errors import OutputLockedError
from apo_ray.storage import OutputLock


def test_a_refused_acquire_then_release_leaves_the_other_jobs_lock(tmp_path):
    other = {"host": "another-host", "pid": 1, "time": time.time()}
    (tmp_path / ".lock").write_text(json.dumps(other))
    lock = OutputLock(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    with pytest.raises(OutputLockedError, match="being written by another job"):
        lock.acquire()
    lock.release()  # what a driver's cleanup does after the refusal
    assert json.loads((tmp_path / ".lock").read_text()) == other


def test_a_taken_lock_is_released_once(tmp_path):
    lock = OutputLock(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    lock.acquire()
    assert (tmp_path / ".lock").exists()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text("{}")  # someone else's, later
    lock.release()
    assert (tmp_path / ".lock").exists()
