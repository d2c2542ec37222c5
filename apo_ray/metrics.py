"""Step metrics: metrics.jsonl (one line per step), TensorBoard, Ray dashboard, optional W&B / MLflow.

`MetricsLogger` is used by the rank-0 learner. W&B and MLflow are used only when
configured (train.wandb_project / train.mlflow_tracking_uri) and installed; a
missing package is a warning, not a crash.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from apo_ray.storage import strict_json

log = logging.getLogger("apo_ray.metrics")

# Shown on the Ray dashboard (Metrics tab / Grafana) as apo_train_<name>.
DASHBOARD_KEYS = ("loss", "reward_mean", "kl", "logprob_gap", "step_s", "tokens_per_s")


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        mlflow_tracking_uri: str | None = None,
        run_name: str = "apo-ray",
        config: dict | None = None,
        dashboard: bool = True,
    ):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        self._tb = self._wandb = self._mlflow = None
        self._gauges: dict[str, Any] = {}
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError as e:
                log.warning("TensorBoard disabled (%s)", e)
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")
            except ImportError:
                log.warning("train.wandb_project is set but wandb is not installed (pip install wandb)")
        if mlflow_tracking_uri:
            try:
                import mlflow

                mlflow.set_tracking_uri(mlflow_tracking_uri)
                mlflow.start_run(run_name=run_name)
                if config:
                    mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})
                self._mlflow = mlflow
            except ImportError:
                log.warning("train.mlflow_tracking_uri is set but mlflow is not installed (pip install mlflow)")
        if dashboard:
            try:
                from ray.util.metrics import Gauge

                for k in DASHBOARD_KEYS:
                    self._gauges[k] = Gauge(f"apo_train_{k}", description=f"Stage 2 {k}")
            except Exception as e:  # noqa: BLE001 - outside a Ray worker there is no dashboard
                log.debug("no Ray dashboard metrics: %s", e)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **metrics}
        self._jsonl.write(strict_json(row) + "\n")
        self._jsonl.flush()
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step=step)
        for k, g in self._gauges.items():
            if k in scalars:
                g.set(scalars[k])

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only the rows of steps <= `last_step` (a resumed run redoes the later ones); atomic."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a resumed run's rows replace the ones it redid (last write wins per step)."""
    return parse_metrics(Path(path).read_text())


def parse_metrics(text: str) -> list[dict]:
    """Rows of metrics.jsonl text, one per step (last write wins)."""
    rows: dict[int, dict] = {}
    for line in text.splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
