"""One-step consistency distillation as an objective of the training loop (``vlaflow distill``).

What is trained (say it plainly): **distillation of the teacher's sampling ODE onto its trajectories**.
Observation windows are drawn from the store; for each, the teacher runs its own deterministic sampler
(DDIM-10 with eta 0 for diffusion, Euler-10 for flow) from a fresh noise sample, recording the chain.
The student f(x_t, t, obs) is regressed onto the chain's final action from (a) the initial noise at the
teacher's start time (the one-step map that inference uses) and (b) one random intermediate state of the
same chain (the consistency property along the probability-flow ODE: every point of a trajectory maps
to its end). Teacher data are generated on the fly into a pool that is refreshed as training goes, or,
with ``teacher_pairs_n=N`` (``--teacher-pairs N``), generated once up front (optionally kept in a cache
file for the next student): the teacher's K-step sampling then stops costing every update, so a cheap
student takes many more updates in the same wall time. The pool's refreshes run on the loop's background
batch thread, beside the student's updates.

By default the student has the teacher's nets and starts from the teacher's weights. ``student_dims``
gives the student a narrower U-Net (e.g. ``32,64,128`` under a ``64,128,256`` teacher: about a quarter
of the multiply-adds per evaluation, for control loops whose latency budget the teacher's net misses);
it then starts from a channel subset of the teacher's U-Net (:func:`vlaflow.policies.nets.unet1d.
narrowed_state`) or from scratch, keeping any non-head (observation encoder) weights of matching shape.
``student_net="mlp:1024x3"`` gives it a residual-MLP head instead (width x blocks; ``nets/mlp.py``), a
few matrix-vector products per evaluation: the head to use when the control step must fit in a
millisecond or two on a CPU.
A flow teacher's student keeps the velocity output (x0 = x_1 - u at t = 1 is the teacher's own one-step
Euler estimate), a diffusion teacher's student outputs x0. The result is a policy checkpoint (family
``consistency``) that ``vlaflow.load_policy`` and ``vlaflow eval`` use like any other, with one network
evaluation per chunk.

The pieces: :func:`student_config` (the student's config), :func:`teacher_pairs` / :func:`teacher_set`
(teacher data, the fixed set's cache), the narrowed-U-Net start (:func:`narrowable`,
:func:`narrowed_unet_state`), :class:`OneStepDistillation` (the batch source and the student loss) and
:func:`distill` (all of it on :class:`vlaflow.train.loop.TrainingLoop`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlaflow.atomic import check_destination
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.policies.base_config import MLPConfig
from vlaflow.policies.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from vlaflow.policies.consistency.config import ConsistencyConfig
from vlaflow.policies.contract import batch_obs
from vlaflow.policies.conversions import to_x0_eps
from vlaflow.policies.nets.unet1d import narrowed_state
from vlaflow.policies.registry import build_policy
from vlaflow.train.loop import LoopConfig, TrainingLoop
from vlaflow.train.objective import Objective
from vlaflow.train.teacher_cache import load_teacher_set, save_teacher_set


def parse_dims(text: str) -> tuple[int, ...] | None:
    """ "32,64,128" -> (32, 64, 128); "" -> None (the teacher's widths)."""
    if not text.strip():
        return None
    try:
        dims = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--student-dims must be comma-separated integers, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"--student-dims must be positive widths, got {text!r}")
    return dims


