"""The one training loop: AdamW + schedule + EMA + clipping, DDP, exact resume, checkpoints, logs, evaluation.

:class:`TrainingLoop` takes the optimiser steps; an :class:`~vlaflow.train.objective.Objective`
says what a step learns. Behaviour cloning (:mod:`~vlaflow.train.objectives.bc`, what ``vlaflow train``
runs) and one-step distillation (:mod:`~vlaflow.train.objectives.distill`, ``vlaflow distill``) are two
objectives on this loop, and so will be the RL and world-model losses: there is no second loop.

One step: ``batch = objective.batch(step)`` (prepared ahead on a background thread when the objective
allows), the step's torch seed from (seed, step, rank), the scheduled learning rate, ``loss, metrics =
objective.loss(batch)`` (through DDP under torchrun; under autocast with ``amp``, over ``grad_accum``
micro-batches, compiled with ``compile``: :mod:`vlaflow.train.accel`), backward, the global gradient
norm clipped, one finiteness check of loss and norm (NaN/inf stops the run, the last checkpoint stays
good), AdamW, the EMA (``torch._foreach`` ops), ``objective.after_step(step)``. Every ``log_every``
steps a row goes to ``log.csv`` / TensorBoard; losses are read back from the device only then (and for
the progress bar), so a step costs no Python beyond its tensor ops. With a run directory the loop writes::

    RUN/run_config.json         the run's config (what resume compares against)
    RUN/log.csv, RUN/tb/        training rows every log_every steps and one row per evaluation (rollouts, or
                                held-out validation); wandb/ or mlruns/ with train.logger (:mod:`.trackers`)
    RUN/curves.png              loss and score against step
    RUN/checkpoints/last        newest checkpoint (resume point), step_NNNNNNN, best (by rollout score)
    RUN/eval/step_NNNNNNN/      the evaluator's report (and videos) of each evaluation

Everything a step draws at random is a function of (seed, step) and the learning rate of the step, so a
run killed with SIGKILL and resumed from ``checkpoints/last`` ends bit-identical to an uninterrupted one.
Under ``torchrun --nproc_per_node N`` every rank builds the same module and takes its share of the batch;
DDP averages the gradients. Only rank 0 logs, evaluates and saves. Rollout scoring comes in as an
``evaluate`` callable (:class:`Evaluator`, built by the CLI from the sim harness): this layer does not
import the simulators.

How the next objectives plug in (one class each, this loop unchanged)
--------------------------------------------------------------------
* **DPPO** (PPO over the denoising chain): ``module = nn.ModuleDict(actor=policy, value=value_net)``,
  ``deploy(m) = m["actor"]``, ``param_groups`` gives the critic its own ``lr_scale``, ``prefetch =
  "none"``. ``batch(step)`` pops the next PPO minibatch; when the queue is empty it first collects
  rollouts through the env protocol (``vlaflow.interfaces.Env``: a sim task or the imagined env, handed in
  by the CLI) with the runtime recording each denoising step (``InferResult.extras`` chain: x_t, t,
  x_next and old log-probs of the last K' steps), computes GAE, and queues ``update_epochs`` shuffled
  passes. ``loss(mb)`` re-scores the recorded steps with ``reverse_step`` under the current weights -> the
  PPO-clip ratio, plus value loss; metrics approx_kl / clipfrac. One loop step = one minibatch update.
* **RL-100**: stage 2 is two objectives run in turn on this loop -- an IQL critic (expectile 0.7) on the
  offline windows (``after_step`` Polyak-updates the target Q), then PPO-clip at every denoising step of a
  K-step stochastic DDIM chain with the critic's advantage (``batch`` = windows + chains sampled for
  them). The offline-evaluation gate and collect -> merge -> retrain are a driver around ``run()`` calls
  in the CLI layer (it owns the envs); stage 3 online is the DPPO objective; the one-step head is the
  distillation objective.
* **DSRL**: ``module`` = a noise actor + SAC critics (the denoiser frozen, outside the trained params),
  ``batch`` = env steps with the actor's noise appended to a replay buffer + a sampled minibatch,
  ``after_step`` updates the target critics, ``extra_state`` holds the buffer for an exact resume.
* **World model** (World4RL / DIAMOND): the denoising loss with future observations as the target and
  ``encode(obs window, two-hot actions)`` as condition, plus reward/success/termination heads:
  ``prefetch = "parallel"`` over windows exactly as behaviour cloning; ``deploy`` = the world model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist

import vlaflow.train.provenance as P
import vlaflow.train.schedule as S
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.train.accel import Compiled, Precision, split_batch
from vlaflow.train.loop_parts import (  # noqa: F401  (_Ema, clip_grad_norm: used by benchmarks)
    _check_replicas_agree,
    _check_same_data,
    _diverged_msg,
    _Ema,
    _scalar,
    _StopFlag,
    check_resume,
    clip_grad_norm,
)
from vlaflow.train.objective import Objective
from vlaflow.train.process import BatchPipeline, Process, start_process, to_device
from vlaflow.train.runlog import RunLog, plot_curves
from vlaflow.train.state import (
    clean_leftovers,
    copy_checkpoint,
    find_resume_point,
    load_optimizer_tensors,
    load_raw_weights,
    save_training_checkpoint,
    write_state_json,
)


class TrainingDiverged(VlaflowError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


class Evaluator(Protocol):
    """Rollout scoring of a policy, built by the CLI (e.g. from :func:`vlaflow.sim.evaluate.evaluate`).

    ``ckpt`` is the checkpoint just saved from ``policy`` (for worker processes that load it).
    Returns at least {"score": float, "success_rate": float | None}. An evaluator may also have a
    ``check(policy)`` method: :func:`vlaflow.train.trainer.train` calls it before the first step, so a
    policy that cannot run on the evaluation task is refused before any training, not after it.
    """

    def __call__(
        self, policy: torch.nn.Module, *, n_episodes: int, out_dir: Path, video: bool, ckpt: Path | None
    ) -> dict: ...


@dataclass(frozen=True)
class LoopConfig:
    """How the loop takes its steps (a RunConfig's ``train`` section maps onto it; so do distill's flags)."""

    steps: int = 1000  # optimiser steps (0 = until max_seconds); the schedule spans them
    batch_size: int = 1  # samples per step over all ranks (for the samples/s rows only)
    lr: float = 1e-4  # peak AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 1e-6  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warm-up from 0 to lr ("cosine" / "constant")
    # "cosine": warm-up, then half a cosine to 0 over `steps`; "constant"; "budget_cosine": cosine to 0
    # over the fraction of the budget spent, steps or max_seconds, whichever runs out first
    schedule: Literal["cosine", "constant", "budget_cosine"] = "cosine"
    ema: bool = False  # keep an EMA of the module (what checkpoints deploy)
    ema_power: float = 0.75  # EMA warm-up: decay = 1 - (1 + step) ** -power
    ema_max: float = 0.9999  # EMA decay ceiling
    ema_min: float = 0.0  # EMA decay floor
    grad_clip: float = 0.0  # max global gradient norm (0 = no clipping)
    fused_adamw: bool = False  # AdamW's fused kernel (faster; last-bit float differences from foreach)
    seed: int = 0  # the per-step torch seed is derived from (seed, step, rank)
    workers: int = 1  # background batch threads (0 = inline); 2 x workers batches are kept ready
    max_seconds: float = 0.0  # stop after this much training wall time (0 = no limit)
    log_every: int = 0  # CSV/TensorBoard row every N steps (0 = none)
    ckpt_every: int = 0  # checkpoints/last every N steps (and at the end, and at the time limit)
    keep_step_ckpts: bool = False  # also keep checkpoints/step_NNNNNNN at every save
    eval_every: int = 0  # evaluate every N steps (with an evaluator; 0 = only at the end)
    eval_episodes: int = 10  # rollouts per periodic evaluation
    final_episodes: int = 0  # rollouts of the final evaluation (0 = eval_episodes)
    eval_at_end: bool = True  # evaluate after the last step (with an evaluator)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    num_threads: int = 0  # torch intra-op threads (0 = all cores / world size, 1 on a busy machine)
    progress: bool = True  # tqdm bar on rank 0
    desc: str = "train"  # the progress bar's label
    logger: str = "tensorboard"  # trackers beside log.csv: tensorboard|wandb|mlflow|none, or a comma list
    amp: str = "off"  # autocast of the loss: off|bf16|fp16 (fp16 with a GradScaler); see vlaflow.train.accel
    grad_accum: int = 1  # micro-batches per step (the step's batch cut in equal parts, gradients summed)
    compile: bool = False  # torch.compile the objective's loss call (falls back to eager with a note)

    def __post_init__(self):
        if self.steps < 0 or (self.steps == 0 and self.max_seconds <= 0):
            raise ConfigError(f"give the loop a budget: steps >= 1 or max_seconds > 0 (got {self.steps})")
        if self.schedule not in ("cosine", "constant", "budget_cosine"):
            raise ConfigError(f"schedule must be cosine|constant|budget_cosine, got {self.schedule!r}")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ConfigError(f"amp must be off|bf16|fp16, got {self.amp!r}")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path | None
    step: int  # optimiser steps completed
    stopped: str  # "done", "time limit", "interrupted" (SIGINT/SIGTERM: checkpoints/last saved at `step`)
    last_ckpt: Path | None
    best_ckpt: Path | None
    best_score: float | None
    final_eval: dict | None
    samples_per_s: float  # training throughput of this invocation (global samples)
    train_seconds: float  # total training wall time including earlier resumed segments
    evals: list[dict] = field(default_factory=list)
    recent_losses: list[float] = field(default_factory=list)  # the last (up to 50) step losses


@dataclass(frozen=True)
class RunMeta:
    """What a run directory records to decide whether a resume continues the same run."""

    config: dict  # written to run_config.json and train_state.json; compared field by field on resume
    resumable: frozenset[str] = frozenset()  # dotted fields that may change on resume (bookkeeping)
    data: dict = field(default_factory=dict)  # fingerprint of the data; must match on resume
    title: str = ""  # curves.png title
    provenance: dict = field(default_factory=dict)  # this invocation (command, data path, versions, commit)
    upgrade: Callable[[dict], dict] | None = None  # brings a saved config to today's form before comparing


class _ObjectiveModule(torch.nn.Module):
    """DDP needs gradients to flow through a module's ``forward``; the objective's entry point is ``loss``."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.trained = objective.module
        self._loss = objective.loss

    def forward(self, batch):
        return self._loss(batch)


