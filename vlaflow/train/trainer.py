"""``train(cfg, data, out)``: a :class:`~vlaflow.train.config.RunConfig` run -- the behaviour-cloning
objective on the one training loop (:mod:`vlaflow.train.loop`, which documents the run directory).

Rollout evaluation (periodic every ``train.eval_every`` steps and at the end, selecting
``checkpoints/best``) needs an ``evaluate`` callable: the CLI builds it from the sim harness
(:func:`vlaflow.cli.train.rollout_evaluator`), since this layer does not import the simulators.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import vlaflow.keys as K
import vlaflow.train.provenance as provenance
from vlaflow.errors import ConfigError
from vlaflow.train.config import RunConfig, episode_range, upgrade_run_config_dict
from vlaflow.train.loop import (  # noqa: F401  (TrainingDiverged: part of this module's interface)
    Evaluator,
    LoopConfig,
    RunMeta,
    TrainingDiverged,
    TrainingLoop,
    TrainResult,
)
from vlaflow.train.objectives.bc import BehaviourCloning
from vlaflow.train.owndata import check_keys
from vlaflow.train.validation import HeldOutValidation

# Fields that may change when resuming (bookkeeping, not the maths of the run).
RESUMABLE_CHANGES = frozenset(
    {
        "train.steps",
        "train.eval_every",
        "train.eval_episodes",
        "train.eval_at_end",
        "train.ckpt_every",
        "train.keep_step_ckpts",
        "train.log_every",
        "train.num_workers",
        "train.num_threads",
        "train.device",
        "train.max_minutes",
        "train.progress",
        "train.fused_adamw",  # float rounding only (see TrainConfig.fused_adamw)
        "train.logger",
        "train.compile",  # the same maths, compiled kernels
        "train.grad_accum",  # the same gradient (to float rounding) in smaller pieces: a smaller GPU
        "train.feature_cache_dir",  # where the cache lives, not what it holds (its key is the content)
        "eval.n_workers",
        "eval.final_episodes",
        "eval.val_windows",
    }
)


# A run shorter than this is a smoke run: unless eval.final_episodes is given, its final evaluation runs
# at most SMOKE_FINAL_EPISODES rollouts (a 30-step check of the pipeline should not start 50 rollouts).
SMOKE_STEPS = 1000
SMOKE_FINAL_EPISODES = 5


def final_episodes(cfg: RunConfig) -> tuple[int, str]:
    """(rollouts of the final evaluation, a note saying why when the smoke-run rule shortened it)."""
    n = cfg.eval.final_episodes or cfg.train.eval_episodes
    if cfg.eval.final_episodes or cfg.train.steps >= SMOKE_STEPS or n <= SMOKE_FINAL_EPISODES:
        return n, ""
    return SMOKE_FINAL_EPISODES, (
        f"train.steps={cfg.train.steps} < {SMOKE_STEPS}: a smoke run, so the final evaluation runs "
        f"{SMOKE_FINAL_EPISODES} rollouts instead of {n} (set eval.final_episodes={n} for all of them)"
    )


def loop_config(cfg: RunConfig) -> LoopConfig:
    """The loop settings of a run config's ``train`` section (and the final evaluation's size)."""
    t = cfg.train
    return LoopConfig(
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        betas=t.betas,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        schedule=t.schedule,
        ema=t.ema,
        ema_power=t.ema_power,
        ema_max=t.ema_max,
        ema_min=t.ema_min,
        grad_clip=t.grad_clip,
        fused_adamw=t.fused_adamw,
        seed=t.seed,
        workers=t.num_workers,
        max_seconds=60 * t.max_minutes,
        log_every=t.log_every,
        ckpt_every=t.ckpt_every,
        keep_step_ckpts=t.keep_step_ckpts,
        eval_every=t.eval_every,
        eval_episodes=t.eval_episodes,
        final_episodes=final_episodes(cfg)[0],
        eval_at_end=t.eval_at_end,
        device=t.device,
        num_threads=t.num_threads,
        progress=t.progress,
        desc=f"train {cfg.name}",
        logger=t.logger,
        amp=t.amp,
        grad_accum=t.grad_accum,
        compile=t.compile,
    )


def split_episodes_of(cfg: RunConfig, store, data: str = "the dataset"):
    """(training, held-out) store episode indices: the episodes ``data.episodes`` (a range) or
    ``data.max_episodes`` (the first N) select, split by ``data.val_ratio``."""
    from vlaflow.data.windows import split_episodes

    if cfg.data.episodes:
        start, stop = episode_range(cfg.data.episodes)
        if stop > store.n_episodes:
            raise ConfigError(
                f"{data}: data.episodes={cfg.data.episodes!r} reaches past the store's "
                f"{store.n_episodes} episodes (indices 0..{store.n_episodes - 1})"
            )
    else:
        start, stop = 0, store.n_episodes
        if cfg.data.max_episodes:
            stop = min(cfg.data.max_episodes, store.n_episodes)
    train, val = split_episodes(stop - start, val_ratio=cfg.data.val_ratio, seed=cfg.train.seed)
    return train + start, val + start


def open_training_data(cfg: RunConfig, data: str | Path):
    """(store, WindowSampler over the training episodes, stats); a missing key lists the store's keys."""
    from vlaflow.data.normalize import compute_stats, scaled_action_stats
    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler

    store = EpisodeStore.open(data)
    store.require_intact()  # missing chunks would read as zeros: refuse before any work
    needed = [*cfg.data.obs_keys, K.ACTION]
    missing = [k for k in needed if k not in store.keys]
    if missing:
        raise ConfigError(
            f"{data}: preset {cfg.name!r} needs key(s) {missing} that the dataset does not have; "
            f"the dataset has {sorted(store.keys)} (set data.obs_keys=... to choose others, or train "
            f"without a preset: --family {cfg.family} infers them from the store)"
        )
    check_keys(store, cfg.data.obs_keys, str(data), cfg.family)
    if store.n_episodes < 1:
        raise ConfigError(f"{data}: the dataset has no finished episodes")
    train_eps, _ = split_episodes_of(cfg, store, str(data))
    ws = WindowSampler(store, cfg.data.obs_keys, cfg.data.n_obs_steps, cfg.data.horizon, episodes=train_eps)
    if len(ws) == 0:
        raise ConfigError(f"{data}: no training windows (episodes shorter than To={cfg.data.n_obs_steps})")
    stats = store.load_stats()
    if stats is None or any(k not in stats for k in needed):
        stats = compute_stats(store, needed)
    if cfg.data.action_scale_dims:  # out of range for the store's action dim: a ConfigError naming it
        stats = scaled_action_stats(
            stats, cfg.data.action_scale_dims, cfg.data.action_scale_factor, key=K.ACTION
        )
    return store, ws, stats


