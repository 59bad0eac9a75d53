"""``vlaflow refine --policy CKPT --task pusht --algo dppo|dsrl|rl100 --out RUN [field=value ...]``: RL.

The run (objective on the one training loop, curves, checkpoint selection) is
:func:`vlaflow.train.refine.refine`; this module builds what needs the simulators: the vectorized rollout
envs (:class:`vlaflow.sim.rollout.SubprocChunkEnv`, training seeds 0..99,999) and the held-out evaluator
(seeds 100000..). ``--resume`` continues RUN from ``checkpoints/last`` with the config it recorded.
``--algo rl100 --data STORE`` runs RL-100's offline iterations (:mod:`vlaflow.train.rl100`) on a copy of
STORE, collecting with a recording vectorized env; ``--resume`` continues at the stage it recorded; with
``rl100.gate_model=wm --world-model WM`` its gate scores policies in the frozen diffusion world model.
``--algo world4rl`` takes its imagined reward from ``wm_reward`` (``coverage`` | ``classifier``; default the
one the world-model checkpoint records) and records the resolved choice in the run's config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from vlaflow.errors import ConfigError, VlaflowError


def add_refine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", help="the imitation policy checkpoint to refine (diffusion or flow)")
    parser.add_argument(
        "--task",
        default=None,
        help="sim task with a reward/success signal: pusht (default) or pick_place (dppo / dsrl)",
    )
    parser.add_argument(
        "--algo", default=None, choices=("dppo", "dsrl", "world4rl", "rl100"), help="algorithm (default dppo)"
    )
    parser.add_argument(
        "--online-iterations",
        type=int,
        default=None,
        help="rl100: a final online DPPO stage of this many iterations (= rl100.online_iterations)",
    )
    parser.add_argument(
        "--world-model",
        default="",
        help="world4rl, or rl100 with rl100.gate_model=wm: world-model checkpoint (train-wm)",
    )
    parser.add_argument(
        "--starts", default="", help="world4rl: episode store whose episode starts begin imagined episodes"
    )
    parser.add_argument("--out", required=True, help="run directory (checkpoints/, log.csv, rl_curves.png)")
    parser.add_argument("--resume", action="store_true", help="continue RUN from checkpoints/last")
    parser.add_argument(
        "--data",
        default="",
        help="demo store: rl100's demonstrations (the run works on a copy), or dppo's BC regularizer data",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="FIELD=VALUE settings, e.g. iterations=10 dppo.n_envs=16 dppo.chain.finetune_last=5 "
        "dppo.chain.min_std=0.1 eval_every=2 (see --print-config for every field)",
    )


def _load_config(args) -> tuple:
    from vlaflow.train.refine import RefineConfig, apply_overrides, refine_config_from_dict

    out = Path(args.out)
    saved = out / "run_config.json"
    if args.resume:
        if not saved.exists():
            raise VlaflowError(f"{out}: nothing to resume (no run_config.json); start it without --resume")
        rec = json.loads(saved.read_text())
        cfg = refine_config_from_dict(rec["refine"])
        policy = args.policy or rec["policy"]
        args.data = args.data or rec.get("data", "")
    else:
        if not args.policy:
            raise ConfigError("--policy CKPT is required (the checkpoint to refine)")
        cfg, policy = RefineConfig(), args.policy
    if args.task:
        cfg = dataclasses.replace(cfg, task=args.task)
    wm = {k: v for k, v in (("world_model", args.world_model), ("wm_starts", args.starts)) if v}
    if args.algo or wm:
        cfg = dataclasses.replace(cfg, **({"algo": args.algo} if args.algo else {}), **wm)
    cfg = apply_overrides(cfg, args.overrides)
    if args.online_iterations is not None:
        cfg = dataclasses.replace(
            cfg, rl100=dataclasses.replace(cfg.rl100, online_iterations=args.online_iterations)
        )
    return cfg, policy


def run_refine(args: argparse.Namespace) -> int:
    cfg, policy_path = _load_config(args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        return 0
    from vlaflow.sim.rollout import SubprocChunkEnv, check_reward_task

    check_reward_task(cfg.task)  # before loading anything: a task without reward is refused
    import torch

    from vlaflow.cli.train import RolloutEvaluator
    from vlaflow.policies.checkpoint import load_checkpoint
    from vlaflow.sim.policies import check_compatible
    from vlaflow.sim.tasks import make_env
    from vlaflow.train.config import EvalConfig
    from vlaflow.train.refine import refine

    torch.set_num_threads(cfg.threads)
    policy = load_checkpoint(policy_path, device=cfg.device)
    env = make_env(cfg.task)
    try:
        check_compatible(policy.spec, env.task_spec, "being refined")
    finally:
        env.close()
    if cfg.algo == "rl100":
        return _run_rl100(args, cfg, policy_path, policy)
    bc_batch = None
    if cfg.algo == "dppo" and cfg.dppo.bc_coef > 0:
        bc_batch = _bc_source(policy, args.data, cfg)
    ev_cfg = EvalConfig(task=cfg.task, seed_start=cfg.eval_seed_start, n_workers=cfg.eval_workers)
    holder: dict = {}
    evaluator = None
    if cfg.eval_episodes or cfg.final_episodes:
        if cfg.on_policy:  # world4rl too: trained in imagination, evaluated in the real sim
            evaluator = RolloutEvaluator(ev_cfg, progress=False)
        else:  # the steered policy (frozen denoiser + noise actor) runs in this process
            evaluator = _SteeredEval(ev_cfg, holder)
    if cfg.algo == "world4rl":
        venv, reward = _imagined_env(cfg, policy)
        cfg = dataclasses.replace(cfg, wm_reward=reward)  # recorded in run_config.json as resolved
    else:
        venv = SubprocChunkEnv(
            cfg.task,
            cfg.n_envs,
            tuple(policy.config.obs_shapes),
            policy.config.n_obs_steps,
            workers=cfg.env_workers,
        )
    with venv:
        res = refine(
            cfg,
            policy,
            policy_path,
            args.out,
            venv,
            evaluate=evaluator,
            resume=args.resume,
            bc_batch=bc_batch,
            on_objective=lambda o: holder.__setitem__("obj", o),
        )
    summary = {
        "stopped": res.stopped,
        "steps": res.step,
        "train_seconds": round(res.train_seconds, 1),
        "best_score": res.best_score,
        "best_ckpt": str(res.best_ckpt) if res.best_ckpt else None,
        "last_ckpt": str(res.last_ckpt) if res.last_ckpt else None,
        "evals": res.evals,
        "final": {k: v for k, v in (res.final_eval or {}).items() if k != "report"},
    }
    obj = holder.get("obj")
    if cfg.algo == "world4rl" and obj is not None:
        # the proof that RL never touched the real env: the objective's counter of the rollout env's
        # real steps (the held-out evaluation in the sim is scoring, not training data)
        summary["world4rl"] = {
            "real_env_steps_during_rl": int(obj.env_steps),
            "imagined_steps": int(venv.imagined_steps),
            "model_calls": int(venv.model_calls),
            "reward": cfg.wm_reward,
            "world_model": cfg.world_model,
        }
        (Path(args.out) / "world4rl.json").write_text(json.dumps(summary["world4rl"], indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def _run_rl100(args, cfg, policy_path: str, policy) -> int:
    """RL-100's offline iterations (and the optional online DPPO stage) with the sim parts built here."""
    import functools

    import numpy as np

    from vlaflow.cli.train import RolloutEvaluator
    from vlaflow.policies.checkpoint import load_checkpoint
    from vlaflow.sim.rollout import SubprocChunkEnv, stored_step_rewards
    from vlaflow.sim.tasks import make_env
    from vlaflow.train.config import EvalConfig
    from vlaflow.train.refine import refine
    from vlaflow.train.rl100 import RL100Run, preflight

    preflight(cfg, policy, args.out, args.data, args.resume)  # before any sim process starts
    gate_dynamics = None
    if cfg.rl100.gate_model == "wm":
        from vlaflow.sim.imagined import state_codec
        from vlaflow.world_models.gate import world_model_gate

        gate_dynamics = world_model_gate(
            cfg.world_model,
            task=cfg.task,
            reward=cfg.rl100.reward,
            n_samples=cfg.rl100.gate_models,
            seed=cfg.seed,
            device=cfg.device,
            codec_for=state_codec,  # keypoint policies: the PushT state recovered from their keypoints
        )
        gate_dynamics(policy)  # refuse a model of another task / key / action dim now, not at the gate
    env = make_env(cfg.task)
    try:
        record_keys = set(env.task_spec.obs_shapes)
    finally:
        env.close()
    ev_cfg = EvalConfig(task=cfg.task, seed_start=cfg.eval_seed_start, n_workers=cfg.eval_workers)
    evaluator = (
        RolloutEvaluator(ev_cfg, progress=False) if (cfg.eval_episodes or cfg.final_episodes) else None
    )
    pc, rc = policy.config, cfg.rl100
    env_args = (cfg.task, rc.n_envs, tuple(pc.obs_shapes), pc.n_obs_steps)

    def online(ckpt: str, out_dir, resume: bool) -> dict:
        ocfg = dataclasses.replace(cfg, algo="dppo", iterations=rc.online_iterations)
        holder: dict = {}
        with SubprocChunkEnv(*env_args[:1], ocfg.dppo.n_envs, *env_args[2:], workers=cfg.env_workers) as ov:
            res = refine(
                ocfg,
                load_checkpoint(ckpt, device=cfg.device),
                ckpt,
                out_dir,
                ov,
                evaluate=evaluator,
                resume=resume,
                on_objective=lambda o: holder.__setitem__("obj", o),
            )
        best = res.best_ckpt or res.last_ckpt
        return {"ckpt": str(best), "env_steps": int(holder["obj"].env_steps), "steps": res.step}

    venv = SubprocChunkEnv(*env_args, workers=cfg.env_workers, max_steps=rc.max_steps, record=True)
    with venv:
        run = RL100Run(
            cfg,
            policy_path,
            args.data,
            args.out,
            venv=venv,
            reward_fn=functools.partial(stored_step_rewards, cfg.task),
            record_keys=record_keys,
            evaluate=evaluator,
            online=online,
            resume=args.resume,
            gate_dynamics=gate_dynamics,
        )
        summary = run.run()
    print(json.dumps(summary, indent=1, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))
    return 0


