"""``vlaflow train`` and ``vlaflow demo``, and the rollout evaluator they hand to the training loop.

The training library (:mod:`vlaflow.train`) does not import the simulators; this module wires them in:
:func:`rollout_evaluator` turns a run config's ``eval`` section into the ``evaluate`` callable of
:func:`vlaflow.train.trainer.train`, and the demo collects its demonstrations with :mod:`vlaflow.sim`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vlaflow.atomic import OVERWRITE_HELP, check_destination, fresh_directory
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.train.config import EvalConfig, RunConfig


# ----------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class RolloutEvaluator:
    """Scores a policy by rollouts through the sim harness (:func:`vlaflow.sim.evaluate.evaluate`).

    With ``eval.n_workers > 1`` and a saved checkpoint, episodes run in that many worker processes (each
    loads the checkpoint); otherwise the in-memory policy runs in this process. ``sampler`` / ``num_steps``
    override the policy's inference sampler.
    """

    eval: EvalConfig  # task, obs mode, seeds, episode length, workers
    progress: bool = True  # progress bar over episodes
    sampler: str | None = None  # inference sampler override
    num_steps: int | None = None  # inference steps override

    def __call__(
        self, policy, *, n_episodes: int, out_dir: Path, video: bool = False, ckpt: Path | None = None
    ):
        """Returns {"score", "success_rate", "n_errors", "report"}."""
        from vlaflow.sim.evaluate import evaluate

        if self.eval.n_workers > 1 and ckpt is not None:
            import functools

            from vlaflow.policies.runtime import load_policy

            target = functools.partial(load_policy, str(ckpt), sampler=self.sampler, num_steps=self.num_steps)
            workers = self.eval.n_workers
        else:
            from vlaflow.policies.runtime import PolicyRuntime

            target, workers = PolicyRuntime(policy, sampler=self.sampler, num_steps=self.num_steps), 0
        report = evaluate(
            target,
            task=self.eval.task,
            workers=workers,
            out_dir=out_dir,
            n_episodes=n_episodes,
            start_seed=self.eval.seed_start,
            max_steps=self.eval.max_steps or None,
            videos=1 if video else 0,
            obs_mode=self.eval.obs_mode,
            progress=self.progress,
        )
        return _summary(report)

    def check(self, policy) -> None:
        """Refuse (before training) a policy whose obs keys/shapes or action dim do not fit every task of
        ``eval.task`` in its obs mode: building each task's env once is cheap next to a training run."""
        from vlaflow.sim.evaluate import _choose_obs_mode
        from vlaflow.sim.policies import check_compatible
        from vlaflow.sim.tasks import expand_tasks, make_env

        spec = policy.spec
        mode, render_size = _choose_obs_mode(self.eval.obs_mode, spec)
        kwargs = {"obs_mode": mode, **({"render_size": render_size} if render_size else {})}
        for t in expand_tasks(self.eval.task):
            env = make_env(t, **kwargs)
            try:
                task_spec = env.task_spec
            finally:
                env.close()
            try:
                check_compatible(spec, task_spec, "being trained")
            except VlaflowError as e:
                raise ConfigError(
                    f"eval.task={self.eval.task!r}: {e}\n(fix data.obs_keys / the store, choose another "
                    "eval.task, set eval.task= to train without rollouts, or drop the preset: --family "
                    f"{getattr(getattr(policy, 'config', None), 'family', 'diffusion')} infers the keys "
                    "from the store and scores held-out episodes instead)"
                ) from None


def rollout_evaluator(cfg: RunConfig, sampler: str | None = None, num_steps: int | None = None):
    """The evaluator of ``cfg.eval`` (None when the run asks for no rollouts: ``eval.task`` empty); an
    unknown ``eval.task`` is an error here, before any data is opened."""
    if not cfg.eval.task:
        return None
    from vlaflow.sim.tasks import expand_tasks

    try:
        expand_tasks(cfg.eval.task)
    except VlaflowError as e:
        raise ConfigError(f"eval.task: {e} (or eval.task= for no rollout evaluation)") from None
    return RolloutEvaluator(cfg.eval, progress=cfg.train.progress, sampler=sampler, num_steps=num_steps)


