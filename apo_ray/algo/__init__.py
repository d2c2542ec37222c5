"""Pure tensor maths of A*-PO and its GRPO baseline: no configs, no torch.distributed, no Ray.

- ``vstar``: Stage 1 optimal value from N reference samples.
- ``astar_po_loss``, ``sequence_log_ratio``: Stage 2 regression loss.
- ``group_advantages``, ``grpo_loss``: the GRPO baseline.
- ``token_logprobs``, ``token_entropy``: from a causal LM's logits.
"""

from apo_ray.algo.logprobs import token_entropy, token_logprobs
from apo_ray.algo.losses import astar_po_loss, group_advantages, grpo_loss, sequence_log_ratio
from apo_ray.algo.vstar import vstar

__all__ = [
    "astar_po_loss",
    "group_advantages",
    "grpo_loss",
    "sequence_log_ratio",
    "token_entropy",
    "token_logprobs",
    "vstar",
]