def _imagined_env(cfg, policy):
    """(the frozen world model as the rollout env, started from the store's recorded episode starts; the
    name of its reward: ``cfg.wm_reward``, or the checkpoint's recorded choice when empty)."""
    from vlaflow.sim.imagined import derived_keys
    from vlaflow.world_models.checkpoint import imagined_reward, load_world_model
    from vlaflow.world_models.data import episode_starts, episodes_from_store
    from vlaflow.world_models.env import WorldModelEnv

    wm = load_world_model(cfg.world_model, device=cfg.device)
    pc, wc = policy.config, wm.config
    wc.check_fits(cfg.world_model, task=cfg.task)
    # keys the policy reads that are functions of the predicted state (PushT keypoints, agent position)
    own, derive = derived_keys(cfg.task, wc.obs_key, wc.obs_dim, dict(pc.obs_shapes))
    wc.check_fits(
        cfg.world_model, task=cfg.task, obs_shapes=own, action_dim=int(pc.action_dim), user="the policy"
    )
    # coverage: the task's own reward from the predicted state (refused for a task without one, naming the
    # tasks that have one); classifier: refused, naming the fix, when the checkpoint has none
    reward, reward_fn = imagined_reward(cfg.world_model, cfg.task, cfg.wm_reward or None)
    starts = episode_starts(episodes_from_store(cfg.wm_starts, wm.config.obs_key, wm.config.action_key))
    venv = WorldModelEnv(
        wm,
        starts,
        cfg.n_envs,
        policy.config.n_obs_steps,
        reward_fn,
        max_steps=cfg.wm_horizon,
        n_samples=cfg.wm_samples,
        uncertainty_penalty=cfg.wm_uncertainty_penalty,
        seed=cfg.seed,
        derive=derive,
    )
    return venv, reward