def parse_student_net(text: str):
    """ "mlp:1024x3" -> ("mlp", (1024, 3)); "unet:32,64,128" -> ("unet", (32, 64, 128)); "" -> None."""
    text = text.strip()
    if not text:
        return None
    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    if kind == "unet":
        dims = parse_dims(arg)
        if dims is None:
            raise ConfigError("--student-net unet:D1,D2,... needs the widths, e.g. unet:32,64,128")
        return "unet", dims
    if kind == "mlp":
        if not arg.strip():
            return "mlp", None
        try:
            width, blocks = (int(x) for x in arg.lower().split("x"))
        except ValueError:
            raise ConfigError(
                f"--student-net mlp takes WIDTHxBLOCKS, e.g. mlp:1024x3, got {text!r}"
            ) from None
        if width < 1 or blocks < 0:
            raise ConfigError(f"--student-net mlp: width must be >= 1 and blocks >= 0, got {text!r}")
        return "mlp", (width, blocks)
    raise ConfigError(f"--student-net must be mlp:WIDTHxBLOCKS or unet:D1,D2,..., got {text!r}")


def student_config(teacher, teacher_path: str, sampler: str, steps: int, down_dims=None, net_spec=None):
    """The student's config: the teacher's shapes, encoders and net (or a U-Net of ``down_dims`` widths, or
    the head of ``net_spec`` from :func:`parse_student_net`); its path; the start time of its grid."""
    tc = teacher.config
    fam = tc.family
    if fam not in ("diffusion", "flow"):
        raise ConfigError(f"{teacher_path}: teacher family {fam!r} cannot be distilled (diffusion or flow)")
    if getattr(tc, "action_offset", 0):
        raise ConfigError(
            f"{teacher_path}: the teacher's chunk starts {tc.action_offset} step(s) before the current one "
            "(an imported LeRobot policy, action_offset > 0); distilling it is not supported yet"
        )
    net = tc.net
    if net_spec is not None and net_spec[0] == "unet":
        if down_dims is not None:
            raise ConfigError("give the U-Net widths once: --student-dims or --student-net unet:...")
        down_dims = net_spec[1]
    if down_dims is not None:
        net = dataclasses.replace(
            net, kind="unet", unet=dataclasses.replace(net.unet, down_dims=tuple(down_dims))
        )
    elif net_spec is not None:  # mlp
        m = MLPConfig() if net_spec[1] is None else MLPConfig(width=net_spec[1][0], n_blocks=net_spec[1][1])
        net = dataclasses.replace(net, kind="mlp", mlp=m)
    start = float(teacher.path.timesteps(steps)[0])
    clip = float(getattr(tc, "clip_sample_range", 0.0)) if getattr(tc, "clip_sample", False) else 0.0
    return ConsistencyConfig(
        n_obs_steps=tc.n_obs_steps,
        horizon=tc.horizon,
        n_action_steps=tc.n_action_steps,
        obs_shapes=dict(tc.obs_shapes),
        action_dim=tc.action_dim,
        fps=tc.fps,
        tasks=tuple(tc.tasks),
        normalization=dict(tc.normalization),
        encoder=tc.encoder,
        net=net,
        mask_pad_loss=tc.mask_pad_loss,
        teacher_family=fam,
        num_train_steps=int(getattr(tc, "num_train_steps", 100)),
        time_scale=float(getattr(tc, "time_scale", 100.0)),
        start_time=start,
        parameterization="velocity" if fam == "flow" else "x0",
        clip_sample_range=clip,
        teacher=str(teacher_path),
        teacher_sampler=sampler,
        teacher_steps=int(steps),
    )