class TrainingLoop:
    """Set up the process (ranks, device, threads) and the run directory; :meth:`run` trains an objective.

    Build the objective between the two (it needs :attr:`process` for its device and batch shard).
    """

    def __init__(self, cfg: LoopConfig, run_dir: str | Path | None = None, *, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        self.process: Process = start_process(cfg.device, cfg.num_threads)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and self.process.main:
            last = self.run_dir / "checkpoints" / "last"
            if (
                self.run_dir.exists()
                and not resume
                and (last.exists() or (self.run_dir / "log.csv").exists())
            ):
                raise VlaflowError(
                    f"{self.run_dir}: a run already exists here; pass --resume to continue it or use a new "
                    "--out"
                )
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.run_dir is None and resume:
            raise ConfigError("resume needs a run directory")

    @property
    def device(self) -> torch.device:
        return self.process.device

    def run(self, objective: Objective, *, evaluate: Evaluator | None = None, meta: RunMeta | None = None):
        return _Run(self, objective, evaluate, meta or RunMeta(config={})).train()


class _Run:
    """One invocation of :meth:`TrainingLoop.run`: the optimiser, resume state and bookkeeping."""

    def __init__(self, loop: TrainingLoop, objective: Objective, evaluate: Evaluator | None, meta: RunMeta):
        self.cfg, self.proc, self.obj, self.evaluate, self.meta = (
            loop.cfg,
            loop.process,
            objective,
            evaluate,
            meta,
        )
        self.run_dir, self.resume = loop.run_dir, loop.resume
        self.ckpt_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.last_dir = self.ckpt_dir / "last" if self.ckpt_dir is not None else None
        module = objective.module
        self.ema = copy.deepcopy(module).eval() if self.cfg.ema else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        groups = [dict(g) for g in objective.param_groups()]
        self.lr_scales = [float(g.pop("lr_scale", 1.0)) for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        # foreach: the same arithmetic as the per-tensor default, without its Python loop over tensors
        kind = {"fused": True} if self.cfg.fused_adamw else {"foreach": True}
        c = self.cfg
        self.opt = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay, **kind)
        self.prec = Precision(c.amp, loop.process.device)
        self.start_step, self.best_score, self.best_step = 0, None, None
        self.train_seconds, self.evals, self.final_eval = 0.0, [], None
        self.log = None

    # -- resume and checkpoints ---------------------------------------------------------------------
    def _load(self) -> None:
        proc = self.proc
        if proc.main:
            for p in clean_leftovers(self.ckpt_dir):
                print(f"removed {p} (left by a kill inside a checkpoint save)")
        if proc.world > 1:
            dist.barrier()
        where, state, tensors, notes = find_resume_point(self.ckpt_dir)
        exact = any(k.startswith("model/") for k in tensors)
        if notes and proc.main:
            print(f"warning: resuming from {where.name}, not last ({'; '.join(notes)})")
        saved = state["run_config"]
        if self.meta.upgrade is not None:
            saved = self.meta.upgrade(saved)
        check_resume(self.meta.config, saved, self.meta.resumable)
        _check_same_data(state, self.meta)
        if exact:
            load_raw_weights(self.obj.module, tensors, where)
            load_optimizer_tensors(
                self.opt, {k: v.to(proc.device) for k, v in tensors.items() if k.startswith("optim/")}
            )
        else:  # a shareable step checkpoint: its (EMA) weights restart training, AdamW moments from zero
            if self.obj.deploy(self.obj.module) is not self.obj.module:
                raise VlaflowError(
                    f"{where}: holds only the deployed policy, not the whole trained module of this "
                    "objective; it cannot be resumed from"
                )
            from vlaflow.policies import load_checkpoint

            self.obj.module.load_state_dict(load_checkpoint(where).state_dict())
            if proc.main:
                print(
                    f"warning: {where.name} has no optimizer state: training continues from its weights "
                    "with fresh AdamW moments (not bit-identical to an uninterrupted run)"
                )
        if self.ema is not None:
            ema_t = {k[len("ema/") :]: v for k, v in tensors.items() if k.startswith("ema/")}
            if not ema_t:  # the module is the deployed policy: its checkpoint files hold the EMA weights
                from vlaflow.policies import load_checkpoint

                ema_t = load_checkpoint(where).state_dict()
            self.ema.load_state_dict(ema_t)
        self.prec.load_state(tensors)
        prefix = "objective/"
        self.obj.load_extra_state(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, where
        )
        self.start_step = int(state["step"])
        self.best_score, self.best_step = state.get("best_score"), state.get("best_step")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.evals = list(state.get("evals", []))

    def _state_json(self, step: int) -> dict:
        return {
            "step": step,
            "seed": self.cfg.seed,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "train_seconds": self.train_seconds,
            "world_size": self.proc.world,
            "data": self.meta.data,
            "evals": self.evals,
            "run_config": self.meta.config,
            "provenance": self.meta.provenance,
        }

    def _save(self, step: int) -> Path:
        source = self.ema if self.ema is not None else self.obj.module
        deploy = self.obj.deploy(source)
        extra = {f"objective/{k}": v for k, v in self.obj.extra_state().items()} | self.prec.state()
        if self.ema is not None and deploy is not self.ema:  # the policy files hold only part of the EMA
            extra.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        p = save_training_checkpoint(
            self.last_dir, deploy, self.obj.module, self.opt, self._state_json(step), extra
        )
        if self.cfg.keep_step_ckpts:  # shareable: no optimizer state (only last resumes exactly)
            copy_checkpoint(p, self.ckpt_dir / f"step_{step:07d}")
        return p

    def _eval(self, step: int, n_episodes: int, video: bool) -> None:
        """Evaluate the checkpoint just saved in checkpoints/last; a new best is copied to .../best."""
        source = self.ema if self.ema is not None else self.obj.module
        source.eval()
        out_dir = self.run_dir / "eval" / f"step_{step:07d}"
        res = self.evaluate(
            self.obj.deploy(source), n_episodes=n_episodes, out_dir=out_dir, video=video, ckpt=self.last_dir
        )
        self.obj.module.train()
        self.final_eval = res
        row = {"step": step, "kind": "eval", "score": res["score"], "success_rate": res["success_rate"]}
        # an evaluator's own scalars (held-out validation: val_loss, action errors) join the row
        row.update({k: float(v) for k, v in (res.get("metrics") or {}).items() if _scalar(v)})
        self.evals.append({k: v for k, v in row.items() if k != "kind"} | {"n_episodes": n_episodes})
        self.log.log(row)
        new_best = self.best_score is None or res["score"] > self.best_score
        if new_best:
            self.best_score, self.best_step = res["score"], step
        write_state_json(self.last_dir, self._state_json(step))  # record the evaluation in the resume state
        if new_best:
            copy_checkpoint(self.last_dir, self.ckpt_dir / "best")
        curves = plot_curves(self.log.rows, self.run_dir / "curves.png", title=self.meta.title)
        self.log.log_image("curves", curves, step)

    def _forward_backward(self, call: Callable, ddp, batch) -> tuple[torch.Tensor, dict]:
        """Loss and gradients of one step: ``grad_accum`` micro-batches under autocast, each adding
        ``loss / N`` (DDP all-reduces only on the last); returns the step's mean loss, the gradients in
        true units (fp16: unscaled, ready for clipping)."""
        n = self.cfg.grad_accum
        parts = split_batch(batch, n)
        total, metrics = None, {}
        for i, mb in enumerate(parts):
            sync = contextlib.nullcontext() if ddp is None or i == n - 1 else ddp.no_sync()
            with sync:
                with self.prec.autocast():
                    loss, m = call(mb)
                loss = loss.float()
                self.prec.backward(loss / n if n > 1 else loss)
            total = loss.detach() / n if total is None else total + loss.detach() / n
            for k, v in (m or {}).items():  # the step's metrics: means over the micro-batches
                if _scalar(v):
                    metrics[k] = metrics.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / n
        self.prec.unscale(self.opt)
        return (loss if n == 1 else total), (m if n == 1 else metrics)

    def _lr(self, step: int, train_seconds: float) -> float:
        c = self.cfg
        if c.schedule == "budget_cosine":
            frac = max(
                step / c.steps if c.steps else 0.0,
                train_seconds / c.max_seconds if c.max_seconds > 0 else 0.0,
            )
            return float(c.lr * 0.5 * (1.0 + np.cos(np.pi * min(frac, 1.0))))
        return S.lr_at(step, c.lr, c.warmup_steps, c.steps, c.schedule)

    # -- the steps ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        c, proc, obj = self.cfg, self.proc, self.obj
        main, writes = proc.main, proc.main and self.run_dir is not None
        if self.resume:
            self._load()
        start = self.start_step
        call: Callable = obj.loss
        ddp = None
        if proc.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            call = ddp = DDP(
                _ObjectiveModule(obj), device_ids=[proc.device.index] if proc.device.type == "cuda" else None
            )
        call = Compiled(call, c.compile, proc.main)
        if writes:
            self.log = RunLog(
                self.run_dir,
                resume_step=start if self.resume else None,
                logger=c.logger,
                config=self.meta.config,
            )
            (self.run_dir / "run_config.json").write_text(json.dumps(self.meta.config, indent=1))
            if self.meta.provenance:
                P.append(
                    self.run_dir,
                    {**self.meta.provenance, "resumed_from_step": start if self.resume else None},
                )
        ema = _Ema(self.ema, obj.module) if self.ema is not None else None
        total, max_s = c.steps, c.max_seconds
        t_start = time.perf_counter()
        eval_seconds = 0.0  # rollout time is not training time (max_seconds, samples/s)
        seg_start_seconds = self.train_seconds
        samples, stopped, step = 0, "done", start
        last_saved = start if self.resume else None
        recent: deque[torch.Tensor] = deque(maxlen=50)
        pbar = None
        if main and c.progress and (total == 0 or start < total):
            from tqdm.auto import tqdm

            pbar = tqdm(total=total or None, initial=start, desc=c.desc, unit="step", dynamic_ncols=True)
        pipeline = BatchPipeline(obj.batch, start, total or None, obj.prefetch, c.workers)
        obj.module.train()
        stop = _StopFlag().__enter__()
        try:
            t_log, samples_since_log = time.perf_counter(), 0
            while total == 0 or step < total:
                batch = to_device(pipeline.get(step), proc.device)
                torch.manual_seed(S.step_seed(c.seed, step, proc.rank))
                elapsed = seg_start_seconds + (time.perf_counter() - t_start) - eval_seconds
                lr = self._lr(step, elapsed)
                for g, scale in zip(self.opt.param_groups, self.lr_scales, strict=True):
                    g["lr"] = lr * scale if scale != 1.0 else lr
                self.opt.zero_grad(set_to_none=True)
                loss, metrics = self._forward_backward(call, ddp, batch)
                gnorm = clip_grad_norm(self.params, c.grad_clip)
                # one host read per step: the loss and the gradient norm are finite (on every rank)
                # (fp16: an overflowing gradient is the scaler's to skip, not a divergence)
                g_ok = torch.isfinite(gnorm) if self.prec.scaler is None else torch.ones((), dtype=torch.bool)
                finite = (torch.isfinite(loss.detach()) & g_ok.to(loss.device)).float()
                if proc.world > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    what = "loss" if not bool(torch.isfinite(loss.detach())) else "gradient norm"
                    raise TrainingDiverged(_diverged_msg(what, step, last_saved, self.last_dir))
                updated = self.prec.step(self.opt)
                decay = S.ema_decay(step, c.ema_power, c.ema_max, c.ema_min)
                if ema is not None:
                    ema.update(decay)
                extra = obj.after_step(step)
                step += 1
                samples += c.batch_size
                samples_since_log += c.batch_size
                recent.append(loss.detach())
                self.train_seconds = seg_start_seconds + (time.perf_counter() - t_start) - eval_seconds
                time_up = max_s > 0 and self.train_seconds >= max_s
                interrupted = stop.set
                if proc.world > 1:  # rank 0 decides, so every rank stops after the same step
                    flag = torch.tensor([1.0 if time_up else 0.0, 1.0 if interrupted else 0.0])
                    dist.broadcast(flag, 0)
                    time_up, interrupted = bool(flag[0].item()), bool(flag[1].item())
                if pbar is not None:
                    pbar.update(1)
                    if step % 10 == 0 or step == total or step == start + 1:
                        shown = float(torch.stack(list(recent)[-20:]).mean())
                        pbar.set_postfix(loss=f"{shown:.4f}", lr=f"{lr:.2e}", **obj.progress(), refresh=False)
                if writes and c.log_every and (step % c.log_every == 0 or step == total):
                    now = time.perf_counter()
                    row = {
                        "step": step,
                        "kind": "train",
                        "loss": float(loss.detach()),
                        "lr": lr,
                        "grad_norm": float(gnorm),
                        "ema_decay": decay,
                        "samples_per_s": samples_since_log / max(now - t_log, 1e-9),
                        "elapsed_s": self.train_seconds,
                    }
                    if self.prec.scaler is not None:
                        row["amp_scale"] = float(self.prec.scaler.get_scale())
                        row["amp_skipped"] = 0.0 if updated else 1.0
                    for m in (metrics, extra):
                        row.update({k: float(v) for k, v in (m or {}).items() if k != "loss" and _scalar(v)})
                    self.log.log(row)
                    t_log, samples_since_log = now, 0
                do_eval = (
                    self.evaluate is not None
                    and c.eval_every > 0
                    and step % c.eval_every == 0
                    and (total == 0 or step < total)
                )
                do_ckpt = self.run_dir is not None and (
                    (c.ckpt_every and step % c.ckpt_every == 0) or step == total or time_up or interrupted
                )
                if writes and (do_eval or do_ckpt):
                    if pbar is not None:
                        pbar.clear()
                    self._save(step)
                    last_saved = step
                    if do_eval:
                        t_ev = time.perf_counter()
                        self._eval(step, c.eval_episodes, video=False)
                        eval_seconds += time.perf_counter() - t_ev
                    t_log, samples_since_log = time.perf_counter(), 0  # rows measure training steps only
                if proc.world > 1 and (do_eval or do_ckpt):
                    dist.barrier()
                if time_up:
                    stopped = "time limit"
                    break
                if interrupted:
                    stopped = "interrupted"
                    break
        except BaseException:
            if self.log is not None:
                self.log.close()
            raise
        finally:
            stop.__exit__(None, None, None)
            if pbar is not None:
                pbar.close()
            pipeline.close()
        elapsed = time.perf_counter() - t_start - eval_seconds
        if writes:
            try:
                if self.evaluate is not None and c.eval_at_end and stopped != "interrupted":
                    if last_saved != step:
                        self._save(step)
                    self._eval(step, c.final_episodes or c.eval_episodes, video=True)
                curves = plot_curves(self.log.rows, self.run_dir / "curves.png", title=self.meta.title)
                if self.evaluate is None or not c.eval_at_end or stopped == "interrupted":
                    self.log.log_image("curves", curves, step)  # (an evaluation has just sent it)
            finally:
                self.log.close()
        if proc.world > 1:
            _check_replicas_agree(obj.module)
        last = self.last_dir if self.last_dir is not None and self.last_dir.exists() else None
        best = self.ckpt_dir / "best" if self.ckpt_dir is not None else None
        return TrainResult(
            run_dir=self.run_dir,
            step=step,
            stopped=stopped,
            last_ckpt=last,
            best_ckpt=best if best is not None and best.exists() else None,
            best_score=self.best_score,
            final_eval=self.final_eval,
            samples_per_s=samples / max(elapsed, 1e-9),
            train_seconds=self.train_seconds,
            evals=self.evals,
            recent_losses=[float(x) for x in recent],
        )