def evaluate_policy(
    policy,
    cfg: RunConfig,
    n_episodes: int,
    out_dir: Path,
    video: bool = False,
    ckpt: Path | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
) -> dict:
    """Rollout-evaluate ``policy`` on ``cfg.eval`` once (see :class:`RolloutEvaluator`)."""
    ev = RolloutEvaluator(cfg.eval, progress=cfg.train.progress, sampler=sampler, num_steps=num_steps)
    return ev(policy, n_episodes=n_episodes, out_dir=out_dir, video=video, ckpt=ckpt)


def _summary(report: dict) -> dict:
    agg = report.get("aggregate", report)
    n_err = len(report.get("errors", []) or [])
    if n_err:
        first = report["errors"][0]
        print(f"warning: {n_err} evaluation episode(s) failed; first: {first}")
    return {
        "score": float(agg.get("mean_score", math.nan)),
        "success_rate": agg.get("success_rate"),
        "n_errors": n_err,
        "report": report,
    }


# --------------------------------------------------------------------------------------------- train
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", help="named preset (see --list-presets); optional with --resume or --family"
    )
    parser.add_argument(
        "--family",
        choices=["diffusion", "flow", "ebt", "vla"],
        help="train this policy family on your own --data without a preset: observation keys, shapes, "
        "action dim and fps come from the store, a tenth of the episodes is held out and scored "
        "(validation loss, action errors, eval/step_N/actions.png) instead of sim rollouts",
    )
    parser.add_argument(
        "--config",
        help="a run config JSON file (e.g. an edited --print-config output) instead of --preset; "
        "FIELD=VALUE overrides still apply on top",
    )
    parser.add_argument(
        "--data",
        help="episode store to train on (path or fsspec URL); with --resume, default: the store the run "
        "recorded (its fingerprint is checked)",
    )
    parser.add_argument("--out", help="run directory (checkpoints, log.csv, curves.png, eval/)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from checkpoints/last (the newest intact step checkpoint if last "
        "is damaged); Ctrl-C (or SIGTERM) during training saves last first, so it can be resumed",
    )
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="FIELD=VALUE",
        help="override config fields by dotted name, e.g. train.steps=2000 policy.num_inference_steps=10",
    )


def resolve_run_config(
    preset: str | None,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    config: str | None = None,
    family: str | None = None,
    data: str | None = None,
):
    """Preset + overrides, a --config file + overrides, (with --resume and neither) the run's saved
    config + overrides, or (--family without a preset) a config inferred from the --data store +
    overrides."""
    from vlaflow.train.config import apply_overrides, upgrade_run_config_dict
    from vlaflow.train.presets import get_preset

    if preset and config:
        raise ConfigError("give --preset or --config, not both (overrides apply on top of either)")
    saved_run = resume and out is not None and (out / "run_config.json").exists()
    if preset:
        cfg = get_preset(preset)
    elif config:
        cfg = load_config_file(Path(config))
    elif saved_run:
        saved = json.loads((out / "run_config.json").read_text())
        cfg = RunConfig.from_dict(upgrade_run_config_dict(saved))
    elif family:
        if not data:
            raise ConfigError("--family needs --data STORE (its keys, shapes and fps make the config)")
        from vlaflow.data.store import EpisodeStore
        from vlaflow.train.owndata import own_data_config

        store = EpisodeStore.open(data)
        store.require_intact()
        cfg = own_data_config(family, store, str(data))
    else:
        raise ConfigError(
            "--preset, --config or --family is required (or --resume with an --out that holds "
            "run_config.json); --family diffusion|flow|ebt|vla trains on your own --data without a preset"
        )
    if family and cfg.family != family:
        raise ConfigError(
            f"--family {family} but the {'run' if saved_run and not preset else 'preset'} {cfg.name!r} is "
            f"a {cfg.family} policy; drop one of them"
        )
    return apply_overrides(cfg, overrides)


def load_config_file(path: Path) -> RunConfig:
    """A run config from JSON (the form --print-config writes); errors name the file."""
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a JSON object (a --print-config output)")
    try:
        return RunConfig.from_dict(doc)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None


