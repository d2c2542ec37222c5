"""The prompts a Stage 2 step draws from, and how the pipeline hands them over while Stage 1 runs.

    driver (`apo_ray.pipeline`)                 every Stage 2 worker (`train.recipe`)
                                                setup: learner, replica (while Stage 1 runs)
                                                data.wait(): says it is ready, then blocks
    feed.add(prompts of a finished shard)   ->  (pipeline.stream: starts with rollout_batch_size of them)
    feed.finish(all prompts, joined+checked) -> data.batch(step): the step's prompts
    feed.fail(reason)                        -> the workers stop

`StepPrompts` is the worker's side. Given the prompt list up front (jobs/train.py), or handed it
by `finish` (the pipeline), step t takes `batch_indices` over the whole list: the same prompts in
the same order as jobs/train.py. With pipeline.stream a worker starts as soon as
train.rollout_batch_size prompts have V*; before each step until `finish`, the ranks agree on how
many prompts exist (the fewest any rank has seen, so every rank draws the same step) and draw
`stream_batch_indices` from them (see the README for how this changes the data order).

`PromptFeed` is the driver's side, a plain class that `apo_ray.pipeline` runs as a Ray actor; it
also keeps the times workers became ready and stepped, which the pipeline reports.
"""

from __future__ import annotations

import time
from typing import Any

POLL_S = 0.5  # how often a waiting worker asks the feed


class PipelineStopped(RuntimeError):
    """The pipeline failed (`PromptFeed.fail`): the workers stop without saving anything."""


class PromptFeed:
    """The driver's side of the handover (append-only; run as a Ray actor by `apo_ray.pipeline`)."""

    def __init__(self) -> None:
        self._rows: list[dict] = []  # {prompt_id, prompt, answer, vstar}, in the order shards landed
        self._final: list[dict] | None = None
        self._error: str | None = None
        self._times: dict[str, Any] = {"ready": {}, "partial_steps": 0}

    def add(self, rows: list[dict]) -> None:
        self._rows.extend(rows)

    def finish(self, rows: list[dict]) -> None:
        """Every prompt with its V*, joined and checked as jobs/train.py does (`load_train_prompts`)."""
        self._final = list(rows)
        self._times["finish"] = time.time()

    def fail(self, reason: str) -> None:
        self._error = reason

    def ready(self, rank: int) -> None:
        self._times["ready"][rank] = time.time()

    def state(self) -> tuple[int, bool, str | None]:
        """(prompts added so far, whether `finish` came, the failure if any)."""
        return len(self._rows), self._final is not None, self._error

    def rows(self, start: int, end: int) -> list[dict]:
        return self._rows[start:end]

    def final(self) -> list[dict] | None:
        return self._final

    def stepped(self, step: int, available: int, complete: bool) -> None:
        """Rank 0 starts `step` drawing from `available` prompts (all of them when `complete`)."""
        self._times.setdefault("first_step", time.time())
        if not complete:
            self._times["partial_steps"] += 1
            self._times["last_partial_step"] = step

    def times(self) -> dict[str, Any]:
        return self._times


class StepPrompts:
    """The worker's side: the prompts of each step, from a list given up front or from a `PromptFeed`.

    Args:
        prompts: every prompt with its V* ({prompt_id, prompt, answer, vstar}), or None to take
            them from `feed`.
        feed: a `PromptFeed` (its Ray actor handle, or the object itself in unit tests).
        stream: start before `finish`, drawing from the prompts added so far.
        rank: this worker's rank (rank 0 reports steps to the feed).
        batch_size: train.rollout_batch_size.
        seed: train.seed.
    """

    def __init__(
        self,
        prompts: list[dict] | None = None,
        *,
        feed: Any = None,
        stream: bool = False,
        rank: int = 0,
        batch_size: int,
        seed: int,
        poll_s: float = POLL_S,
    ):
        if (prompts is None) == (feed is None):
            raise ValueError("StepPrompts takes either the prompts or a feed")
        self.prompts: list[dict] = list(prompts) if prompts is not None else []
        self.complete = prompts is not None  # every prompt is here: steps use batch_indices
        self.feed, self.stream, self.rank = feed, stream, rank
        self.batch_size, self.seed, self.poll_s = batch_size, seed, poll_s
        self.available = len(self.prompts)  # prompts the last step drew from
        self._reported = False

    def _call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.feed, method)
        if hasattr(fn, "remote"):
            import ray

            return ray.get(fn.remote(*args))
        return fn(*args)

    def wait(self) -> None:
        """Say this worker is ready, then block until it may take its first step (no-op with prompts)."""
        if self.feed is None:
            return
        self._call("ready", self.rank)
        while True:
            count, final, error = self._call("state")
            if error is not None:
                raise PipelineStopped(f"Stage 2 stopped before its first step: {error}")
            if final and not self.stream:
                self.prompts, self.complete = self._call("final"), True
                return
            if self.stream and (final or count >= self.batch_size):
                return  # the ranks agree on what to draw from at each step (`batch`)
            time.sleep(self.poll_s)

    def batch(self, step: int) -> list[dict]:
        """The `rollout_batch_size` prompts of `step` (1-based), the same on every rank."""
        from apo_ray.train.data import batch_indices, stream_batch_indices

        if not self.complete:
            self._refresh()
        n = self.available = len(self.prompts)
        if self.complete:
            idx = batch_indices(n, self.batch_size, step - 1, self.seed)
        else:
            idx = stream_batch_indices(n, self.batch_size, step - 1, self.seed)
        if self.feed is not None and self.rank == 0 and (not self.complete or not self._reported):
            self._call("stepped", step, n, self.complete)
            self._reported = True
        return [self.prompts[i] for i in idx]

    def check_failed(self) -> None:
        """Raise PipelineStopped if the pipeline has already failed (a restarted worker asks before setup)."""
        if self.feed is not None and (error := self._call("state")[2]) is not None:
            raise PipelineStopped(f"Stage 2 stopped: {error}")

    def settle(self) -> None:
        """Block until every rank holds the final prompt list: the pipeline's run-level checks of Stage 1
        passed. A streamed run calls it before anything final is saved; a no-op once complete."""
        while not self.complete:
            self._refresh(final_only=True)

    def _refresh(self, final_only: bool = False) -> None:
        """Agree with every rank on the prompts this step draws from: all of them once every rank has
        seen `finish`, else (unless final_only) the first k added, k the fewest any rank has seen (at
        least one batch)."""
        from apo_ray.train.dist import min_over_ranks

        while True:
            count, final, error = self._call("state")
            least, all_final, no_error = min_over_ranks([float(count), float(final), float(error is None)])
            if not no_error:  # every rank stops at the same step
                raise PipelineStopped(f"Stage 2 stopped: {error or 'the pipeline failed (seen by another rank)'}")
            if all_final:
                self.prompts, self.complete = self._call("final"), True
                return
            if least >= self.batch_size and not final_only:
                self.prompts.extend(self._call("rows", len(self.prompts), int(least)))
                return
            time.sleep(self.poll_s)
