"""The training loop: AdamW + warm-up/cosine + EMA + clipping, rollout-selected checkpoints, DDP, resume.

One call, :func:`train`, runs a :class:`~vlaflow.train.config.RunConfig` on an episode store and writes::

    RUN/run_config.json         the resolved config (presets + overrides)
    RUN/log.csv, RUN/tb/        training rows every log_every steps and one row per rollout evaluation
    RUN/curves.png              loss and score against step
    RUN/checkpoints/last        newest checkpoint (resume point), step_NNNNNNN, best (by rollout score)
    RUN/eval/step_NNNNNNN/      the harness's report.json (and videos) of each evaluation

Under ``torchrun --nproc_per_node N`` every rank builds the same model (same seed) and takes its strided
share of the same global batch; DDP averages the gradients, so N ranks follow the single-process run up
to float summation order. Only rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vlaflow import keys as K
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.train import schedule as S
from vlaflow.train.config import RunConfig, config_diff
from vlaflow.train.runlog import RunLog, plot_curves
from vlaflow.train.state import (
    copy_checkpoint,
    load_optimizer_tensors,
    load_raw_weights,
    read_train_state,
    recover_checkpoint,
    save_training_checkpoint,
    write_state_json,
)

# Fields that may change when resuming (bookkeeping, not the maths of the run).
RESUMABLE_CHANGES = {
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
    "eval.n_workers",
    "eval.final_episodes",
}


class TrainingDiverged(VlaflowError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    step: int  # optimiser steps completed
    stopped: str  # "done", "time limit"
    last_ckpt: Path | None
    best_ckpt: Path | None
    best_score: float | None
    final_eval: dict | None
    samples_per_s: float  # training throughput of this invocation (global samples)
    train_seconds: float  # total training wall time including earlier resumed segments
    evals: list[dict] = field(default_factory=list)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _cpu_threads(requested: int, d: _Dist) -> int:
    """Intra-op threads: as asked, else all cores shared among the ranks -- but 1 on a machine whose cores
    are already busy, where OpenMP threads spin against other processes (measured 4-5x slower with 2
    threads than with 1 on a loaded 2-core machine)."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    n = max(1, cores // d.world)
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    if busy and n > 1:
        if d.main:
            print(
                f"note: load average >= {cores} cores; training with 1 torch thread (set train.num_threads)"
            )
        n = 1
    return n


def _resolve_device(name: str, d: _Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.world > 1:
        name = f"cuda:{d.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu")
    return torch.device(name)


def _policy_keys(policy, cfg: RunConfig) -> list[str]:
    spec = getattr(policy, "spec", None)
    keys = list(getattr(spec, "obs_keys", ()) or cfg.data.obs_keys)
    return keys


def open_training_data(cfg: RunConfig, data: str | Path):
    """(store, WindowSampler over the training episodes, stats); a missing key lists the store's keys."""
    from vlaflow.data.normalize import compute_stats
    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler, split_episodes

    store = EpisodeStore.open(data)
    needed = [*cfg.data.obs_keys, K.ACTION]
    missing = [k for k in needed if k not in store.keys]
    if missing:
        raise ConfigError(
            f"{data}: preset {cfg.name!r} needs key(s) {missing} that the dataset does not have; "
            f"the dataset has {sorted(store.keys)} (set data.obs_keys=... to choose others)"
        )
    if store.n_episodes < 1:
        raise ConfigError(f"{data}: the dataset has no finished episodes")
    n_eps = store.n_episodes if cfg.data.max_episodes == 0 else min(cfg.data.max_episodes, store.n_episodes)
    train_eps, _ = split_episodes(n_eps, val_ratio=cfg.data.val_ratio, seed=cfg.train.seed)
    ws = WindowSampler(store, cfg.data.obs_keys, cfg.data.n_obs_steps, cfg.data.horizon, episodes=train_eps)
    if len(ws) == 0:
        raise ConfigError(f"{data}: no training windows (episodes shorter than To={cfg.data.n_obs_steps})")
    stats = store.load_stats()
    if stats is None or any(k not in stats for k in needed):
        stats = compute_stats(store, needed)
    return store, ws, stats


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
    import dataclasses

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


