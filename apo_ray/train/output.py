"""Where a Stage 2 run keeps its outputs: train.output_dir, a local path or a bucket URI.

    out = RunDir("s3://bucket/runs/train")     # or "runs/train", "/mnt/shared/train", "gs://..."
    out.write_text("config.yaml", text); out.read_text("config.yaml")
    out.local                                  # where rank 0 writes metrics.jsonl, tensorboard/, final/
    out.publish("metrics.jsonl", "tensorboard") # ... and copies them into the bucket

Ray Train writes the checkpoints (``ray/step_NNNNNN``) straight into `fs`/`path`. The files
rank 0 writes with local file APIs (metrics.jsonl, TensorBoard, the final HF model) go to
`local`: train.output_dir itself when it is a local path, else a scratch directory on rank 0's
node, published to the bucket at every checkpoint and at the end. A resumed run fetches
metrics.jsonl back first, so the bucket always holds the rows of the steps it has checkpoints
for (and, at the end, all of them).

Multi-node rule (`check_shared`): a local train.output_dir is refused when the learners span
more than one node, unless train.shared_output_dir says it is a mount every node shares
(NFS, EFS, Lustre, a bucket mount); then every learner checks that it sees the driver's
marker file there.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from apo_ray.errors import ConfigError
from apo_ray.storage import fs_exists, fs_write_bytes, open_output

DRIVER_MARKER = ".apo_driver"  # written by the driver; every learner must see the same text


class RunDir:
    """train.output_dir, opened once per process (pickled as its URI: each process opens its own)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = open_output(uri, "train.output_dir")
        self.remote = "://" in uri
        if self.remote:
            key = hashlib.sha1(uri.encode()).hexdigest()[:12]
            self.local = os.path.join(tempfile.gettempdir(), "apo-ray-train", key)
        else:
            self.local = self.path

    def __reduce__(self):
        return RunDir, (self.uri,)

    def __str__(self) -> str:
        return self.uri if self.remote else self.path

    def join(self, *parts: str) -> str:
        """A path inside the run directory, for `fs`."""
        return "/".join([self.path.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        """A path inside the run directory as the user sees it (URI or local path)."""
        return "/".join([str(self).rstrip("/"), *parts])

    def exists(self, name: str) -> bool:
        return fs_exists(self.fs, self.join(name))

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.join(name)) as f:
            return f.read().decode()

    def write_text(self, name: str, text: str) -> None:
        if not self.remote:
            os.makedirs(self.path, exist_ok=True)
        fs_write_bytes(self.fs, self.join(name), text.encode())

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.join(name))

    def local_path(self, name: str) -> str:
        return os.path.join(self.local, name)

    def fetch(self, name: str) -> None:
        """Copy file `name` from the bucket into `local` (replacing it), or remove the local copy if the bucket has none."""
        if not self.remote:
            return
        os.makedirs(self.local, exist_ok=True)
        dst = self.local_path(name)
        if self.exists(name):
            with open(dst, "w") as f:
                f.write(self.read_text(name))
        elif os.path.exists(dst):
            os.remove(dst)

    def publish(self, *names: str) -> None:
        """Copy the files or directories `names` from `local` into the bucket (no-op for a local run directory)."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        for name in names:
            src = self.local_path(name)
            if os.path.isdir(src):
                pafs.copy_files(
                    src, self.join(name), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
                )
            elif os.path.isfile(src):
                with open(src, "rb") as f:
                    fs_write_bytes(self.fs, self.join(name), f.read())


def mark_driver(out: RunDir, token: str) -> None:
    """The driver's marker in a local run directory (the learners' proof that they share it)."""
    if not out.remote:
        out.write_text(DRIVER_MARKER, token)


def check_shared(out: RunDir, node_ids: list[str], me: str, shared: bool, token: str) -> None:
    """Refuse a local run directory the learners cannot all reach (see the module doc).

    Args:
        node_ids: the Ray node id of every learner rank.
        me: this learner's node id.
        shared: train.shared_output_dir.
        token: the text the driver wrote into `DRIVER_MARKER`.

    Raises:
        ConfigError: naming train.output_dir and what to change.
    """
    nodes = len(set(node_ids))
    if out.remote or nodes == 1:
        return
    if not shared:
        raise ConfigError(
            f"config key 'train.output_dir': {out.path!r} is a local path, but the {len(node_ids)} learners run on "
            f"{nodes} nodes, which would each write their own copy. Give a bucket URI (s3://..., gs://...), or a "
            "mount every node shares with train.shared_output_dir=true"
        )
    try:
        seen = out.read_text(DRIVER_MARKER) == token
    except OSError:
        seen = False
    if not seen:
        raise ConfigError(
            f"config key 'train.shared_output_dir': true, but a learner on node {me[:12]} does not see the "
            f"driver's files in {out.path!r}: it is not a shared mount there. Give a bucket URI or a real shared mount"
        )