def validation_windows(cfg: RunConfig, store):
    """Windows of the episodes ``data.val_ratio`` holds out (the split of :func:`open_training_data`),
    or None when nothing is held out."""
    from vlaflow.data.windows import WindowSampler

    if cfg.data.val_ratio <= 0:
        return None
    _, val_eps = split_episodes_of(cfg, store)
    if len(val_eps) == 0:
        return None
    ws = WindowSampler(store, cfg.data.obs_keys, cfg.data.n_obs_steps, cfg.data.horizon, episodes=val_eps)
    return ws if len(ws) else None


def sync_with_store(cfg: RunConfig, store) -> RunConfig:
    """``cfg`` with the policy's store-derived fields (obs shapes, action dim, fps, tasks) set from the
    store, so run_config.json says what the checkpoint holds (they used to differ: the preset's fps and
    shapes in run_config.json, the store's in the checkpoint)."""
    return dataclasses.replace(cfg, policy=_sync_policy_config(cfg, store))


STORE_FIELDS = ("obs_shapes", "action_dim", "fps", "tasks", "obs_keys")


def _resume_upgrade(cfg: RunConfig):
    """Brings a saved run config to today's form: To/H/Ta one value, and (a run saved before
    :func:`sync_with_store`) the store-derived policy fields as the store gives them -- the store itself is
    compared by its fingerprint."""
    now = cfg.to_dict()["policy"]

    def upgrade(saved: dict) -> dict:
        d = upgrade_run_config_dict(saved)
        pol = d.get("policy")
        if not isinstance(pol, dict):
            return d
        return {**d, "policy": {**pol, **{k: now[k] for k in STORE_FIELDS if k in pol and k in now}}}

    return upgrade


