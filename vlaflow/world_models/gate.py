"""The diffusion world model as RL-100's offline policy-evaluation gate model (``rl100.gate_model=wm``).

Shapes: E samples (the gate's "members"), B start states, To the policy's obs window, Do the model's obs
dim, Ds the policy's flat obs features (To x Do for a policy reading the model's key), H / Ta / Da the
policy's chunk length, executed steps and action dim, Tf the model's steps per call.

A policy that reads not the model's key but the task's keys computed from it (PushT: ``obs.keypoint`` +
``obs.agent_pos`` for a model of ``obs.state``, the inputs of our PushT policies) is judged through a
``codec``: its observations -> the model's states (PushT: a rigid fit of the block keypoints) before the
model steps, the predicted states -> its observations after (as the imagined env derives them).

:class:`WorldModelDynamics` stands behind :class:`vlaflow.rl.gate.DynamicsEnsemble`'s signature, so
:func:`vlaflow.rl.gate.gate` scores candidates with it unchanged:

- ``predict(s, a)``: the policy's flat obs window ``s`` (B, Ds) and normalized flat chunk ``a`` (B, H x Da)
  -> E sampled next windows (E, B, Ds) and chunk rewards (E, B). The chunk's first Ta actions (unnormalized
  with the policy's own normalizer) are rolled through the frozen model, Ta / Tf few-step sampler calls with
  the E x B rows in one batched forward each; the next window is the last To states. The reward is the
  task's own from each predicted state (:func:`vlaflow.world_models.reward.task_reward`, PushT coverage),
  summed over the Ta steps as the run's transitions sum the stored step rewards (``rl100.reward=task``), or
  1 when one of those states is a success (``rl100.reward=success``; no episode end is modelled, as with the
  ensemble).
- ``__call__(s, a)``: the same samples standardized (E, B, Ds + 1) with the run's transition statistics
  (:meth:`set_stats`, as the ensemble's); their spread over the E samples is the gate's per-step
  disagreement (``rl100.gate_uncertainty``); the spread of the E samples' returns is its
  ``gate_disagreement``.
- ``reset_noise()``: :func:`~vlaflow.rl.gate.imagined_score` restarts the sampler noise at every score, so the
  candidate and the current policy are scored on the same model noise (as their own chains already are):
  one policy against itself scores exactly equal.

The gate evaluates every member's state under the whole ensemble (member i's rollout keeps output i; the
per-step disagreement needs all E at that state), so each member's step samples all E next states and scores
their rewards: E x E x B model rows and task-reward evaluations per imagined decision (PushT's coverage is a
Python loop, ~0.2 ms a state: the cost of the gate at ``gate_starts`` 256, 5 samples, horizon 5, Ta 8 is
~50 CPU s per policy scored; an estimate, not measured).

A predicted state that is NaN or leaves the model's data range by ``range_margin`` x that range is not
used: the row keeps its last valid state and that step earns nothing (``n_invalid`` counts them), as in the
imagined env.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from vlaflow.errors import VlaflowError
from vlaflow.interfaces import unflat_obs
from vlaflow.world_models.checkpoint import load_world_model
from vlaflow.world_models.model import DiffusionWorldModel
from vlaflow.world_models.reward import RewardFn, task_reward

GATE_REWARDS = ("task", "success")  # as rl100.reward
# (to_state, from_state): a policy's observations {key: (N, ...)} -> the model's states (N, Do), and back
StateCodec = tuple[Callable[[dict], np.ndarray], Callable[[np.ndarray], dict]]


class WorldModelDynamics:
    """The frozen world model behind the gate's ``predict`` signature for one policy's (s, a); see the
    module doc."""

    def __init__(
        self,
        model: DiffusionWorldModel,
        policy,
        *,
        task: str,
        reward_fn: RewardFn,
        reward: str = "task",
        n_samples: int = 5,
        seed: int = 0,
        range_margin: float = 0.1,
        where: str = "(in memory)",
        codec: StateCodec | None = None,
    ):
        cfg, pc = model.config, policy.config
        shapes = {k: tuple(int(d) for d in v) for k, v in pc.obs_shapes.items()}
        cfg.check_fits(
            where,
            task=task,
            obs_shapes={cfg.obs_key: (cfg.obs_dim,)} if codec else shapes,
            action_dim=int(pc.action_dim),
            user="the policy",
        )
        if reward not in GATE_REWARDS:
            raise VlaflowError(f"gate reward must be one of {GATE_REWARDS}, got {reward!r}")
        if n_samples < 1:
            raise VlaflowError(f"n_samples must be >= 1, got {n_samples}")
        self.to, self.h = int(pc.n_obs_steps), int(pc.horizon)
        self.ta, self.da, self.tf = int(pc.n_action_steps), int(pc.action_dim), cfg.n_future
        if self.ta % self.tf:
            raise VlaflowError(
                f"world model {where} predicts {self.tf} steps per call; the policy executes Ta={self.ta} "
                "steps per chunk, not a multiple"
            )
        self.model = model.eval().requires_grad_(False)
        self.cfg, self.policy, self.reward_fn, self.reward = cfg, policy, reward_fn, reward
        self.n_samples, self.seed = n_samples, seed
        # imagined_score reads len(model.models) as its member count: one "member" per sample
        self.models = tuple(range(n_samples))
        # the policy's flat window: its keys in order, each To steps (vlaflow.interfaces.unflat_obs)
        self.keys, self.shapes, self.codec = tuple(shapes), shapes, codec
        self.ds = self.to * sum(int(np.prod(v, dtype=np.int64)) for v in shapes.values())
        self.out_mean, self.out_std = torch.zeros(self.ds + 1), torch.ones(self.ds + 1)
        span = (model.obs_max - model.obs_min).cpu()
        self._lo, self._hi = (
            model.obs_min.cpu() - range_margin * span,
            model.obs_max.cpu() + range_margin * span,
        )
        self._gen = torch.Generator(device=model.device).manual_seed(seed)
        self._last: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.n_invalid = 0  # predicted states refused (NaN / out of range)
        self.model_rows = 0  # model rows sampled (each is num_inference_steps evaluations)

    def _states(self, s: Tensor) -> Tensor:
        """The policy's flat windows (B, Ds) -> the model's state windows (B, To, Do)."""
        b, do = s.shape[0], self.cfg.obs_dim
        if self.codec is None:
            return s.reshape(b, self.to, do).float().cpu()
        obs = unflat_obs(s.detach().float().cpu().numpy(), self.keys, self.shapes, self.to)
        st = self.codec[0]({k: v.reshape(b * self.to, *self.shapes[k]) for k, v in obs.items()})
        return torch.from_numpy(np.asarray(st, np.float32)).reshape(b, self.to, do)

    def _flat(self, states: Tensor) -> Tensor:
        """State windows (N, To, Do) -> the policy's flat windows (N, Ds)."""
        n = states.shape[0]
        if self.codec is None:
            return states.reshape(n, self.ds)
        obs = self.codec[1](states.reshape(n * self.to, -1).numpy())
        return torch.cat(
            [torch.from_numpy(np.asarray(obs[k], np.float32)).reshape(n, -1) for k in self.keys], 1
        )

    def reset_noise(self) -> None:
        self._gen.manual_seed(self.seed)

    def set_stats(self, s: Tensor, a: Tensor, s2: Tensor, r: Tensor) -> None:
        """Standardization of (s' - s, r) from the run's transitions, as the ensemble's outputs."""
        y = torch.cat([s2 - s, r[:, None]], -1).float()
        self.out_mean, self.out_std = y.mean(0), y.std(0).clamp(min=1e-6)

    @torch.no_grad()
    def predict(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample: next flat window (E, B, Ds) and the chunk's reward (E, B)."""
        cfg, e, b = self.cfg, self.n_samples, s.shape[0]
        dev = self.model.device
        win = self._states(s)  # (B, To, Do)
        if self.to < cfg.n_obs_steps:  # pad with the earliest state, as an episode start is padded
            win = torch.cat([win[:, :1].expand(b, cfg.n_obs_steps - self.to, cfg.obs_dim), win], 1)
        chunk = a.reshape(b, self.h, self.da)[:, : self.ta].to(self.policy.device)
        chunk = self.policy.unnormalize_action(chunk).float().cpu()  # raw (B, Ta, Da)
        hist = win.repeat(e, 1, 1)  # (E * B, To', Do), sample-major
        act = chunk.repeat(e, 1, 1).to(dev)
        ret = torch.zeros(e * b)
        hit = torch.zeros(e * b, dtype=torch.bool)
        for k in range(0, self.ta, self.tf):
            win_k = hist[:, -cfg.n_obs_steps :].to(dev)
            nxt = self.model.predict_next(win_k, act[:, k : k + self.tf], generator=self._gen).cpu()
            self.model_rows += e * b
            for j in range(self.tf):
                st = nxt[:, j]  # (E * B, Do)
                ok = torch.isfinite(st).all(1) & (st >= self._lo).all(1) & (st <= self._hi).all(1)
                self.n_invalid += int((~ok).sum())
                st = torch.where(ok[:, None], st, hist[:, -1])
                r, succ = self.reward_fn(st.numpy())
                ok_np = ok.numpy()
                ret += torch.from_numpy(np.where(ok_np, np.nan_to_num(r), 0.0).astype(np.float32))
                hit |= torch.from_numpy(ok_np & np.asarray(succ, bool))
                hist = torch.cat([hist, st[:, None]], 1)
        if self.reward == "success":
            ret = hit.float()
        nxt_s = self._flat(hist[:, -self.to :]).reshape(e, b, self.ds).to(s.device)
        ret = ret.view(e, b).to(s.device)
        self._last = (s.clone(), a.clone(), nxt_s, ret)
        return nxt_s, ret

    def __call__(self, s: Tensor, a: Tensor) -> Tensor:
        """Standardized (s' - s, r) of every sample (E, B, Ds + 1): those of the last :meth:`predict` when
        called on the same (s, a) (the gate asks right after it), else fresh samples."""
        last = self._last
        if last is not None and torch.equal(last[0], s) and torch.equal(last[1], a):
            nxt, r = last[2], last[3]
        else:
            nxt, r = self.predict(s, a)
        y = torch.cat([nxt - s.unsqueeze(0), r.unsqueeze(-1)], -1)
        return (y - self.out_mean.to(y.device)) / self.out_std.to(y.device)

    def loss(self, s: Tensor, a: Tensor, s2: Tensor, r: Tensor) -> Tensor:
        """The ensemble's fit measure on transitions: mean squared standardized error of every sample."""
        y = torch.cat([s2 - s, r[:, None]], -1).float()
        return ((self(s, a) - (y - self.out_mean) / self.out_std) ** 2).mean()


def world_model_gate(
    checkpoint: str,
    *,
    task: str,
    reward: str = "task",
    n_samples: int = 5,
    seed: int = 0,
    range_margin: float = 0.1,
    device: str = "cpu",
    codec_for: Callable[..., StateCodec | None] | None = None,
) -> Callable[..., WorldModelDynamics]:
    """The world model at ``checkpoint`` loaded once -> ``make(policy, seed=)``: its gate model for that
    policy (a task, observation key or action dim the model was not trained on is refused, naming what it
    has; so is a task without a reward from predicted states). ``codec_for(task, obs_key, obs_dim,
    obs_shapes)``: the policy's observations <-> the model's states for a policy reading keys computed from
    the state, or None when it reads the model's own key (the CLI passes
    :func:`vlaflow.sim.imagined.state_codec`, which refuses keys it cannot recover the state from)."""
    wm = load_world_model(checkpoint, device=device)
    c = wm.config
    c.check_fits(str(checkpoint), task=task)
    fn = task_reward(task)

    def make(policy, seed: int = seed) -> WorldModelDynamics:
        return WorldModelDynamics(
            wm,
            policy,
            task=task,
            reward_fn=fn,
            reward=reward,
            n_samples=n_samples,
            seed=seed,
            range_margin=range_margin,
            where=str(checkpoint),
            codec=codec_for(task, c.obs_key, c.obs_dim, dict(policy.config.obs_shapes))
            if codec_for
            else None,
        )

    return make
