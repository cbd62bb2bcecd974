"""Experiment trackers beside TensorBoard: Weights & Biases (``logging.wandb``) and MLflow
(``logging.mlflow``), written by rank 0.

Each is imported only when enabled; a missing package is a ``TrackerError`` naming what to
install. Both work without a network: W&B's offline mode writes files that ``wandb sync``
uploads later; MLflow writes to a local folder (a ``file:`` tracking URI) or to a server.
Each receives the resolved config as hyper-parameters and the metrics that TensorBoard gets.

Each start of a run, resumed or not, is a run of its own in the tracker, from the step it
starts at: trackers accept steps in increasing order only, while a resume goes back to its
checkpoint's step (metrics.jsonl and TensorBoard hold the whole run).
"""
from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Dict, List

from omegaconf import OmegaConf

from nemo_anchored.errors import UserError


class TrackerError(RuntimeError, UserError):
    """A tracker that cannot start (its package is not installed)."""


def flat_config(cfg) -> Dict[str, object]:
    """The resolved config as {"section.key": value}."""
    flat: Dict[str, object] = {}

    def visit(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                visit(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    visit("", OmegaConf.to_container(cfg, resolve=True))
    return flat


def _package(module: str, key: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrackerError(f"{key}=true needs the {module} package, which does not import "
                           f"({error}): pip install {install}") from None


class WandbTracker:
    def __init__(self, cfg):
        c = cfg.logging.wandb
        wandb = _package("wandb", "logging.wandb.enabled", "wandb")
        Path(c.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=c.project, entity=c.entity, name=c.name, mode=c.mode,
                              dir=c.dir, config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    # MLflow's batch call takes at most this many parameters.
    PARAMS_PER_CALL = 100

    def __init__(self, cfg):
        c = cfg.logging.mlflow
        _package("mlflow", "logging.mlflow.enabled", "mlflow-skinny")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = c.tracking_uri
        if uri.startswith("file:"):
            # Absolute, so that the folder does not depend on the working directory; MLflow 3
            # refuses its (maintained, working) file store unless told to allow it, and a
            # folder is the only offline store that needs no database packages.
            uri = Path(uri[len("file:"):]).resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(c.experiment)
        experiment_id = experiment.experiment_id if experiment is not None else \
            self.client.create_experiment(c.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=c.run_name).info.run_id
        params = [Param(key, str(value)) for key, value in flat_config(cfg).items()]
        for i in range(0, len(params), self.PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i:i + self.PARAMS_PER_CALL])

    def log(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key, value, now, step) for key, value in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(cfg) -> List:
    """The trackers the config enables, started."""
    trackers: List = []
    try:
        if cfg.logging.wandb.enabled:
            trackers.append(WandbTracker(cfg))
        if cfg.logging.mlflow.enabled:
            trackers.append(MlflowTracker(cfg))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