def build_run_policy(cfg: RunConfig, stats: dict, store=None):
    """The policy for ``cfg`` with normalizer ``stats`` (keys, To/H/Ta, fps from the run config + store)."""
    from vlaflow.policies import build_policy

    pol_cfg = _sync_policy_config(cfg, store)
    try:
        return build_policy(pol_cfg, stats)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"cannot build the {cfg.family} policy of preset {cfg.name!r}: {e}") from e


def _sync_policy_config(cfg: RunConfig, store=None):
    """Copy the data section's keys/windows into the policy config fields that mirror them (if any)."""
    pol = cfg.policy
    names = {f.name for f in dataclasses.fields(pol)}
    upd = {}
    mirror = {
        "obs_keys": tuple(cfg.data.obs_keys),
        "n_obs_steps": cfg.data.n_obs_steps,
        "horizon": cfg.data.horizon,
        "n_action_steps": cfg.data.n_action_steps,
    }
    for k, v in mirror.items():
        if k in names and getattr(pol, k) != v:
            upd[k] = v
    if store is not None:
        if "fps" in names and store.fps and pol.fps != store.fps:
            upd["fps"] = float(store.fps)
        if "obs_shapes" in names:
            upd["obs_shapes"] = {k: tuple(store.keys[k].shape) for k in cfg.data.obs_keys}
        if "action_dim" in names:
            upd["action_dim"] = int(store.keys[K.ACTION].shape[-1])
        if "tasks" in names and tuple(store.tasks) != tuple(pol.tasks):
            upd["tasks"] = tuple(store.tasks)
    return dataclasses.replace(pol, **upd) if upd else pol


def _policy_keys(policy, cfg: RunConfig) -> list[str]:
    spec = getattr(policy, "spec", None)
    return list(getattr(spec, "obs_keys", ()) or cfg.data.obs_keys)


def _data_fingerprint(store, ws) -> dict:
    return {
        "n_episodes": int(store.n_episodes),
        "n_steps": int(store.n_steps),
        "n_windows": len(ws),
        "fingerprint": provenance.store_fingerprint(store),
    }