class _LossModule(torch.nn.Module):
    """DDP needs gradients to flow through ``forward``; the policy's entry point is ``compute_loss``."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch):
        return self.policy.compute_loss(batch)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        if pm.requires_grad:
            pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
        else:
            pe.copy_(pm)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _make_batch(ws, idx: np.ndarray) -> dict:
    b = ws.get_batch(idx)
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}
    if ws.tasks:
        out["task"] = [ws.tasks[i] if 0 <= i < len(ws.tasks) else "" for i in b["task_index"].tolist()]
    return out


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
    """Rollout-evaluate through the sim harness (:func:`vlaflow.sim.evaluate.evaluate`) on ``cfg.eval``.

    With ``eval.n_workers > 1`` and a saved checkpoint ``ckpt``, episodes run in that many worker processes
    (each loads ``ckpt``); otherwise the in-memory ``policy`` runs in this process. ``sampler`` /
    ``num_steps`` override the policy's inference sampler.
    Returns {"score", "success_rate", "n_errors", "report"}.
    """
    from vlaflow.sim.evaluate import evaluate

    if cfg.eval.n_workers > 1 and ckpt is not None:
        import functools

        from vlaflow.policies.runtime import load_policy

        target = functools.partial(load_policy, str(ckpt), sampler=sampler, num_steps=num_steps)
        workers = cfg.eval.n_workers
    else:
        from vlaflow.policies.runtime import PolicyRuntime

        target, workers = PolicyRuntime(policy, sampler=sampler, num_steps=num_steps), 0
    report = evaluate(
        target,
        task=cfg.eval.task,
        workers=workers,
        out_dir=out_dir,
        n_episodes=n_episodes,
        start_seed=cfg.eval.seed_start,
        max_steps=cfg.eval.max_steps or None,
        videos=1 if video else 0,
        obs_mode=cfg.eval.obs_mode,
        progress=cfg.train.progress,
    )
    return _summary(report)


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


def _check_resume(cfg: RunConfig, saved: dict) -> None:
    diffs = config_diff(saved, cfg.to_dict())
    bad = [d for d in diffs if d.split(":")[0] not in RESUMABLE_CHANGES and not d.startswith("name:")]
    if bad:
        raise ConfigError(
            "cannot resume: the config differs from the run's saved config in fields that change the "
            "training itself:\n  " + "\n  ".join(bad)
        )


def _data_fingerprint(store, ws) -> dict:
    return {"n_episodes": int(store.n_episodes), "n_steps": int(store.n_steps), "n_windows": len(ws)}


def train(cfg: RunConfig, data: str | Path, out: str | Path, *, resume: bool = False) -> TrainResult:
    """Train ``cfg`` on the store at ``data`` into run directory ``out`` (see the module docstring)."""
    t_cfg = cfg.train
    dist_info = _init_distributed(t_cfg.device)
    device = _resolve_device(t_cfg.device, dist_info)
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(t_cfg.num_threads, dist_info))
    run_dir = Path(out)
    ckpt_dir = run_dir / "checkpoints"
    last_dir = ckpt_dir / "last"
    if dist_info.main:
        if run_dir.exists() and not resume and (last_dir.exists() or (run_dir / "log.csv").exists()):
            raise VlaflowError(
                f"{run_dir}: a run already exists here; pass --resume to continue it or use a new --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)

    store, ws, stats = open_training_data(cfg, data)
    torch.manual_seed(t_cfg.seed)
    policy = build_run_policy(cfg, stats, store).to(device)
    needed = [k for k in _policy_keys(policy, cfg) if k not in store.keys]
    if needed:
        raise ConfigError(f"{data}: the policy reads key(s) {needed}; the dataset has {sorted(store.keys)}")
    ema = copy.deepcopy(policy).eval() if t_cfg.ema else None
    if ema is not None:
        ema.requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t_cfg.lr, betas=t_cfg.betas, weight_decay=t_cfg.weight_decay)

    start_step, best_score, best_step, train_seconds, evals = 0, None, None, 0.0, []
    fingerprint = _data_fingerprint(store, ws)
    if resume:
        if dist_info.main:
            recover_checkpoint(last_dir)
        if dist_info.world > 1:
            dist.barrier()
        if not (last_dir / "train_state.json").exists():
            raise VlaflowError(f"{run_dir}: nothing to resume (no {last_dir}/train_state.json)")
        state, tensors = read_train_state(last_dir)
        _check_resume(cfg, state["run_config"])
        if state.get("data") != fingerprint:
            raise ConfigError(
                f"cannot resume: the dataset differs: saved {state.get('data')}, now {fingerprint}"
            )
        load_raw_weights(policy, tensors, last_dir)
        load_optimizer_tensors(opt, {k: v.to(device) for k, v in tensors.items() if k.startswith("optim/")})
        if ema is not None:
            from vlaflow.policies import load_checkpoint

            ema.load_state_dict(load_checkpoint(last_dir).state_dict())
        start_step = int(state["step"])
        best_score, best_step = state.get("best_score"), state.get("best_step")
        train_seconds = float(state.get("train_seconds", 0.0))
        evals = list(state.get("evals", []))

    module = _LossModule(policy)
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)

    log = RunLog(run_dir, resume_step=start_step if resume else None) if dist_info.main else None
    if dist_info.main:
        (run_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def state_json(step: int) -> dict:
        return {
            "step": step,
            "seed": t_cfg.seed,
            "best_score": best_score,
            "best_step": best_step,
            "train_seconds": train_seconds,
            "world_size": dist_info.world,
            "data": fingerprint,
            "evals": evals,
            "run_config": cfg.to_dict(),
        }

    def save(step: int) -> Path:
        deploy = ema if ema is not None else policy
        p = save_training_checkpoint(last_dir, deploy, policy, opt, state_json(step))
        if t_cfg.keep_step_ckpts:
            copy_checkpoint(p, ckpt_dir / f"step_{step:07d}")
        return p

    def run_eval(step: int, n_episodes: int, video: bool) -> bool:
        """Evaluate the checkpoint just saved in checkpoints/last; True if it is the new best."""
        nonlocal best_score, best_step, final_eval
        pol = ema if ema is not None else policy
        pol.eval()
        out_dir = run_dir / "eval" / f"step_{step:07d}"
        res = evaluate_policy(pol, cfg, n_episodes, out_dir, video=video, ckpt=last_dir)
        policy.train()
        final_eval = res
        row = {"step": step, "kind": "eval", "score": res["score"], "success_rate": res["success_rate"]}
        evals.append({k: v for k, v in row.items() if k != "kind"} | {"n_episodes": n_episodes})
        log.log(row)
        new_best = best_score is None or res["score"] > best_score
        if new_best:
            best_score, best_step = res["score"], step
        write_state_json(last_dir, state_json(step))  # record the evaluation in the resume state
        if new_best:
            copy_checkpoint(last_dir, ckpt_dir / "best")
        plot_curves(log.rows, run_dir / "curves.png", title=cfg.name)
        return new_best

    sampler_threads = t_cfg.num_workers
    total = t_cfg.steps
    t_start = time.perf_counter()
    eval_seconds = 0.0  # rollout time is not training time (max_minutes, samples/s)
    seg_start_seconds = train_seconds
    samples = 0
    stopped = "done"
    step = start_step
    final_eval = None
    last_saved = start_step if resume else None
    pbar = None
    if dist_info.main and t_cfg.progress and start_step < total:
        from tqdm.auto import tqdm

        pbar = tqdm(
            total=total, initial=start_step, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True
        )

    def load(s: int) -> dict:
        idx = S.shard(
            S.batch_indices(t_cfg.seed, s, len(ws), t_cfg.batch_size), dist_info.rank, dist_info.world
        )
        return _make_batch(ws, idx)

    policy.train()
    executor = ThreadPoolExecutor(sampler_threads) if sampler_threads > 0 else None
    ahead: deque = deque()
    try:
        if executor is not None:
            for s in range(start_step, min(start_step + 2 * sampler_threads, total)):
                ahead.append(executor.submit(load, s))
        t_log = time.perf_counter()
        samples_since_log = 0
        while step < total:
            if executor is not None:
                batch = ahead.popleft().result()
                nxt = step + len(ahead) + 1
                if nxt < total:
                    ahead.append(executor.submit(load, nxt))
            else:
                batch = load(step)
            batch = _to_device(batch, device)
            torch.manual_seed(S.step_seed(t_cfg.seed, step, dist_info.rank))
            lr = S.lr_at(step, t_cfg.lr, t_cfg.warmup_steps, total, t_cfg.schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, metrics = module(batch)
            finite = torch.isfinite(loss.detach()).float()
            if dist_info.world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                raise TrainingDiverged(_diverged_msg("loss", step, last_saved, last_dir))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t_cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip)
            else:
                gnorm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params if p.grad is not None))
            if not torch.isfinite(gnorm):
                raise TrainingDiverged(_diverged_msg("gradient norm", step, last_saved, last_dir))
            opt.step()
            decay = S.ema_decay(step, t_cfg.ema_power, t_cfg.ema_max, t_cfg.ema_min)
            if ema is not None:
                _ema_update(ema, policy, decay)
            step += 1
            samples += t_cfg.batch_size
            samples_since_log += t_cfg.batch_size
            train_seconds = seg_start_seconds + (time.perf_counter() - t_start) - eval_seconds
            time_up = t_cfg.max_minutes > 0 and train_seconds >= 60 * t_cfg.max_minutes
            if dist_info.world > 1 and t_cfg.max_minutes > 0:
                flag = torch.tensor([1.0 if time_up else 0.0])
                dist.broadcast(flag, 0)
                time_up = bool(flag.item())
            if dist_info.main:
                loss_v = float(loss.detach())
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", refresh=False)
                if t_cfg.log_every and (step % t_cfg.log_every == 0 or step == total):
                    now = time.perf_counter()
                    row = {
                        "step": step,
                        "kind": "train",
                        "loss": loss_v,
                        "lr": lr,
                        "grad_norm": float(gnorm),
                        "ema_decay": decay,
                        "samples_per_s": samples_since_log / max(now - t_log, 1e-9),
                        "elapsed_s": train_seconds,
                    }
                    row.update(
                        {k: float(v) for k, v in (metrics or {}).items() if k != "loss" and _scalar(v)}
                    )
                    log.log(row)
                    t_log, samples_since_log = now, 0
            do_eval = (
                bool(cfg.eval.task) and t_cfg.eval_every > 0 and step % t_cfg.eval_every == 0 and step < total
            )
            do_ckpt = (t_cfg.ckpt_every and step % t_cfg.ckpt_every == 0) or step == total or time_up
            if dist_info.main and (do_eval or do_ckpt):
                if pbar is not None:
                    pbar.clear()
                save(step)
                last_saved = step
                if do_eval:
                    t_ev = time.perf_counter()
                    run_eval(step, t_cfg.eval_episodes, video=False)
                    eval_seconds += time.perf_counter() - t_ev
                t_log = time.perf_counter()  # throughput rows measure training steps only
                samples_since_log = 0
            if dist_info.world > 1 and (do_eval or do_ckpt):
                dist.barrier()
            if time_up:
                stopped = "time limit"
                break
    except BaseException:
        if log is not None:
            log.close()
        raise
    finally:
        if pbar is not None:
            pbar.close()
        if executor is not None:
            for f in ahead:
                f.cancel()
            executor.shutdown(wait=True)
    elapsed = time.perf_counter() - t_start - eval_seconds
    best_dir = ckpt_dir / "best"
    if dist_info.main:
        try:
            if cfg.eval.task and t_cfg.eval_at_end:
                if last_saved != step:
                    save(step)
                run_eval(step, cfg.eval.final_episodes or t_cfg.eval_episodes, video=True)
            plot_curves(log.rows, run_dir / "curves.png", title=cfg.name)
        finally:
            log.close()
    if dist_info.world > 1:
        _check_replicas_agree(policy)
    return TrainResult(
        run_dir=run_dir,
        step=step,
        stopped=stopped,
        last_ckpt=last_dir if last_dir.exists() else None,
        best_ckpt=best_dir if best_dir.exists() else None,
        best_score=best_score,
        final_eval=final_eval,
        samples_per_s=samples / max(elapsed, 1e-9),
        train_seconds=train_seconds,
        evals=evals,
    )


def _check_replicas_agree(policy) -> None:
    """DDP ranks must hold identical weights after training; a silent desync would be a wrong model."""
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in policy.parameters()]).sum().reshape(1)
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if float(hi - lo) > 1e-6 * max(1.0, abs(float(total))):
        raise VlaflowError(
            f"DDP ranks disagree on the weights after training (sum {float(lo)} vs {float(hi)})"
        )


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


def _scalar(v) -> bool:
    if torch.is_tensor(v):
        return v.numel() == 1
    return isinstance(v, (int, float))


def _diverged_msg(what: str, step: int, last_saved: int | None, last_dir: Path) -> str:
    keep = (
        f"the last good checkpoint is {last_dir} (step {last_saved})"
        if last_saved is not None
        else "no checkpoint had been written yet"
    )
    return (
        f"the training {what} became NaN/inf at step {step}; training stopped, {keep}. "
        "Lower train.lr, set train.grad_clip, or check the data for extreme values."
    )