def teacher_pairs(teacher, ws, idx, sampler: str, steps: int, generator, steer=None):
    """Teacher data for windows ``idx``: obs, initial noise, one random chain state + its time, final x0.

    Everything in normalized action units; (B, H, Da) tensors. ``steer`` (a DSRL-refined teacher's
    :meth:`~vlaflow.policies.steered.model.SteeredPolicy.steer`: cond -> the noise actor's w) starts the
    teacher's chain from the actor's noise instead; the student's input noise stays a fresh Gaussian draw,
    so the student learns the steered policy's chunk for the observation whatever noise it is handed (a
    plain one-step checkpoint, no actor to deploy).
    """
    batch = ws.get_batch(idx)
    obs = {k: torch.from_numpy(v) for k, v in batch_obs(batch, teacher.config.obs_shapes).items()}
    with torch.no_grad():
        cond = teacher.encode(obs)
        b = cond.shape[0]
        noise = torch.randn((b, teacher.config.horizon, teacher.config.action_dim), generator=generator)
        ts = teacher.path.timesteps(steps)
        start = noise if steer is None else steer(cond)
        res = teacher.denoise(cond, noise=start, sampler=sampler, num_steps=steps, return_chain=True)
        # chain state after step i sits at time ts[i + 1]; pick one of the intermediate ones (not the end)
        n_mid = len(res.steps) - 1
        if n_mid >= 1:
            pick = torch.randint(0, n_mid, (b,), generator=generator)
            states = torch.stack([st.x_next for st in res.steps[:-1]], dim=0)  # (K-1, B, H, Da)
            mid = states[pick, torch.arange(b)]
            mid_t = ts[pick + 1]
        else:
            mid, mid_t = start, ts[:1].expand(b)
    return obs, noise, mid, mid_t, res.x0


def narrowable(teacher_net, student_net) -> bool:
    """Whether a student U-Net can start from a channel subset of the teacher's (same levels, kernel,
    groups, step embedding; each width no wider and a whole number of channels per group)."""
    if teacher_net.kind != "unet" or student_net.kind != "unet":
        return False
    t, u = teacher_net.unet, student_net.unet
    same = (t.kernel_size, t.n_groups, t.step_embed_dim) == (u.kernel_size, u.n_groups, u.step_embed_dim)
    return (
        same
        and len(t.down_dims) == len(u.down_dims)
        and all(a <= b for a, b in zip(u.down_dims, t.down_dims, strict=True))
    )


def narrowed_unet_state(teacher_sd: dict, student_sd: dict, groups: int) -> dict:
    """Policy state dicts -> the student's ``head.*`` weights cut from the teacher's U-Net head
    (:func:`vlaflow.policies.nets.unet1d.narrowed_state`)."""

    def head(sd):
        return {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}

    return {f"head.{k}": v for k, v in narrowed_state(head(teacher_sd), head(student_sd), groups).items()}


def _concat_pairs(parts: list[tuple], keep: int) -> tuple:
    """Teacher-pair tuples -> one, keeping the newest ``keep``."""
    obs = {}
    for k in parts[0][0]:
        vals = [p[0][k] for p in parts]
        if isinstance(vals[0], torch.Tensor):
            obs[k] = torch.cat(vals)[-keep:]
        else:
            obs[k] = [x for v in vals for x in v][-keep:]
    return (obs, *(torch.cat([p[i] for p in parts])[-keep:] for i in range(1, len(parts[0]))))


