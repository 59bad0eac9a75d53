"""RL-100's iterative offline loop (``vlaflow refine --algo rl100``): a driver around runs of the one loop.

Iteration i, each stage a resumable unit recorded in ``RUN/rl100_state.json``:

1. ``critic`` -- an IQL critic (expectile 0.7, double Q, value net) on chunk-level transitions of every
   episode in the run's store copy: the demonstrations plus the rollouts collected so far
   (:class:`~vlaflow.train.objectives.rl100.IQLObjective` on the loop, ``RUN/iter_NNN/critic``).
2. ``ppo`` -- PPO-clip per denoising step on store windows, the critic's advantage of the final chunk on
   every step, a small lr (:class:`~vlaflow.train.objectives.rl100.OfflinePPO`, ``RUN/iter_NNN/ppo``):
   the *candidate*.
3. ``gate`` -- the offline policy-evaluation gate (:mod:`vlaflow.rl.gate`): an ensemble of MLP dynamics
   models fit on the same transitions (``rl100.gate_model=ensemble``), or the frozen diffusion world model
   at ``world_model`` (``wm``: its samples are the members; the caller builds it, this layer does not import
   world models), rolls both policies out from real states, + the critic's V at the
   horizon; the candidate is accepted only if its estimate beats the current policy's. With held-out
   evaluation on, both policies' sim scores are measured too, and the Spearman rank agreement of the gate's
   estimates with them (over every policy scored so far) is logged.
4. ``collect`` -- the accepted policy's stochastic chain in sim on training seeds ``seed_start..`` (never
   the evaluation seeds 100000..100199), its episodes appended to the store copy as
   ``source="policy:rl100:iter<i>"`` with their success flags (the user's store is never written).
5. ``bc`` -- behaviour cloning of the accepted policy on the expanded store (the bc objective on the loop,
   ``RUN/iter_NNN/bc``): the next iteration's current policy.

Optionally a last online DPPO stage (``online_iterations``, run by the caller's ``online`` callable). A
row per iteration goes to ``RUN/rl100_log.jsonl``; ``--resume`` after a kill continues at the stage the
state names (a loop stage from its own ``checkpoints/last``). The simulator parts (the recording rollout
env, the held-out evaluator, the task's reward of stored states) come in from the CLI: this layer imports
no simulator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr

import vlaflow.keys as K
import vlaflow.train.provenance as P
from vlaflow.data.store import EpisodeStore, KeySpec, atomic_store
from vlaflow.data.windows import WindowSampler
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.interfaces import unflat_obs
from vlaflow.policies.checkpoint import load_checkpoint
from vlaflow.rl.chain import LOGPROBS, ChainConfig, resolve_chain
from vlaflow.rl.gate import DynamicsEnsemble, fit_dynamics, gate
from vlaflow.rl.returns import chunk_discount
from vlaflow.rl.rollout import EVAL_SEEDS, collect
from vlaflow.train.loop import LoopConfig, RunMeta, TrainingLoop
from vlaflow.train.objectives.bc import BehaviourCloning
from vlaflow.train.objectives.rl100 import IQLObjective, OfflinePPO, StandardizedCritic, flat_obs
from vlaflow.train.state import copy_checkpoint

REWARD_KEY = "reward"  # the per-step reward the store copy holds (computed for demos, recorded for rollouts)
REWARDS = ("success", "task")
GATE_MODELS = ("ensemble", "wm")  # the gate's model: MLP dynamics ensemble | the diffusion world model
STAGES = ("critic", "ppo", "gate", "collect", "bc")


@dataclass(frozen=True)
class RL100Config:
    """RL-100's knobs (``rl100.*``); defaults from the paper where it gives them, not tuned here."""

    iterations: int = 3  # offline iterations (critic -> ppo -> gate -> collect -> bc)
    online_iterations: int = 0  # a final online DPPO stage of this many rollout iterations (0 = none)
    # "task": the env's per-step reward; "success": 1 at the step the task first succeeds. Not "success" by
    # default: none of the 206 episodes of the PushT demo store (pusht_cchi_v7_replay) reaches coverage
    # 0.95 by the sim's reward of its states (their maxima are ~0.87-0.92), so the demos alone would give
    # the critic no reward at all
    reward: str = "task"
    gamma: float = 0.99  # per env step; a chunk decision discounts gamma^Ta
    expectile: float = 0.7  # IQL's expectile (RL-100: 0.7)
    stride: int = 1  # a chunk transition starts every `stride` stored steps (0 = every Ta: disjoint chunks)
    critic_steps: int = 2000  # IQL loop steps per iteration
    critic_batch: int = 256
    critic_lr: float = 3e-4
    critic_width: int = 256
    polyak: float = 0.005  # target-Q Polyak rate
    ppo_lr: float = 1e-5  # offline PPO's small lr
    ppo_rounds: int = 10  # rounds of fresh chains on store windows per iteration
    ppo_windows: int = 256  # windows (chains) per round
    update_epochs: int = 4  # passes over a round's chains
    n_minibatches: int = 4
    clip: float = 0.01  # PPO ratio clip per denoising step
    gamma_denoise: float = 0.99  # denoising discount of the per-step terms
    logprob: str = "mean_executed"  # how a denoising step is scored (rl.chain.LOGPROBS)
    gate_model: str = "ensemble"  # "ensemble" (fit each iteration) | "wm" (the frozen model at world_model)
    gate_models: int = 5  # dynamics ensemble members (gate_model=wm: world-model samples per step)
    gate_width: int = 128
    gate_steps: int = 1000  # dynamics fitting steps
    gate_horizon: int = 5  # imagined decisions (+ gamma^H V at the end)
    gate_starts: int = 256  # real start states of the imagined rollouts (drawn from the transitions)
    gate_margin: float = 0.0  # accept iff candidate > current + margin
    gate_disagreement: float = 1.0  # score = mean over members - this x their spread
    gate_uncertainty: float = 1.0  # each imagined reward - this x the members' per-step disagreement (MOPO)
    n_envs: int = 8  # parallel sim envs of the collection
    collect_episodes: int = 16  # rollouts of the accepted policy per iteration
    seed_start: int = 20_000  # first training seed of the collection (seeds stay below 100000)
    max_steps: int = 0  # episode step cap of the collection (0 = the task's)
    bc_steps: int = 500  # behaviour-cloning steps on the expanded store per iteration
    bc_lr: float = 1e-5
    bc_batch: int = 64
    chain: ChainConfig = field(default_factory=ChainConfig)  # the stochastic chain (PPO and collection)

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ConfigError(f"rl100.reward must be one of {REWARDS}, got {self.reward!r}")
        if self.gate_model not in GATE_MODELS:
            raise ConfigError(f"rl100.gate_model must be one of {GATE_MODELS}, got {self.gate_model!r}")
        if self.logprob not in LOGPROBS:
            raise ConfigError(f"rl100.logprob must be one of {LOGPROBS}, got {self.logprob!r}")
        for name in ("iterations", "critic_steps", "ppo_rounds", "ppo_windows", "update_epochs", "n_envs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl100.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("online_iterations", "collect_episodes", "bc_steps", "max_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rl100.{name} must be >= 0, got {getattr(self, name)}")
        if not EVAL_SEEDS[0] > self.seed_start >= 0:
            raise ConfigError(f"rl100.seed_start must be in [0, {EVAL_SEEDS[0]}), got {self.seed_start}")
        if not 0.5 <= self.expectile < 1:
            raise ConfigError(f"rl100.expectile must be in [0.5, 1), got {self.expectile}")


def rl100_config_from_dict(d: dict) -> RL100Config:
    d = dict(d)
    chain = ChainConfig(**d.pop("chain", {}))
    return RL100Config(**d, chain=chain)


# ----------------------------------------------------------------------------------------- the data
def copy_store(
    src: str | Path, dest: Path, keep: set[str], reward_fn: Callable[[dict, bool | None], np.ndarray]
) -> dict:
    """The run's own copy of ``src``: its keys in ``keep`` (what the sim can record) plus ``reward`` per
    step (``reward_fn(episode, its success flag)`` where the source has none); episodes' task/source/success
    kept.
    Returns {"episodes", "dropped_keys"}. ``src`` is only read."""
    store = EpisodeStore.open(src)
    try:
        keys = {k: s for k, s in store.keys.items() if k in keep and k != REWARD_KEY}
        if K.ACTION not in keys:
            raise VlaflowError(f"{src}: no {K.ACTION!r} key; RL-100 needs the demonstrations' actions")
        specs = {**keys, REWARD_KEY: KeySpec("float32", (1,), "other")}
        with atomic_store(dest, specs, store.fps or 10.0, attrs={"rl100_copy_of": str(src)}) as out:
            for i in range(store.n_episodes):
                ep = store.get_episode(i, list(keys) + ([REWARD_KEY] if REWARD_KEY in store.keys else []))
                m = store.episode_meta(i)
                if REWARD_KEY not in ep:
                    ep[REWARD_KEY] = np.asarray(reward_fn(ep, m["success"]), np.float32).reshape(-1, 1)
                out.append_episode(ep, task=m["task"], source=m["source"], success=m["success"])
        return {"episodes": store.n_episodes, "dropped_keys": sorted(set(store.keys) - set(specs))}
    finally:
        store.close()


def episode_transitions(ep: dict, policy, reward: str, stride: int = 1) -> dict[str, np.ndarray]:
    """Chunk-level transitions of one stored episode at decisions t = 0, stride, 2 stride, ...: the obs
    window, the H-step chunk from t (normalized, the last action repeated past the end), the reward of the
    Ta executed steps, the window at t + Ta and done (the chunk reaches the first success, where the sim
    ends an episode; stored steps after it are left out; an episode that never succeeds is cut by its
    step limit, not done). Any step can start a chunk, so stride 1 (< Ta) gives Ta times the transitions
    of the same chunk-level MDP."""
    pc = policy.config
    keys, to, h, ta = tuple(pc.obs_shapes), int(pc.n_obs_steps), int(pc.horizon), int(pc.n_action_steps)
    act = np.asarray(ep[K.ACTION], np.float32)
    n = len(act)
    step_r = np.asarray(ep[REWARD_KEY], np.float32).reshape(-1)
    hit = np.flatnonzero(step_r >= 1.0 - 1e-6)  # reward clip(coverage/0.95) = 1: the success step
    if reward == "success":
        step_r = np.zeros(n, np.float32)
        if len(hit):
            step_r[hit[0]] = 1.0
    d = np.arange(0, n, stride or ta)
    if len(hit):  # the sim ends an episode at its first success: later stored steps are not in the MDP
        d = d[d <= hit[0]]
        step_r[hit[0] + 1 :] = 0.0

    def window(t):
        rows = np.clip(t[:, None] + np.arange(-to + 1, 1), 0, n - 1)
        return {k: torch.from_numpy(np.asarray(ep[k], np.float32)[rows]) for k in keys}

    a = act[np.minimum(d[:, None] + np.arange(h), n - 1)]
    with torch.no_grad():
        a_n = policy.normalize_target(torch.from_numpy(a)).flatten(1).numpy()
    r = np.array([step_r[t : t + ta].sum() for t in d], np.float32)
    done = (d + ta > hit[0]) if len(hit) else np.zeros(len(d), bool)
    return {
        "s": flat_obs(window(d), keys).numpy(),
        "a": a_n,
        "r": r.astype(np.float32),
        "s2": flat_obs(window(np.minimum(d + ta, n - 1)), keys).numpy(),
        "done": done.astype(np.float32),
    }


def store_transitions(store_path: Path, policy, reward: str, stride: int = 1) -> dict[str, torch.Tensor]:
    """:func:`episode_transitions` of every episode of the store, concatenated as tensors."""
    keys = [*policy.config.obs_shapes, K.ACTION, REWARD_KEY]
    store = EpisodeStore.open(store_path)
    try:
        parts = [
            episode_transitions(store.get_episode(i, keys), policy, reward, stride)
            for i in range(store.n_episodes)
        ]
    finally:
        store.close()
    return {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]}


