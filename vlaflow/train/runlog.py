"""Run logs: a CSV of training/eval rows (RUN/log.csv), the experiment trackers (:mod:`.trackers`:
TensorBoard by default, wandb, mlflow), and the curves PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from vlaflow.train.trackers import make_trackers

BASE_COLUMNS = [
    "step",
    "kind",
    "loss",
    "lr",
    "grad_norm",
    "ema_decay",
    "samples_per_s",
    "elapsed_s",
    "score",
    "success_rate",
]


class RunLog:
    """Appends rows to ``log.csv`` (columns fixed by the first row) and mirrors them to the trackers."""

    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None = None,
        logger: str = "tensorboard",
        config: dict | None = None,
    ):
        self.path = Path(run_dir) / "log.csv"
        self.rows: list[dict] = []
        self.columns: list[str] | None = None
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or []) or None
                self.rows = [r for r in reader if r.get("step") and int(r["step"]) <= resume_step]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()
        self.trackers = make_trackers(logger, Path(run_dir), config or {}, resume_step)

    def _rewrite(self) -> None:
        if self.columns is None:
            return
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)

    def log(self, row: dict) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        if self.columns is None:
            extra = sorted(k for k in row if k not in BASE_COLUMNS)
            self.columns = BASE_COLUMNS + extra
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new:  # a metric appeared later (e.g. eval extras): widen the table
            self.columns = self.columns + sorted(new)
            self._rewrite()
        else:
            first = not self.path.exists()
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                if first:
                    w.writeheader()
                w.writerow(row)
        if self.trackers:
            step = int(row["step"])
            prefix = "eval" if row.get("kind") == "eval" else "train"
            scalars = {}
            for k, v in row.items():
                if k in ("step", "kind") or v in ("", None):
                    continue
                try:
                    scalars[f"{prefix}/{k}"] = float(v)
                except (TypeError, ValueError):
                    continue
            for t in self.trackers:
                t.log_scalars(scalars, step)

    def log_image(self, name: str, path: Path | None, step: int) -> None:
        """An image (the curves PNG) to every tracker."""
        if path is not None and Path(path).exists():
            for t in self.trackers:
                t.log_image(name, Path(path), step)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _num(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def plot_curves(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss (log scale) and rollout score -- or, without a sim task, held-out loss and action errors --
    against step, as a PNG. Returns the path (None if no rows)."""
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        steps = [_num(r["step"]) for r in train]
        ax1.plot(steps, [_num(r.get("loss")) for r in train], lw=1, label="training loss")
        if all(_num(r.get("loss")) > 0 for r in train):
            ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.grid(alpha=0.3)
    validation = [r for r in evals if str(r.get("val_loss", "")) not in ("", "nan")]
    if validation:  # held-out validation (no sim task): val loss beside the training loss, action errors
        steps = [_num(r["step"]) for r in validation]
        ax1.plot(steps, [_num(r.get("val_loss")) for r in validation], "o-", ms=3, label="held-out loss")
        ax1.legend(loc="upper right", fontsize=8)
        ax2.plot(steps, [_num(r.get("action_mae_norm")) for r in validation], "o-", label="chunk MAE (norm.)")
        first = [_num(r.get("action_mae_first")) for r in validation]
        if any(not math.isnan(x) for x in first):
            ax2b = ax2.twinx()
            ax2b.plot(steps, first, "s--", color="tab:orange", label="first-Ta MAE (action units)")
            ax2b.set_ylabel("first-Ta MAE (action units)")
            ax2b.legend(loc="lower left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        ax2.set_ylabel("held-out action error (normalised)")
    elif evals:
        steps = [_num(r["step"]) for r in evals]
        ax2.plot(steps, [_num(r.get("score")) for r in evals], "o-", label="score")
        succ = [_num(r.get("success_rate")) for r in evals]
        if any(not math.isnan(s) for s in succ):
            ax2.plot(steps, succ, "s--", label="success rate")
        ax2.set_ylim(-0.02, 1.02)
        ax2.legend(loc="lower right")
        ax2.set_ylabel("rollout evaluation")
    else:
        ax2.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