def train(
    cfg: RunConfig,
    data: str | Path | None,
    out: str | Path,
    *,
    resume: bool = False,
    evaluate: Evaluator | None = None,
) -> TrainResult:
    """Train ``cfg`` on the store at ``data`` into run directory ``out``; ``evaluate`` scores rollouts
    (required when ``cfg.eval.task`` is set; see the module docstring).

    Checks before work: the store's keys, and -- when ``evaluate`` has a ``check(policy)`` method (the
    CLI's rollout evaluator does) -- that the policy can run on the evaluation task, before the first
    step. ``data=None`` with ``resume`` trains on the data the run recorded (:mod:`.provenance`)."""
    if data is None:
        data = provenance.recorded_data(Path(out)) if resume else None
        if data is None:
            raise ConfigError(
                f"no data given and {out} records none (a run made before provenance was recorded): "
                "pass --data STORE"
            )
    if cfg.eval.task and evaluate is None:
        raise ConfigError(
            f"eval.task={cfg.eval.task!r} asks for rollout evaluation, but train() was given no evaluate "
            "callable (vlaflow.train does not import the simulators): pass "
            "evaluate=vlaflow.cli.train.rollout_evaluator(cfg), or set eval.task= for none"
        )
    # every check comes before the run directory is made: the store (keys, damage), the policy's keys and
    # -- with a rollout evaluator -- the policy against the evaluation task; a refused run leaves nothing
    store, ws, stats = open_training_data(cfg, data)
    cfg = sync_with_store(cfg, store)
    torch.manual_seed(cfg.train.seed)
    policy = build_run_policy(cfg, stats, store)
    needed = [k for k in _policy_keys(policy, cfg) if k not in store.keys]
    if needed:
        raise ConfigError(f"{data}: the policy reads key(s) {needed}; the dataset has {sorted(store.keys)}")
    evaluate = evaluate if cfg.eval.task else None
    notes = []
    if evaluate is None:
        val = validation_windows(cfg, store)
        if val is not None:
            evaluate = HeldOutValidation(
                val,
                n_action_steps=cfg.data.n_action_steps,
                n_windows=cfg.eval.val_windows,
                batch_size=min(cfg.train.batch_size, 256),
                seed=cfg.train.seed,
                action_names=store.keys[K.ACTION].names,
            )
        elif cfg.data.val_ratio > 0:
            notes.append(f"{data} has {store.n_episodes} episode(s): none left to hold out for validation")
    check = getattr(evaluate, "check", None)
    if check is not None:
        check(policy)  # the policy must fit the evaluation task: refuse now, not after training
    loop = TrainingLoop(loop_config(cfg), out, resume=resume)
    proc = loop.process
    policy = policy.to(proc.device)
    if store.fps is None:
        notes.append(
            f"{data} records no fps; the checkpoint keeps policy.fps={getattr(cfg.policy, 'fps', None)}"
        )
    if cfg.train.feature_cache:
        from vlaflow.train.feature_cache import attach_feature_cache

        for info in attach_feature_cache(
            policy, store, ws, cfg.train.feature_cache_dir or None, progress=cfg.train.progress and proc.main
        ):
            if proc.main:
                how = "built" if info["built"] else "reused"
                shape = tuple(info["shape"])
                secs, where = info["seconds"], info["path"]
                print(f"feature cache {how}: {info['image_key']} {shape} in {secs:.1f} s ({where})")
    _, note = final_episodes(cfg)
    if note and cfg.eval.task and evaluate is not None and cfg.train.eval_at_end:  # (rollouts only)
        notes.append(note)
    for n in notes if proc.main else []:
        print(f"note: {n}")
    objective = BehaviourCloning(
        policy,
        ws,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=proc.rank,
        world=proc.world,
        start_fraction=cfg.data.start_fraction,
        start_steps=cfg.data.start_steps,
    )
    meta = RunMeta(
        config=cfg.to_dict(),
        resumable=RESUMABLE_CHANGES,
        data=_data_fingerprint(store, ws),
        title=cfg.name,
        provenance=provenance.invocation(data),
        upgrade=_resume_upgrade(cfg),
    )
    return loop.run(objective, evaluate=evaluate, meta=meta)


def steps_for_budget(
    cfg: RunConfig, data: str | Path, minutes: float, scratch: Path, n: int = 20
) -> tuple[int, float]:
    """(steps that fit ``minutes`` of training, samples/s) from a short timing run of ``cfg`` in ``scratch``.

    Lets a wall-time-bounded run (the demo, the benchmarks) set ``train.steps`` so that the cosine schedule
    ends at the budget instead of being cut off half-way; ``train.max_minutes`` remains the hard stop.
    """
    import shutil

    from vlaflow.train.config import apply_overrides

    probe = apply_overrides(
        cfg,
        [
            f"train.steps={n}",
            "train.ckpt_every=0",
            "train.log_every=0",
            "eval.task=",
            "train.progress=false",
            "train.keep_step_ckpts=false",
            "train.max_minutes=0",
        ],
    )
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        res = train(probe, data, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # the first steps include one-off costs; ~3% of the budget goes to checkpoints and logging
    steps_per_s = res.step / max(res.train_seconds, 1e-9)
    return max(1, int(steps_per_s * minutes * 60 * 0.97)), res.samples_per_s