def _cache_meta(teacher: str, data: str, sampler: str, steps: int) -> dict:
    """What made a teacher set: the teacher (path and a hash of its weights, so a retrained teacher at the
    same path does not reuse stale pairs), the store, the sampler and its steps."""
    h = hashlib.sha256()
    with open(Path(teacher) / MODEL_FILE, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {
        "teacher": str(Path(teacher).resolve()),
        "teacher_sha256": h.hexdigest(),
        "data": str(Path(data).resolve()),
        "sampler": sampler,
        "steps": int(steps),
    }


def teacher_set(
    fresh, n: int, cache: str, meta: dict, chunk: int = 512, progress: bool = True
) -> tuple[tuple, bool]:
    """(``n`` teacher pairs, whether they were read from ``cache``): made by ``fresh(k)`` in chunks (with a
    progress bar) and written to ``cache``, unless that file exists."""
    if cache and Path(cache).is_file():
        p, saved_meta = load_teacher_set(cache)  # safetensors + JSON: never unpickled
        if saved_meta != meta:
            raise ConfigError(
                f"--teacher-cache {cache} was made by {saved_meta}, not by this run's {meta}; "
                "give another file or delete it"
            )
        have = p[1].shape[0]
        if have < n:
            raise ConfigError(f"--teacher-cache {cache} holds {have} pairs, fewer than --teacher-pairs {n}")
        return ({k: v[:n] for k, v in p[0].items()}, *(x[:n] for x in p[1:])), True
    parts = []
    with tqdm(total=n, desc="teacher pairs", unit="pair", disable=not progress) as bar:
        for done in range(0, n, chunk):
            k = min(chunk, n - done)
            parts.append(fresh(k))
            bar.update(k)
    pairs = _concat_pairs(parts, n)
    if cache:
        save_teacher_set(cache, pairs, meta)
    return pairs, False


class OneStepDistillation(Objective):
    """Teacher pairs -> the student's one-step (and chain-state) regression onto the teacher's final x0.

    ``buf`` holds the pairs (obs, noise, mid state, mid time, final x0; normalized action units, (B, H, Da)).
    Without ``fixed``, ``fresh(refresh)`` new pairs join the pool every 10 updates (newest ``pool`` kept):
    a source with state, prepared ahead in step order ("sequential").
    """

    prefetch = "sequential"

    def __init__(self, student, buf: tuple, fresh, *, batch_size: int, rng: np.random.Generator,
                 fixed: bool, pool: int, refresh: int, chain_weight: float):  # fmt: skip
        self.module = student
        self.buf, self.fresh, self.rng = buf, fresh, rng
        self.batch_size, self.fixed, self.pool, self.refresh = batch_size, fixed, pool, refresh
        self.chain_weight = chain_weight
        self.start_time = student.config.start_time

    def batch(self, step: int) -> tuple:
        if step % 10 == 0 and step > 0 and not self.fixed:
            self.buf = _concat_pairs([self.buf, self.fresh(self.refresh)], self.pool)
        n = self.buf[1].shape[0]
        sel = torch.from_numpy(self.rng.integers(0, n, size=self.batch_size))
        obs = {k: v[sel] for k, v in self.buf[0].items()}
        return (obs, *(x[sel] for x in self.buf[1:]))

    def loss(self, batch: tuple) -> tuple[Tensor, dict[str, Any]]:
        obs, noise, mid, mid_t, target = batch
        student = self.module
        cond = student.encode(obs)
        loss = torch.nn.functional.mse_loss(student.x0_at(noise, self.start_time, cond), target)
        if self.chain_weight > 0:
            x0_mid = _x0_at_times(student, mid, mid_t, cond)
            loss = loss + self.chain_weight * torch.nn.functional.mse_loss(x0_mid, target)
        return loss, {}


def _start_student(tpol, cfg, stats, student_init: str, device: str):
    """(student, how it started): the teacher's weights (same net), a channel subset of its U-Net, or
    scratch (matching observation-encoder weights copied)."""
    student = build_policy(cfg, stats).to(device)
    if cfg.net == tpol.config.net:
        missing = student.load_state_dict(tpol.state_dict(), strict=False)
        if missing.unexpected_keys or missing.missing_keys:
            raise VlaflowError(f"teacher and student nets differ: {missing}")
        return student, "teacher"
    own = student.state_dict()
    shared = {
        k: v
        for k, v in tpol.state_dict().items()
        if not k.startswith("head.") and k in own and own[k].shape == v.shape
    }
    init = "scratch"
    if student_init != "scratch" and narrowable(tpol.config.net, cfg.net):
        shared |= narrowed_unet_state(tpol.state_dict(), own, cfg.net.unet.n_groups)
        init = "teacher channels"
    elif student_init == "teacher":
        raise ConfigError(
            "--student-init teacher needs a U-Net student no wider than the teacher's U-Net, with "
            "its levels, kernel, groups and step embedding"
        )
    student.load_state_dict(shared, strict=False)
    return student, init


def distill(
    teacher: str,
    data: str,
    out: str,
    minutes: float = 12.0,
    steps: int = 0,
    batch_size: int = 128,
    lr: float = 1e-4,
    lr_decay: str = "none",
    pool: int = 4096,
    refresh: int = 256,
    chain_weight: float = 0.5,
    teacher_sampler: str = "",
    teacher_steps: int = 0,
    student_dims: tuple[int, ...] | None = None,
    student_net: str = "",
    teacher_pairs_n: int = 0,
    teacher_cache: str = "",
    student_init: str = "auto",
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train a one-step student of ``teacher`` on ``data``'s observations into the checkpoint ``out``
    (``out/distill.json`` holds the returned summary). The budget is ``minutes`` of wall time from the
    start (a fixed teacher set's generation not counted) or ``steps`` updates, whichever ends first."""
    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler

    if minutes <= 0 and steps <= 0:
        raise ConfigError("give a budget: --minutes > 0 or --steps > 0")
    for name, v in (("batch-size", batch_size), ("pool", pool), ("refresh", refresh)):
        if v < 1:
            raise ConfigError(f"--{name} must be >= 1, got {v}")
    if teacher_pairs_n < 0:
        raise ConfigError(f"--teacher-pairs must be >= 0, got {teacher_pairs_n}")
    if teacher_cache and not teacher_pairs_n:
        raise ConfigError("--teacher-cache needs --teacher-pairs N (the size of the fixed teacher set)")
    net_spec = parse_student_net(student_net)
    if student_init not in ("auto", "teacher", "scratch"):
        raise ConfigError(f"--student-init must be auto, teacher or scratch, got {student_init!r}")
    if lr_decay not in ("none", "cosine"):
        raise ConfigError(f"--lr-decay must be 'none' or 'cosine', got {lr_decay!r}")
    # the one overwrite rule (vlaflow.atomic): never into the teacher or the store, an existing out only
    # with overwrite -- checked before the teacher is loaded
    check_destination(
        out, overwrite=overwrite, sources={"--teacher": teacher, "--data": data}, what="checkpoint"
    )
    if threads > 0:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    tpol = load_checkpoint(teacher, device=device)
    for p in tpol.parameters():
        p.requires_grad_(False)
    # a DSRL-refined teacher (family "steered"): its frozen base denoises, from the noise actor's w
    steer = tpol.steer if tpol.config.family == "steered" else None
    n_teacher_params = tpol.num_parameters()  # a steered teacher's count includes its noise actor
    if steer is not None:
        tpol = tpol.base
    sampler = teacher_sampler or tpol.config.sampler
    n_steps = teacher_steps or tpol.config.num_inference_steps
    cfg = student_config(tpol, teacher, sampler, n_steps, student_dims, net_spec)
    stats = {
        k: {s: np.asarray(v) for s, v in st.items()} for k, st in tpol.normalizer.to_dict()["stats"].items()
    }
    student, init = _start_student(tpol, cfg, stats, student_init, device)
    store = EpisodeStore.open(data)
    store.require_intact()  # missing chunks would read as zeros: refuse before any work
    keys = list(cfg.obs_shapes)
    absent = [k for k in keys if k not in store.keys]
    if absent:
        raise ConfigError(
            f"{data}: the teacher reads {absent}, which the store lacks; it has {sorted(store.keys)}"
        )
    ws = WindowSampler(store, keys, cfg.n_obs_steps, cfg.horizon)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    def fresh(n):  # module-level teacher_pairs looked up per call (tests count the calls)
        return teacher_pairs(tpol, ws, rng.integers(0, len(ws), size=n), sampler, n_steps, gen, steer)

    # held-out check set: the student's one-step error to the teacher on fresh windows and noise
    val = fresh(256)
    t_teacher = time.perf_counter()
    cached = False
    if teacher_pairs_n:
        meta = _cache_meta(teacher, data, sampler, n_steps)
        buf, cached = teacher_set(fresh, teacher_pairs_n, teacher_cache, meta, progress=progress)
    else:
        buf = fresh(min(pool, max(batch_size, refresh * 4)))
    t_train = time.perf_counter()
    teacher_s = t_train - t_teacher
    # the budget counts from the start; a fixed teacher set's generation is reported apart (teacher_set_s)
    left = (
        (t_start + minutes * 60 + (teacher_s if teacher_pairs_n else 0.0) - t_train) if minutes > 0 else 0.0
    )
    objective = OneStepDistillation(
        student, buf, fresh, batch_size=batch_size, rng=rng, fixed=bool(teacher_pairs_n), pool=pool,
        refresh=refresh, chain_weight=chain_weight,
    )  # fmt: skip
    updates, losses = 0, []
    if minutes <= 0 or left > 0:
        loop_cfg = LoopConfig(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            betas=(0.9, 0.999),  # AdamW's defaults
            weight_decay=1e-6,
            schedule="budget_cosine" if lr_decay == "cosine" else "constant",
            grad_clip=10.0,
            seed=seed,
            max_seconds=left,
            device=device,
            num_threads=torch.get_num_threads(),
            progress=progress,
            desc="distill",
        )
        res = TrainingLoop(loop_cfg).run(objective)
        updates, losses = res.step, res.recent_losses
    student.eval()
    with torch.no_grad():
        cond = student.encode(val[0])
        x0 = student.x0_at(val[1].to(device), cfg.start_time, cond)
        err = float((x0 - val[4].to(device)).abs().mean())
        err0 = (
            float((_teacher_onestep(tpol, val) - val[4].to(device)).abs().mean())
            if cfg.teacher_family == "flow" and steer is None
            else None
        )
    summary = {
        "teacher": str(teacher),
        "teacher_steered": steer is not None,  # a DSRL run's policy: its base's chain from the actor's w
        "teacher_sampler": sampler,
        "teacher_steps": int(n_steps),
        "student_nfe": 1,
        "student_parameters": student.num_parameters(),
        "teacher_parameters": n_teacher_params,
        "student_down_dims": list(cfg.net.unet.down_dims) if cfg.net.kind == "unet" else None,
        "student_net": cfg.net.kind
        if cfg.net.kind != "mlp"
        else f"mlp:{cfg.net.mlp.width}x{cfg.net.mlp.n_blocks}",
        "student_init": init,
        "updates": updates,
        "lr": lr,
        "lr_decay": lr_decay,
        "teacher_pairs": int(objective.buf[1].shape[0]) if teacher_pairs_n else None,
        "teacher_set_s": round(teacher_s, 1) if teacher_pairs_n else None,  # reading it, when cached
        "teacher_set_cached": cached if teacher_pairs_n else None,
        "train_s": round(time.perf_counter() - t_train, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "val_mean_abs_err_normalized": err,
        "val_mean_abs_err_teacher_euler1": err0,  # flow teachers: the teacher's own 1-step Euler
        "method": "regression of the one-step map noise -> teacher's final action"
        + (f" + random chain state -> final (weight {chain_weight})" if chain_weight > 0 else ""),
        "chain_weight": chain_weight,
    }
    save_checkpoint(out, student, extra_json={"distill": summary})
    (Path(out) / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _x0_at_times(student, x_t, t, cond):
    """x0 estimates at per-sample times (B,)."""
    b = x_t.shape[0]
    pred = student.predict(x_t, t, cond)
    a = student.path.alpha(t).view(b, 1, 1)
    s = student.path.sigma(t).view(b, 1, 1)
    x0 = to_x0_eps(pred, student.parameterization, x_t, a, s)[0]
    c = student.config.clip_sample_range
    return torch.clamp(x0, -c, c) if c > 0 else x0


def _teacher_onestep(teacher, val):
    """The teacher's own one-evaluation estimate from the same noise (a baseline for the student's error)."""
    with torch.no_grad():
        cond = teacher.encode(val[0])
        return teacher.denoise(cond, noise=val[1], num_steps=1).x0