def run_train(args: argparse.Namespace) -> int:
    if args.list_presets:
        from vlaflow.train.presets import PRESETS, describe

        for name in PRESETS:
            print(f"{name:32s} {describe(name)}")
        return 0
    out = Path(args.out) if args.out else None
    cfg = resolve_run_config(
        args.preset,
        list(args.overrides),
        out,
        args.resume,
        getattr(args, "config", None),
        family=getattr(args, "family", None),
        data=args.data,
    )
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if out is None or not (args.data or args.resume):
        raise ConfigError("--data STORE and --out RUN are required (--resume may omit --data)")
    # the one overwrite rule: never into the store; an existing run is the loop's (--resume) to judge, any
    # other non-empty directory is refused
    is_run = any((out / n).exists() for n in ("log.csv", "run_config.json", "checkpoints"))
    reusable = not out.exists() or is_run or (out.is_dir() and not any(out.iterdir()))
    check_destination(
        out,
        overwrite=False,
        exists_ok=reusable,
        sources={"--data": args.data} if args.data else {},
        what="--out",
        remedy="and is not a run directory that --resume could continue; choose another --out",
    )
    from vlaflow.train.trainer import train

    res = train(cfg, args.data or None, out, resume=args.resume, evaluate=rollout_evaluator(cfg))
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if res.stopped == "interrupted" else 0
    print(
        f"trained {res.step} steps ({res.stopped}) in {res.train_seconds / 60:.1f} min, "
        f"{res.samples_per_s:.0f} samples/s"
    )
    if res.stopped == "interrupted":
        print(f"interrupted: checkpoint saved at step {res.step}: {res.last_ckpt}")
        print(f"continue with: vlaflow train --out {out} --resume")
        return 130
    r = res.final_eval
    if r is not None and r.get("metrics"):  # held-out validation
        m, rep = r["metrics"], r.get("report", {})
        print(
            f"held-out validation ({rep.get('n_episodes')} episodes, {rep.get('n_windows')} windows): "
            + "  ".join(f"{k} {v:.4g}" for k, v in m.items())
        )
        if rep.get("plot"):
            print(f"held-out actions plot: {rep['plot']}")
    elif r is not None:
        print(f"final score {r['score']:.3f}  success rate {r['success_rate']}")
    if not res.best_ckpt:
        print("no best checkpoint (no evaluation)")
    elif r is not None and r.get("metrics"):  # validation scores by -action_mae_norm
        print(f"best checkpoint: {res.best_ckpt} (lowest held-out action_mae_norm {-res.best_score:.4g})")
    else:
        print(f"best checkpoint: {res.best_ckpt} (score {res.best_score:.4g})")
    print(f"last checkpoint: {res.last_ckpt}")
    print(f"log: {res.run_dir / 'log.csv'}   curves: {res.run_dir / 'curves.png'}")
    return 0


# --------------------------------------------------------------------------------------------- demo
DEMO_TASK = "pick_place"
DEMO_PRESET = "pick_place_lowdim_flow"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (demos, run, report)")
    parser.add_argument("--minutes", type=float, default=13.0, help="wall-time budget for the whole demo")
    parser.add_argument("--episodes", type=int, default=150, help="expert demonstrations to collect")
    parser.add_argument("--eval-episodes", type=int, default=30, help="rollouts of the final evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of collection and training")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="extra training overrides")


def run_demo(args: argparse.Namespace) -> int:
    """Collect scripted-expert demos, train DEMO_PRESET (low-dim flow) in the time left, evaluate, report."""
    t0 = time.perf_counter()
    out = Path(args.out)
    if args.minutes < 3:
        raise ConfigError(f"--minutes must be >= 3 (collect + train + evaluate), got {args.minutes}")
    with fresh_directory(out, overwrite=args.overwrite, what="demo directory"):
        return _run_demo(args, out, t0)