class _SteeredEval:
    """The held-out evaluation of a DSRL run: the frozen policy steered by the current noise actor."""

    def __init__(self, ev_cfg, holder: dict):
        self.ev, self.holder = ev_cfg, holder

    def __call__(self, policy, *, n_episodes, out_dir, video=False, ckpt=None):
        from vlaflow.cli.train import _summary
        from vlaflow.sim.evaluate import evaluate

        report = evaluate(
            self.holder["obj"].steered(),  # a runtime object: runs in this process
            task=self.ev.task,
            workers=0,
            out_dir=out_dir,
            n_episodes=n_episodes,
            start_seed=self.ev.seed_start,
            videos=1 if video else 0,
            progress=False,
        )
        return _summary(report)


def _bc_source(policy, data: str, cfg):
    if not data:
        raise ConfigError("dppo.bc_coef > 0 needs --data STORE (the demonstrations to regularise toward)")
    import vlaflow.keys as K
    import vlaflow.train.schedule as S
    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler
    from vlaflow.train.objectives.bc import make_batch

    pc = policy.config
    store = EpisodeStore.open(data)
    ws = WindowSampler(
        store,
        obs_keys=tuple(pc.obs_shapes),
        n_obs_steps=pc.n_obs_steps,
        horizon=pc.horizon,
        action_key=K.ACTION,
    )
    size = max(1, 256 // cfg.dppo.n_minibatches)
    return lambda step: make_batch(ws, S.batch_indices(cfg.seed, step, len(ws), size))
