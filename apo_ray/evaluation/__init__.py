"""Evaluation: greedy accuracy, pass@k and KL(pi || pi_ref) through a pool of vLLM actors.

    python jobs/eval.py --config demo eval.model_path=runs/demo/train/final
    apo-ray eval --config demo eval.model_path=runs/demo/train eval.k=8
    ray job submit --working-dir . -- python jobs/eval.py --config NAME eval.model_path=/shared/run/train

The model (eval.model_path, else model.path) may be "tiny", a hub id, an HF model
directory, a Stage 2 checkpoint directory (holds ``hf/``) or a train.output_dir (holds
``final/``); `resolve_eval_model` picks the HF directory. The reference for the KL is
model.path. `run(cfg)` writes eval.output_dir/report.json and prints a table;
`evaluate(model_path, rows, cfg, ref_path=...)` is the same without the file (the demo
calls it before and after training, in one Ray session: nothing here shuts Ray down).

The prompts are cut into fixed chunks that a Ray Dataset fans over an autoscaling pool
of `EvalWorker` actors (`map_batches` + `ActorPoolStrategy`, the Stage 1 pattern). Each
actor owns one vLLM engine and, when the KL is measured against another model, the
reference loaded with transformers. Per prompt it computes:

- greedy correctness: temperature 0, one completion, judged by the reward function
  (correct: reward >= 1; the verifiable rewards are 0/1);
- pass@k (eval.k > 1): k completions at temperature 1; with n = k samples the unbiased
  estimator 1 - C(n-c, k) / C(n, k) is "any of the k is correct";
- the sequence log-ratio sum_t [log pi(y_t|.) - log pi_ref(y_t|.)] of one completion
  y ~ pi at temperature 1 (eval.kl_samples): y is sampled by vLLM, and log pi and log pi_ref
  both come from transformers forwards over prompt + response (the evaluated model and the
  reference, loaded in the actor in the same dtype on the same device), so the numerical gap
  between vLLM and transformers does not enter the KL. KL(pi || pi_ref) is estimated by its
  mean over prompts (the paper's metric), reported with its standard error; that gap is
  reported apart (engine_logprob_gap: mean |vLLM - transformers log pi(y)|).

Seeds: the j-th sample of the i-th evaluated prompt uses seed sampling.seed + i * n + j
(n samples per prompt; the engine's convention), so results depend neither on chunking
nor on the number of actors.

Choices and departures: pass@k and the KL sample use temperature 1 and top_p 1 whatever
sampling.* says (the KL is of the policy itself, not of a truncated sampler). With k > 1
the KL reuses the first of the k samples (a sample of pi like any other) rather than
drawing one more. When the evaluated model is the reference (same resolved path) neither
transformers copy is loaded and kl_to_ref is exactly 0 with ``kl_same_model: true``; a copy
of the same weights at another path goes the honest way (both loaded), and its KL is then 0
up to transformers' own nondeterminism. Measuring the KL costs the actor two transformers
copies besides vLLM (on a GPU: 2 x the model in bf16, plus one micro-batch of logits).
Prompts longer than sampling.max_prompt_tokens are skipped and counted (as in Stage 1),
not scored as wrong.
"""

from apo_ray.evaluation.job import evaluate, run
from apo_ray.evaluation.metrics import aggregate, format_table, pass_at_k
from apo_ray.evaluation.worker import EvalWorker, kl_log_ratios, sequence_logprobs

__all__ = [
    "EvalWorker",
    "aggregate",
    "evaluate",
    "format_table",
    "kl_log_ratios",
    "pass_at_k",
    "run",
    "sequence_logprobs",
]
