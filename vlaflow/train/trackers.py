"""Experiment trackers behind one small interface: TensorBoard (the default), Weights & Biases, MLflow.

``train.logger`` names them (``tensorboard``, ``wandb``, ``mlflow``, ``none``; a comma list for several,
e.g. ``tensorboard,wandb``). ``RUN/log.csv`` is always written; each tracker gets the same scalars (every
``log_every`` steps and every evaluation), the run config once, and ``curves.png`` at each evaluation and at
the end. wandb and mlflow are optional extras (``pip install -e ".[wandb]"`` / ``".[mlflow]"``); both work
without a network:

* wandb: ``WANDB_MODE=offline`` writes the run under ``RUN/wandb/`` (``wandb sync RUN/wandb/offline-run-*``
  uploads it later). The run id is kept in ``RUN/wandb_run_id`` so a ``--resume`` continues the same run.
* mlflow: without ``MLFLOW_TRACKING_URI`` the file store ``RUN/mlruns`` is used (``mlflow ui
  --backend-store-uri RUN/mlruns`` shows it; the UI needs the full ``mlflow`` package; mlflow 3.7+ wants
  ``MLFLOW_ALLOW_FILE_STORE=true`` for a file store, which the tracker sets when it picks that store).
  The run id is kept in ``RUN/mlflow_run_id`` for ``--resume``.

TensorBoard on resume: the writer is opened with ``purge_step = resume_step + 1``, so what a killed run
logged *after* its last checkpoint is dropped (it is trained and logged again) and every scalar up to and
including the resume step stays -- the same rows ``log.csv`` keeps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlaflow.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "none")


def parse_logger(spec: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ("tensorboard", "wandb"); an unknown name lists the known ones."""
    names = tuple(n.strip() for n in str(spec).split(",") if n.strip())
    bad = [n for n in names if n not in TRACKERS]
    if bad or not names:
        raise ConfigError(
            f"train.logger: unknown tracker(s) {bad or [spec]}; choose from {', '.join(TRACKERS)}"
        )
    return tuple(n for n in names if n != "none")


class Tracker:
    """One experiment tracker: scalars by step, the config once, images (the curves PNG)."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_config(self, config: dict) -> None:
        pass

    def log_image(self, name: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step = resume_step would drop the resume step's own scalars, which the resumed run never
        # logs again (it continues at resume_step + 1): that was the "scalars at the resume step vanish" bug
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def log_scalars(self, scalars, step):
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)

    def log_config(self, config):
        import json

        self.tb.add_text("run_config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log_image(self, name, path, step):
        import matplotlib.image as mpimg

        img = mpimg.imread(str(path))  # (H, W, 3|4) float in [0, 1]
        self.tb.add_image(name, img[..., :3], step, dataformats="HWC")

    def close(self):
        self.tb.flush()
        self.tb.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict, resume: bool):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(
                'train.logger=wandb needs the optional package wandb: pip install -e ".[wandb]"'
            ) from e
        self.wandb = wandb
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "vlaflow"),
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        id_file.write_text(self.run.id)

    def log_scalars(self, scalars, step):
        self.run.log(dict(scalars), step=step)

    def log_image(self, name, path, step):
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self):
        # wandb's service process writes the offline log; finish() can return a moment before the file
        # holds its last records (the service completes them; the test waits for the exit record)
        self.run.finish()


class MlflowTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict, resume: bool):
        try:
            import mlflow
        except ImportError as e:
            raise ConfigError(
                'train.logger=mlflow needs the optional package mlflow: pip install -e ".[mlflow]"'
            ) from e
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # mlflow >= 3.7 refuses the file store unless asked (it favours a database); the file store is
            # the one that needs nothing beyond mlflow-skinny and no server, so this run asks for it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        id_file = run_dir / "mlflow_run_id"
        if resume and id_file.exists():
            self.run_id = id_file.read_text().strip()
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vlaflow")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            id_file.write_text(self.run_id)
        self.uri = uri

    def log_scalars(self, scalars, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("/", "."), float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_config(self, config):
        from mlflow.entities import Param

        flat = _flatten(config)
        params = [Param(k, str(v)[:500]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # the file store takes batches of <= 100 params
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, config, "run_config.json")

    def log_image(self, name, path, step):
        self.client.log_artifact(self.run_id, str(path))

    def close(self):
        self.client.set_terminated(self.run_id)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def make_trackers(spec: str, run_dir: Path, config: dict, resume_step: int | None) -> list[Tracker]:
    """The trackers named by ``spec`` for ``run_dir``; TensorBoard is skipped (with a note) when the
    tensorboard package is absent, the optional ones are an error naming their extra."""
    out: list[Tracker] = []
    resume = resume_step is not None
    for name in parse_logger(spec):
        if name == "tensorboard":
            try:
                out.append(TensorBoardTracker(run_dir, resume_step))
            except ImportError:
                print("note: tensorboard is not installed; logging to log.csv only (pip install tensorboard)")
        elif name == "wandb":
            out.append(WandbTracker(run_dir, config, resume))
        elif name == "mlflow":
            out.append(MlflowTracker(run_dir, config, resume))
    if not resume:
        for t in out:
            t.log_config(config)
    return out
