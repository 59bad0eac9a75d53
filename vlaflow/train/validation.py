"""Held-out validation: what a run on your own data measures instead of sim rollouts.

A run without ``eval.task`` and with held-out episodes (``data.val_ratio > 0``; episodes are split, never
steps) is scored on those episodes every ``train.eval_every`` steps and at the end:

* ``val_loss`` -- the family's own training loss on the held-out windows (fixed noise draws, so two
  evaluations differ only by the weights);
* ``action_mae_norm`` -- mean absolute error of *sampled* action chunks (the policy's sampler, fixed
  initial noise) against the recorded actions, in the normalised units the model works in (padding
  past an episode's end left out); ``action_mae`` the same in action units, ``action_mae_first`` over the
  first ``Ta`` (executed) steps of each chunk, in action units, and per action dimension in the report;
* ``hold_state_mae`` -- where ``obs.state`` has the action's shape (joint-position control, e.g. SO-101):
  the error in action units of the trivial policy "stay where you are" (every action = the current
  state), the yardstick that says whether the policy learned more than that;
* ``score = -action_mae_norm`` -- what selects ``checkpoints/best`` (higher is better, as for rollouts).

Each evaluation writes ``RUN/eval/step_N/validation.json`` and ``actions.png``: one held-out episode's
recorded actions per dimension against the policy's open-loop replans on the recorded observations (the
first ``Ta`` actions of a chunk sampled every ``Ta`` steps). The curves PNG plots val_loss and the action
errors against the training loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import vlaflow.keys as K
from vlaflow.train.objectives.bc import make_batch


class HeldOutValidation:
    """The loop's ``evaluate`` callable over a :class:`~vlaflow.data.windows.WindowSampler` of held-out
    episodes (see the module docstring). ``n_windows`` caps the windows scored (0 = all)."""

    def __init__(
        self,
        windows,
        *,
        n_action_steps: int,
        n_windows: int = 256,
        batch_size: int = 64,
        seed: int = 0,
        action_names: list[str] | None = None,
        progress: bool = False,
    ):
        self.ws, self.ta, self.batch_size, self.seed = windows, int(n_action_steps), int(batch_size), seed
        n = len(windows)
        rng = np.random.default_rng([seed, 11])
        self.idx = (
            np.arange(n) if not n_windows or n <= n_windows else np.sort(rng.choice(n, n_windows, False))
        )
        self.action_names = action_names

    def __call__(self, policy, *, n_episodes: int = 0, out_dir: Path, video: bool = False, ckpt=None) -> dict:
        was_training = policy.training
        policy.eval()
        try:
            metrics, per_dim = self._metrics(policy)
            plot = self._plot(policy, Path(out_dir) / "actions.png")
        finally:
            policy.train(was_training)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "kind": "held-out validation",
            "n_windows": int(len(self.idx)),
            "n_episodes": int(self.ws.n_episodes),
            **metrics,
            "action_mae_per_dim": per_dim,
            "action_names": self.action_names,
            "plot": str(plot) if plot else None,
        }
        (out_dir / "validation.json").write_text(json.dumps(report, indent=1))
        return {
            "score": -metrics["action_mae_norm"],
            "success_rate": None,
            "metrics": metrics,
            "report": report,
        }

    def _metrics(self, policy) -> tuple[dict, list[float]]:
        device = next(policy.parameters()).device
        norm = getattr(policy, "normalizer", None)
        has_norm = norm is not None and K.ACTION in getattr(norm, "modes", {})
        losses, n_loss = 0.0, 0
        abs_norm = abs_raw = abs_first = 0.0
        count = count_first = 0
        dim_sum = None
        hold_sum, hold_count = 0.0, 0
        dim_count = 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for lo in range(0, len(self.idx), self.batch_size):
                batch = _to(make_batch(self.ws, self.idx[lo : lo + self.batch_size]), device)
                b = batch[K.ACTION].shape[0]
                # with autograd on: an energy model's loss differentiates its own descent steps (the graph
                # is dropped, no gradient reaches the weights)
                with torch.enable_grad():
                    loss, _ = policy.compute_loss(batch)
                losses += float(loss.detach()) * b
                n_loss += b
                g = torch.Generator(device=device).manual_seed(self.seed + lo)
                noise = torch.randn(batch[K.ACTION].shape, generator=g, device=device)
                with torch.no_grad():
                    pred = policy.sample(batch, noise=noise).detach().float()  # (B, H, Da)
                rec = batch[K.ACTION].float()
                keep = (~batch[K.ACTION_IS_PAD].bool()).unsqueeze(-1).float()  # (B, H, 1)
                err = (pred - rec).abs() * keep
                if has_norm:
                    err_n = (norm.normalize(K.ACTION, pred) - norm.normalize(K.ACTION, rec)).abs() * keep
                else:
                    err_n = err
                abs_raw += float(err.sum())
                abs_norm += float(err_n.sum())
                count += int(keep.sum()) * err.shape[-1]
                abs_first += float(err[:, : self.ta].sum())
                count_first += int(keep[:, : self.ta].sum()) * err.shape[-1]
                state = batch.get(K.OBS_STATE)
                if torch.is_tensor(state) and tuple(state.shape[2:]) == tuple(rec.shape[2:]):
                    hold_sum += float(((state[:, -1:].float() - rec).abs() * keep).sum())
                    hold_count += int(keep.sum()) * err.shape[-1]
                d = err.sum(dim=(0, 1))
                dim_sum = d if dim_sum is None else dim_sum + d
                dim_count += int(keep.sum())
        metrics = {
            "val_loss": losses / max(n_loss, 1),
            "action_mae_norm": abs_norm / max(count, 1),
            "action_mae": abs_raw / max(count, 1),
            "action_mae_first": abs_first / max(count_first, 1),
        }
        if hold_count:
            metrics["hold_state_mae"] = hold_sum / hold_count
        per_dim = (dim_sum / max(dim_count, 1)).tolist() if dim_sum is not None else []
        return metrics, per_dim

    def _plot(self, policy, path: Path, max_replans: int = 40) -> Path | None:
        """Recorded vs open-loop replanned actions of the first held-out episode (<= max_replans chunks)."""
        ws = self.ws
        first = np.flatnonzero(ws._s == ws._s[0]) if len(ws) else np.zeros(0, np.int64)
        if first.size == 0:
            return None
        picks = first[:: self.ta][:max_replans]
        device = next(policy.parameters()).device
        batch = _to(make_batch(ws, picks), device)
        g = torch.Generator(device=device).manual_seed(self.seed)
        noise = torch.randn(batch[K.ACTION].shape, generator=g, device=device)
        with torch.no_grad():
            pred = policy.sample(batch, noise=noise).detach().float().cpu().numpy()  # (R, H, Da)
        t0 = (ws._t[picks] - ws._s[picks]).astype(int)
        n = int(ws._e[first[0]] - ws._s[first[0]])
        recorded = ws.data[ws.action_key][int(ws._s[first[0]]) : int(ws._s[first[0]]) + n]  # (T, Da)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        da = recorded.shape[-1]
        cols = min(da, 3)
        rows = -(-da // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.4 * rows), squeeze=False)
        for d in range(da):
            ax = axes[d // cols][d % cols]
            ax.plot(np.arange(n), recorded[:, d], color="k", lw=1.2, label="recorded")
            for r, t in enumerate(t0):
                steps = np.arange(t, min(t + self.ta, n))
                ax.plot(
                    steps,
                    pred[r, : len(steps), d],
                    color="tab:orange",
                    lw=1,
                    label="policy" if r == 0 else None,
                )
            name = (
                self.action_names[d] if self.action_names and d < len(self.action_names) else f"action[{d}]"
            )
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
        for d in range(da, rows * cols):
            axes[d // cols][d % cols].axis("off")
        axes[0][0].legend(fontsize=8, loc="best")
        fig.suptitle(f"held-out episode: recorded vs policy (a chunk every Ta={self.ta} steps, open loop)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