def _windows(store_path: Path, policy) -> tuple[WindowSampler, EpisodeStore]:
    pc = policy.config
    store = EpisodeStore.open(store_path)
    ws = WindowSampler(store, tuple(pc.obs_shapes), pc.n_obs_steps, pc.horizon, action_key=K.ACTION)
    return ws, store


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation of paired values (None below 3 pairs or when one side is constant)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


# ------------------------------------------------------------------------------------------- the run
def preflight(cfg, policy, out: str | Path, data: str, resume: bool) -> None:
    """Refuse what would fail later, before any work: an --out that exists without --resume (or nothing to
    resume), no demonstration store, a deterministic chain (the error lists the stochastic options)."""
    out = Path(out)
    if resume:
        if not (out / "rl100_state.json").exists():
            raise VlaflowError(f"{out}: nothing to resume (no rl100_state.json); start without --resume")
        return
    if out.exists() and any(out.iterdir()):
        raise VlaflowError(
            f"{out}: exists and is not empty; pass --resume to continue that run or use a new --out"
        )
    if not data:
        raise ConfigError("--algo rl100 needs --data STORE (the demonstrations; the run works on a copy)")
    if not Path(data).exists():
        raise VlaflowError(f"--data {data}: no such episode store")
    if policy is not None:
        resolve_chain(policy, cfg.rl100.chain)  # raises for a deterministic sampler, naming the options