def _run_demo(args: argparse.Namespace, out: Path, t0: float) -> int:
    demos = out / "demos.zarr"
    print(f"[1/4] collecting {args.episodes} scripted-expert demonstrations of {DEMO_TASK!r} -> {demos}")
    n_ok = _collect_demos(demos, args.episodes, args.seed)
    t_collect = time.perf_counter() - t0
    print(f"      {n_ok} successful episodes in {t_collect / 60:.1f} min")

    from vlaflow.train.config import apply_overrides
    from vlaflow.train.presets import get_preset
    from vlaflow.train.trainer import steps_for_budget, train

    cfg = apply_overrides(
        get_preset(DEMO_PRESET),
        [f"train.seed={args.seed}", f"eval.final_episodes={args.eval_episodes}", *args.overrides],
    )
    # Budget: what is left after collection, minus rollouts (periodic + final) and start-up margins.
    n_evals = 3 if cfg.train.eval_every else 0
    eval_minutes = 0.03 * (args.eval_episodes + n_evals * cfg.train.eval_episodes) + 0.3
    train_minutes = args.minutes - (time.perf_counter() - t0) / 60 - eval_minutes - 0.6
    if train_minutes < 1:
        raise VlaflowError(
            f"collection took {t_collect / 60:.1f} min; too little of --minutes {args.minutes} left to train"
        )
    print(f"[2/4] timing {cfg.name} on this machine")
    steps, sps = steps_for_budget(cfg, demos, train_minutes, out / "calibration")
    train_minutes -= 0.25  # the timing run itself
    steps = max(100, int(steps * train_minutes / (train_minutes + 0.25)))
    every = -(-steps // (n_evals + 1)) if n_evals else 0  # ceil: the last periodic eval is not the final one
    cfg = apply_overrides(
        cfg, [f"train.steps={steps}", f"train.max_minutes={train_minutes:.2f}", f"train.eval_every={every}"]
    )
    print(f"[3/4] training for {steps} steps (~{sps:.0f} samples/s, budget {train_minutes:.1f} min)")
    res = train(cfg, demos, out / "run", evaluate=rollout_evaluator(cfg))
    ev = res.final_eval
    total = (time.perf_counter() - t0) / 60
    paths = _eval_paths(res)
    print(f"[4/4] evaluated {args.eval_episodes} rollouts (seeds {cfg.eval.seed_start}..)")
    summary = {
        "task": DEMO_TASK,
        "preset": cfg.name,
        "demos": n_ok,
        "train_steps": res.step,
        "train_minutes": round(res.train_seconds / 60, 2),
        "samples_per_s": round(res.samples_per_s, 1),
        "final_success_rate": ev["success_rate"] if ev else None,
        "final_score": ev["score"] if ev else None,
        "best_score": res.best_score,
        "evaluations": res.evals,
        "total_minutes": round(total, 2),
        "best_checkpoint": str(res.best_ckpt) if res.best_ckpt else None,
        **paths,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print()
    succ = summary["final_success_rate"]
    rate = "n/a" if succ is None else f"{100 * succ:.0f}%"
    print(
        f"{DEMO_TASK}: success rate {rate} over {args.eval_episodes} "
        f"rollouts of the final policy ({res.step} steps, {summary['train_minutes']:.1f} min of training, "
        f"{total:.1f} min in all)"
    )
    for k in ("report", "curves", "video"):
        print(f"  {k:8s} {paths.get(k)}")
    print(f"  policy   {res.last_ckpt}   (load with vlaflow.load_policy)")
    print(f"  summary  {out / 'demo_summary.json'}")
    return 0


def _eval_paths(res) -> dict:
    run = res.run_dir
    evals = sorted((run / "eval").glob("step_*")) if (run / "eval").exists() else []
    last = evals[-1] if evals else None
    video = None
    if last is not None:
        vids = sorted(last.rglob("*.mp4")) + sorted(last.rglob("*.gif"))
        video = str(vids[0]) if vids else None
    return {
        "report": str(last / "report.json") if last is not None and (last / "report.json").exists() else None,
        "curves": str(run / "curves.png") if (run / "curves.png").exists() else None,
        "video": video,
    }


def _collect_demos(dest: Path, n_episodes: int, seed: int) -> int:
    from vlaflow.sim.collect import collect

    res = collect(DEMO_TASK, n_episodes, str(dest), obs_mode="lowdim", seed=seed)
    return int(res.n_episodes)