Evaluate = Callable[..., dict]  # the loop's Evaluator protocol: (policy, n_episodes, out_dir, video, ckpt)


class RL100Run:
    """One ``refine --algo rl100`` run directory (see the module doc); :meth:`run` drives it to the end."""

    def __init__(
        self,
        cfg,  # RefineConfig (its rl100 section, seed, device, threads, progress, eval episodes)
        policy_path: str,
        data: str,
        out: str | Path,
        *,
        venv,
        reward_fn: Callable[[dict, bool | None], np.ndarray],
        record_keys: set[str],
        evaluate: Evaluate | None = None,
        online: Callable[[str, Path, bool], dict] | None = None,
        resume: bool = False,
        gate_dynamics: Callable[..., object] | None = None,
    ):
        self.cfg, self.rc = cfg, cfg.rl100
        self.out = Path(out)
        self.state_file = self.out / "rl100_state.json"
        self.log_file = self.out / "rl100_log.jsonl"
        self.venv, self.reward_fn, self.evaluate, self.online = venv, reward_fn, evaluate, online
        # gate_model=wm: (policy, seed=) -> the world model's gate model (vlaflow.world_models.gate)
        self.gate_dynamics = gate_dynamics
        if self.rc.gate_model == "wm" and gate_dynamics is None:
            raise ConfigError("rl100.gate_model=wm needs the world model's gate model (world_model=WM_CKPT)")
        self.store_path = self.out / "store.zarr"
        self._gate_fit: tuple | None = None  # (iteration, transitions, dynamics, its loss, critic)
        if resume:
            preflight(cfg, None, out, data, resume)
            self.state = json.loads(self.state_file.read_text())
            return
        policy = load_checkpoint(policy_path)
        preflight(cfg, policy, out, data, resume)
        self.out.mkdir(parents=True, exist_ok=True)
        info = copy_store(data, self.store_path, set(record_keys) | {K.ACTION}, reward_fn)
        (self.out / "run_config.json").write_text(
            json.dumps(
                {"refine": dataclasses.asdict(cfg), "policy": str(policy_path), "data": str(data)}, indent=1
            )
        )
        self.state = {
            "iteration": 0,
            "stage": "eval0" if self._eval_n else "critic",
            "current": str(policy_path),
            "data": str(data),
            "store": str(self.store_path),
            "store_copy": info,
            "env_steps": 0,
            "wall_s": 0.0,
            "scores": {},  # checkpoint -> held-out {score, success_rate}
            "estimates": [],  # [gate estimate, checkpoint] pairs of every gated policy
            "iter": {},  # this iteration's gate result, candidate, accepted policy
            "done": False,
        }
        self._save_state()

    # -- bookkeeping --------------------------------------------------------------------------------
    @property
    def _eval_n(self) -> int:
        return int(self.cfg.eval_episodes) if self.evaluate is not None else 0

    def _save_state(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_file)

    def _advance(self, stage: str, t0: float, **updates) -> None:
        self.state.update(updates)
        self.state["stage"] = stage
        self.state["wall_s"] = float(self.state["wall_s"]) + (time.perf_counter() - t0)
        self._save_state()

    def _loop(self, run_dir: Path, steps: int, lr: float, desc: str, ckpt_every: int = 0) -> TrainingLoop:
        """A loop for one stage: resumed from its checkpoints/last if a kill left one, else started fresh."""
        resume = (run_dir / "checkpoints" / "last").exists()
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # killed before its first checkpoint: start the stage over
        c = self.cfg
        lc = LoopConfig(
            steps=steps,
            lr=lr,
            schedule="constant",
            grad_clip=c.grad_clip,
            seed=c.seed,
            workers=0,
            log_every=max(1, min(50, steps)),
            ckpt_every=ckpt_every or steps,
            device=c.device,
            num_threads=c.threads,
            progress=c.progress,
            desc=desc,
            logger="none",
        )
        return TrainingLoop(lc, run_dir, resume=resume)

    def _meta(self, stage: str, i: int) -> RunMeta:
        cfg = {"rl100_stage": stage, "iteration": i, "rl100": dataclasses.asdict(self.rc)}
        return RunMeta(
            config=cfg,
            resumable=frozenset({"rl100.iterations", "rl100.online_iterations"}),  # a run may be extended
            provenance=P.invocation(str(self.store_path)),
            title=f"rl100 iteration {i}: {stage}",
        )

    def _score(self, ckpt: str, where: Path) -> dict | None:
        if not self._eval_n:
            return None
        if ckpt in self.state["scores"]:
            return self.state["scores"][ckpt]
        pol = load_checkpoint(ckpt, device=self.cfg.device).eval()
        res = self.evaluate(pol, n_episodes=self._eval_n, out_dir=where, video=False, ckpt=Path(ckpt))
        self.state["scores"][ckpt] = {"score": res["score"], "success_rate": res["success_rate"]}
        return self.state["scores"][ckpt]

    def _it_dir(self, i: int) -> Path:
        return self.out / f"iter_{i:03d}"

    # -- stages -------------------------------------------------------------------------------------
    def _critic(self, i: int) -> None:
        rc, t0 = self.rc, time.perf_counter()
        policy = load_checkpoint(self.state["current"])
        data = store_transitions(self.store_path, policy, rc.reward, rc.stride)
        loop = self._loop(self._it_dir(i) / "critic", rc.critic_steps, rc.critic_lr, f"rl100 iter {i} critic")
        obj = IQLObjective(
            policy,
            data,
            gamma=chunk_discount(rc.gamma, policy.config.n_action_steps),
            expectile=rc.expectile,
            polyak_rate=rc.polyak,
            batch_size=rc.critic_batch,
            width=rc.critic_width,
            seed=self.cfg.seed + i,
        )
        loop.run(
            obj,
            meta=self._meta("critic", i),
        )
        self._advance("ppo", t0, transitions=int(len(data["s"])))

    def _load_critic(self, i: int, policy) -> StandardizedCritic:
        tensors = load_file(
            str(self._it_dir(i) / "critic" / "checkpoints" / "last" / "train_state.safetensors")
        )
        w = {k[len("model/critic.") :]: v for k, v in tensors.items() if k.startswith("model/critic.")}
        act_dim = int(policy.config.horizon) * int(policy.config.action_dim)
        critic = StandardizedCritic(w["s_mean"].shape[0], act_dim, self.rc.critic_width)
        critic.load_state_dict(w)
        return critic.eval()

    def _ppo(self, i: int) -> None:
        rc, t0 = self.rc, time.perf_counter()
        policy = load_checkpoint(self.state["current"])
        critic = self._load_critic(i, policy)
        ws, store = _windows(self.store_path, policy)
        store.close()
        spr = rc.update_epochs * rc.n_minibatches
        loop = self._loop(self._it_dir(i) / "ppo", rc.ppo_rounds * spr, rc.ppo_lr, f"rl100 iter {i} ppo", spr)
        obj = OfflinePPO(
            policy.to(loop.device),
            critic.to(loop.device),
            ws,
            chain=rc.chain,
            logprob=rc.logprob,
            n_windows=rc.ppo_windows,
            update_epochs=rc.update_epochs,
            n_minibatches=rc.n_minibatches,
            clip=rc.clip,
            gamma_denoise=rc.gamma_denoise,
            seed=self.cfg.seed + i,
        )
        loop.run(obj, meta=self._meta("ppo", i))
        cand = str(self._it_dir(i) / "ppo" / "checkpoints" / "last")
        self._advance("gate", t0, iter={"candidate": cand})

    def gate_estimates(self, i: int, candidate: str, current: str) -> dict:
        """The gate's verdict on ``candidate`` against ``current`` with this iteration's critic (see
        :func:`vlaflow.rl.gate.gate`); both policies sample their own chains from the same noise."""
        rc = self.rc
        cur = load_checkpoint(current).eval()
        cand = load_checkpoint(candidate).eval()
        if self._gate_fit is None or self._gate_fit[0] != i:  # one dynamics fit per iteration
            data = store_transitions(self.store_path, cur, rc.reward, rc.stride)
            self._gate_fit = (i, data, *self._gate_model(i, cur, data), self._load_critic(i, cur))
        _, data, model, loss, critic = self._gate_fit
        g = torch.Generator().manual_seed(self.cfg.seed * 31 + i)
        starts = data["s"][torch.randint(0, len(data["s"]), (rc.gate_starts,), generator=g)]
        res = gate(
            _policy_fn(cand, self.cfg.seed + i),
            _policy_fn(cur, self.cfg.seed + i),
            model,
            starts,
            horizon=rc.gate_horizon,
            gamma=chunk_discount(rc.gamma, cur.config.n_action_steps),
            value=critic.value,
            margin=rc.gate_margin,
            disagreement_coef=rc.gate_disagreement,
            uncertainty_coef=rc.gate_uncertainty,
        )
        return {
            "accept": bool(res.accept),
            "candidate": res.candidate,
            "current": res.current,
            "dynamics_loss": loss,
            "gate_model": rc.gate_model,
        }

    def _gate_model(self, i: int, cur, data: dict) -> tuple:
        """(the gate's model, its dynamics loss): the ensemble fit on ``data`` (its last training loss), or
        the frozen world model (nothing to fit: the same standardized error on up to 512 transitions)."""
        rc, seed = self.rc, self.cfg.seed + i
        torch.manual_seed(seed)
        if rc.gate_model == "wm":
            model = self.gate_dynamics(cur, seed=seed)
            model.set_stats(data["s"], data["a"], data["s2"], data["r"])
            sub = torch.randperm(len(data["s"]))[:512]
            model.reset_noise()
            return model, float(model.loss(*(data[k][sub] for k in ("s", "a", "s2", "r"))))
        model = DynamicsEnsemble(data["s"].shape[1], data["a"].shape[1], rc.gate_models, rc.gate_width)
        return model, fit_dynamics(
            model, data["s"], data["a"], data["s2"], data["r"], rc.gate_steps, seed=seed
        )

    def _gate(self, i: int) -> None:
        t0 = time.perf_counter()
        it = dict(self.state["iter"])
        g = self.gate_estimates(i, it["candidate"], self.state["current"])
        it["gate"] = g
        it["accepted_policy"] = it["candidate"] if g["accept"] else self.state["current"]
        est = self.state["estimates"]
        est += [[g["candidate"], it["candidate"]], [g["current"], self.state["current"]]]
        if self._eval_n:
            self._score(it["candidate"], self._it_dir(i) / "eval_candidate")
        self._advance("collect", t0, iter=it, estimates=est)

    def _collect(self, i: int) -> None:
        rc, t0 = self.rc, time.perf_counter()
        it = dict(self.state["iter"])
        source = f"policy:rl100:iter{i}"
        store = EpisodeStore.open(self.store_path, "a")
        try:
            have = any(store.episode_meta(j)["source"] == source for j in range(store.n_episodes))
            task = store.tasks[0] if store.tasks else ""
            keys = [k for k in store.keys if k not in (K.ACTION, REWARD_KEY)]
            if not have and rc.collect_episodes:  # (a kill after the append: not appended twice)
                eps, steps = self._rollouts(i, it["accepted_policy"])
                data = {k: np.concatenate([e["obs"][k] for e in eps]) for k in keys}
                data[K.ACTION] = np.concatenate([e["action"] for e in eps])
                data[REWARD_KEY] = np.concatenate([e["reward"] for e in eps])[:, None]
                store.append_episodes(
                    data,
                    [len(e["action"]) for e in eps],
                    [task] * len(eps),
                    [source] * len(eps),
                    [e["success"] for e in eps],
                )
                it["collected"] = {
                    "episodes": len(eps),
                    "success": float(np.mean([e["success"] for e in eps])),
                    "env_steps": int(steps),
                    "seeds": [int(e["seed"]) for e in eps],
                }
                self.state["env_steps"] = int(self.state["env_steps"]) + int(steps)
            n_eps = store.n_episodes
        finally:
            store.close()
        it["store_episodes"] = n_eps
        self._advance("bc", t0, iter=it)

    def _rollouts(self, i: int, ckpt: str) -> tuple[list[dict], int]:
        """``collect_episodes`` episodes of the stochastic chain of ``ckpt`` on training seeds, env steps."""
        rc, venv = self.rc, self.venv
        policy = load_checkpoint(ckpt, device=self.cfg.device).eval()
        chain = resolve_chain(policy, rc.chain)
        ta = int(policy.config.n_action_steps)
        n_dec = math.ceil(int(getattr(venv, "max_steps", 0) or 300) / ta)
        rounds = math.ceil(rc.collect_episodes / venv.n_envs)
        span = EVAL_SEEDS[0] - rc.seed_start
        venv.take_episodes()  # nothing left over from an earlier call
        steps0, eps = venv.env_steps, []
        bar = _bar(rounds * venv.n_envs, f"rl100 iter {i} collect", self.cfg.progress)
        for r in range(rounds):
            first = (i * rounds + r) * venv.n_envs
            seeds = [rc.seed_start + (first + j) % span for j in range(venv.n_envs)]
            gen = torch.Generator(device=policy.device).manual_seed(self.cfg.seed * 1_000_003 + first)
            collect(policy, policy, chain, venv, seeds, n_dec, ta, gen)
            got = venv.take_episodes()
            eps += got
            if bar is not None:
                bar.update(venv.n_envs)
                bar.set_postfix(
                    success=f"{np.mean([e['success'] for e in eps]):.2f}" if eps else "-", refresh=False
                )
        if bar is not None:
            bar.close()
        return eps[: rc.collect_episodes], venv.env_steps - steps0

    def _bc(self, i: int) -> None:
        rc, t0 = self.rc, time.perf_counter()
        it = dict(self.state["iter"])
        new = it["accepted_policy"]
        if rc.bc_steps:
            policy = load_checkpoint(it["accepted_policy"])
            ws, store = _windows(self.store_path, policy)
            store.close()
            loop = self._loop(self._it_dir(i) / "bc", rc.bc_steps, rc.bc_lr, f"rl100 iter {i} bc")
            p = loop.process
            obj = BehaviourCloning(
                policy.to(loop.device),
                ws,
                batch_size=rc.bc_batch,
                seed=self.cfg.seed + i,
                rank=p.rank,
                world=p.world,
            )
            loop.run(
                obj,
                meta=self._meta("bc", i),
            )
            new = str(self._it_dir(i) / "bc" / "checkpoints" / "last")
        score = self._score(new, self._it_dir(i) / "eval_policy")
        self._log_row(i, it, score, time.perf_counter() - t0)
        self._advance("critic", t0, iteration=i + 1, current=new, iter={})

    def _log_row(self, i: int, it: dict, score: dict | None, dt: float) -> None:
        scores, est = self.state["scores"], self.state["estimates"]
        pairs = [(e, scores[c]["score"]) for e, c in est if c in scores]
        cand = scores.get(it["candidate"])
        g = it["gate"]
        row = {
            "iteration": i,
            "gate_candidate": g["candidate"],
            "gate_current": g["current"],
            "accepted": g["accept"],
            "gate_model": g.get("gate_model", "ensemble"),
            "dynamics_loss": g["dynamics_loss"],
            "candidate_score": cand["score"] if cand else None,
            "candidate_success": cand["success_rate"] if cand else None,
            "score": score["score"] if score else None,
            "success": score["success_rate"] if score else None,
            "eval_episodes": self._eval_n,
            "spearman_gate_vs_sim": spearman([p[0] for p in pairs], [p[1] for p in pairs]),
            "n_gate_sim_pairs": len(pairs),
            "collected": it.get("collected"),
            "store_episodes": it.get("store_episodes"),
            "env_steps_total": int(self.state["env_steps"]),
            "wall_s_total": round(float(self.state["wall_s"]) + dt, 1),
        }
        done = set()
        if self.log_file.exists():
            done = {json.loads(line)["iteration"] for line in self.log_file.read_text().splitlines() if line}
        if i not in done:  # a kill between the row and the state: the row is not written twice
            with open(self.log_file, "a") as f:
                f.write(json.dumps(row) + "\n")

    # -- the driver ---------------------------------------------------------------------------------
    def run(self) -> dict:
        st, rc = self.state, self.rc
        stages = {
            "critic": self._critic,
            "ppo": self._ppo,
            "gate": self._gate,
            "collect": self._collect,
            "bc": self._bc,
        }
        if st["stage"] == "eval0":
            t0 = time.perf_counter()
            self._score(st["current"], self.out / "eval_initial")
            self._advance("critic", t0)
        while st["iteration"] < rc.iterations and st["stage"] in stages:
            stages[st["stage"]](int(st["iteration"]))
        if st["stage"] == "critic" and st["iteration"] >= rc.iterations:
            self._advance(
                "online" if rc.online_iterations and self.online is not None else "final", time.perf_counter()
            )
        if st["stage"] == "online":
            t0 = time.perf_counter()
            online_dir = self.out / "online"
            res = self.online(st["current"], online_dir, (online_dir / "checkpoints" / "last").exists())
            self._advance(
                "final",
                t0,
                current=res["ckpt"],
                env_steps=int(st["env_steps"]) + int(res.get("env_steps", 0)),
                online=res,
            )
        if st["stage"] == "final":
            t0 = time.perf_counter()
            final = self.out / "final"
            copy_checkpoint(Path(st["current"]), final)
            final_eval = None
            if self.evaluate is not None and self.cfg.final_episodes:
                pol = load_checkpoint(final, device=self.cfg.device).eval()
                res = self.evaluate(
                    pol,
                    n_episodes=self.cfg.final_episodes,
                    out_dir=self.out / "eval_final",
                    video=False,
                    ckpt=final,
                )
                final_eval = {
                    "score": res["score"],
                    "success_rate": res["success_rate"],
                    "n_episodes": self.cfg.final_episodes,
                }
            self._advance("done", t0, done=True, final=str(final), final_eval=final_eval)
        return {
            "final": st.get("final"),
            "final_eval": st.get("final_eval"),
            "iterations": st["iteration"],
            "env_steps": st["env_steps"],
            "wall_s": round(float(st["wall_s"]), 1),
            "initial": st["scores"].get(self._initial_key()),
        }

    def _initial_key(self) -> str:
        rec = json.loads((self.out / "run_config.json").read_text())
        return rec["policy"]


def _policy_fn(policy, seed: int):
    """(B, Ds) flat obs features -> (B, H x Da) normalized chunks of ``policy``'s own sampler; its noise from
    a generator seeded by ``seed`` (two policies given the same seed draw the same noise)."""
    pc = policy.config
    keys, shapes, to = (
        tuple(pc.obs_shapes),
        {k: tuple(v) for k, v in pc.obs_shapes.items()},
        int(pc.n_obs_steps),
    )
    g = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def fn(s: torch.Tensor) -> torch.Tensor:
        cond = policy.encode(unflat_obs(s, keys, shapes, to))
        return policy.denoise(cond, generator=g).x0.flatten(1)

    return fn


def _bar(total: int, desc: str, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ep", dynamic_ncols=True)
