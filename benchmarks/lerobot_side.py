"""LeRobot's side of the side-by-side benchmarks: its DiffusionPolicy built to equal our PushT low-dim U-Net.

Runs inside LeRobot's own venv (never imports vlaflow)::

    /work/venvs/lerobot/bin/python benchmarks/lerobot_side.py params
    /work/venvs/lerobot/bin/python benchmarks/lerobot_side.py train --threads 2 --batch 256 --steps 30
    /work/venvs/lerobot/bin/python benchmarks/lerobot_side.py phases --threads 2 --steps 10
    /work/venvs/lerobot/bin/python benchmarks/lerobot_side.py sample --threads 2 --repeats 50

The policy: state-only input (``observation.state`` = the agent position (2),
``observation.environment_state`` = the 9 keypoints (18), as in LeRobot's own PushT keypoint setup),
``down_dims`` (64, 128, 256), kernel 5, 8 groups, step embedding 128, FiLM scale modulation, To = 2, H = 16,
Ta = 8, DDPM with 100 training steps on the squared-cosine schedule, epsilon prediction, min-max
normalisation -- the config of vlaflow's ``pusht_lowdim_diffusion`` preset, so both nets have the same
parameters and FLOPs (``params`` prints the count; ``benchmarks/vs_lerobot.py`` checks it against ours).

``train``: optimizer steps/s of LeRobot's own training step, ``lerobot.scripts.lerobot_train.update_policy``
(forward with the loss, ``accelerator.backward``, gradient clipping at 10, ``optimizer.step``, cosine
warm-up scheduler step, ``loss.item()``), preceded by LeRobot's preprocessor (normalisation) as in its
training loop. Batches come from ``--batches FILE.npz`` (real PushT windows written by vs_lerobot.py) or are
synthetic; they are made before timing, so LeRobot's data loading costs nothing here (in its favour).
The optimizer is the policy's preset (Adam, lr 1e-4, betas 0.95/0.999, weight decay 1e-6).

``sample``: ``predict_action_chunk`` latency at batch 1 with DDIM-10 (``noise_scheduler_type=DDIM``,
``num_inference_steps=10``), observation queues filled once, median and p90 over ``--repeats``.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

STATE, ENV, ACTION = "observation.state", "observation.environment_state", "action"
STATE_DIM, ENV_DIM, ACTION_DIM = 2, 18, 2
TO, H, TA = 2, 16, 8


def build(scheduler: str = "DDPM", inference_steps: int | None = None, with_post: bool = False):
    """(policy, preprocessor[, postprocessor], config) equal to vlaflow's pusht_lowdim_diffusion U-Net."""
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors

    cfg = DiffusionConfig(
        n_obs_steps=TO,
        horizon=H,
        n_action_steps=TA,
        input_features={
            STATE: PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
            ENV: PolicyFeature(FeatureType.ENV, (ENV_DIM,)),
        },
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        normalization_mapping={
            "STATE": NormalizationMode.MIN_MAX,
            "ENV": NormalizationMode.MIN_MAX,
            "ACTION": NormalizationMode.MIN_MAX,
        },
        down_dims=(64, 128, 256),
        kernel_size=5,
        n_groups=8,
        diffusion_step_embed_dim=128,
        use_film_scale_modulation=True,
        noise_scheduler_type=scheduler,
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        num_inference_steps=inference_steps,
        do_mask_loss_for_padding=False,
        device="cpu",
    )
    stats = {
        STATE: {"min": torch.zeros(STATE_DIM), "max": torch.full((STATE_DIM,), 512.0)},
        ENV: {"min": torch.zeros(ENV_DIM), "max": torch.full((ENV_DIM,), 512.0)},
        ACTION: {"min": torch.full((ACTION_DIM,), 12.0), "max": torch.full((ACTION_DIM,), 511.0)},
    }
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg)
    pre, post = make_diffusion_pre_post_processors(cfg, dataset_stats=stats)
    return (policy, pre, post, cfg) if with_post else (policy, pre, cfg)


def n_params(policy) -> int:
    return sum(p.numel() for p in policy.parameters())


def make_batches(path: str, batch: int, n: int) -> list[dict]:
    """``n`` raw-unit batches: from ``path`` (npz of state (N, To, 2), env (N, To, 18), action (N, H, 2),
    action_is_pad (N, H)) cut into consecutive slices, or synthetic uniform values in PushT's ranges."""
    if path:
        z = np.load(path)
        total = z["action"].shape[0]
        if total < batch:
            raise SystemExit(f"{path}: {total} windows, fewer than one batch of {batch}")
        out = []
        for i in range(n):
            s = (i * batch) % (total - batch + 1)
            out.append(
                {
                    STATE: torch.from_numpy(z["state"][s : s + batch]),
                    ENV: torch.from_numpy(z["env"][s : s + batch]),
                    ACTION: torch.from_numpy(z["action"][s : s + batch]),
                    "action_is_pad": torch.from_numpy(z["action_is_pad"][s : s + batch]),
                }
            )
        return out
    g = torch.Generator().manual_seed(0)
    return [
        {
            STATE: torch.rand(batch, TO, STATE_DIM, generator=g) * 512,
            ENV: torch.rand(batch, TO, ENV_DIM, generator=g) * 512,
            ACTION: 12 + torch.rand(batch, H, ACTION_DIM, generator=g) * 499,
            "action_is_pad": torch.zeros(batch, H, dtype=torch.bool),
        }
        for _ in range(n)
    ]


def run_train(args) -> dict:
    from accelerate import Accelerator
    from lerobot.optim.schedulers import DiffuserSchedulerConfig
    from lerobot.scripts.lerobot_train import update_policy
    from lerobot.utils.logging_utils import AverageMeter, MetricsTracker

    policy, pre, cfg = build()
    policy.train()
    optimizer = cfg.get_optimizer_preset().build(policy.get_optim_params())
    sched_cfg: DiffuserSchedulerConfig = cfg.get_scheduler_preset()
    lr_scheduler = sched_cfg.build(optimizer, num_training_steps=args.warmup + args.steps)
    accelerator = Accelerator(cpu=True)
    policy, optimizer, lr_scheduler = accelerator.prepare(policy, optimizer, lr_scheduler)
    metrics = {k: AverageMeter(k, ":.3f") for k in ("loss", "grad_norm", "lr", "update_s", "dataloading_s")}
    tracker = MetricsTracker(args.batch, 25650, 206, metrics, initial_step=0, accelerator=accelerator)
    batches = make_batches(args.batches, args.batch, min(8, args.warmup + args.steps))
    losses = []

    def step(i: int) -> None:
        nonlocal tracker
        batch = pre(dict(batches[i % len(batches)]))
        tracker, _ = update_policy(
            tracker, policy, batch, optimizer, cfg.get_optimizer_preset().grad_clip_norm,
            accelerator=accelerator, lr_scheduler=lr_scheduler,
        )  # fmt: skip
        losses.append(tracker.loss.val)

    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    dt = time.perf_counter() - t0
    return {
        "side": "lerobot",
        "what": "update_policy (forward+loss, backward, clip 10, Adam, scheduler) after the preprocessor",
        "samples_per_s": args.steps * args.batch / dt,
        "steps_per_s": args.steps / dt,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "batch_size": args.batch,
        "threads": torch.get_num_threads(),
        "batches": args.batches or "synthetic",
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def run_phases(args) -> dict:
    """Milliseconds per step in each phase of LeRobot's update_policy, replayed step by step (CPU time,
    which a shared machine disturbs less than wall time)."""
    policy, pre, cfg = build()
    policy.train()
    optimizer = cfg.get_optimizer_preset().build(policy.get_optim_params())
    batches = make_batches(args.batches, args.batch, 4)
    phases: dict[str, float] = {}
    clock = time.process_time

    def tick(name: str, t0: float) -> float:
        phases[name] = phases.get(name, 0.0) + clock() - t0
        return clock()

    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            phases.clear()
        t = clock()
        batch = pre(dict(batches[i % len(batches)]))
        t = tick("preprocess", t)
        loss, _ = policy.forward(batch)
        t = tick("forward", t)
        loss.backward()
        t = tick("backward", t)
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item(), gn.item()
        tick("clip+optimizer", t)
    return {
        "side": "lerobot",
        "what": "CPU ms per step by phase (update_policy's steps, replayed)",
        "cpu_ms": {k: 1e3 * v / args.steps for k, v in phases.items()},
        "threads": torch.get_num_threads(),
    }


def run_sample(args) -> dict:
    policy, pre, post, _cfg = build("DDIM", 10, with_post=True)
    policy.eval()
    g = torch.Generator().manual_seed(0)
    # one raw observation as an env gives it (no batch dimension): the preprocessor adds it and normalises
    obs = {STATE: torch.rand(STATE_DIM, generator=g) * 512, ENV: torch.rand(ENV_DIM, generator=g) * 512}

    def tensors(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if torch.is_tensor(v)}

    from lerobot.policies.utils import populate_queues

    policy.reset()
    policy._queues = populate_queues(policy._queues, tensors(pre(dict(obs))))
    chunk_ms, full_ms = [], []
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            batch = tensors(pre(dict(obs)))
            t1 = time.perf_counter()
            chunk = policy.predict_action_chunk(batch)
            t2 = time.perf_counter()
            post(chunk)
            t3 = time.perf_counter()
            if i >= args.warmup:
                chunk_ms.append((t2 - t1) * 1e3)
                full_ms.append((t3 - t0) * 1e3)
    chunk_ms.sort()
    full_ms.sort()
    return {
        "side": "lerobot",
        "what": "predict_action_chunk, DDIM-10, batch 1 (normalised obs in, normalised chunk out); "
        "with_processors adds the preprocessor (batch dim, normalise) and the postprocessor (unnormalise)",
        "median_ms": statistics.median(chunk_ms),
        "p90_ms": chunk_ms[int(0.9 * (len(chunk_ms) - 1))],
        "median_ms_with_processors": statistics.median(full_ms),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "chunk_shape": list(chunk.shape),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("params", help="print the parameter count")
    tr = sub.add_parser("train", help="training samples/s")
    tr.add_argument("--batch", type=int, default=256)
    tr.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    tr.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    tr.add_argument("--batches", default="", help="npz of real windows (default: synthetic)")
    ph = sub.add_parser("phases", help="CPU ms per step in forward / backward / optimizer")
    ph.add_argument("--batch", type=int, default=256)
    ph.add_argument("--steps", type=int, default=10)
    ph.add_argument("--warmup", type=int, default=3)
    ph.add_argument("--batches", default="", help="npz of real windows (default: synthetic)")
    sa = sub.add_parser("sample", help="DDIM-10 chunk latency at batch 1")
    sa.add_argument("--repeats", type=int, default=50)
    sa.add_argument("--warmup", type=int, default=5)
    for p in (tr, ph, sa, sub.choices["params"]):
        p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "params":
        policy, _, _ = build()
        out = {"side": "lerobot", "parameters": n_params(policy)}
    elif args.cmd == "train":
        out = run_train(args)
    elif args.cmd == "phases":
        out = run_phases(args)
    else:
        out = run_sample(args)
    import lerobot

    out["parameters"] = out.get("parameters") or n_params(build()[0])
    out["versions"] = {
        "lerobot": getattr(lerobot, "__version__", "?"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out["load_avg"] = list(os.getloadavg())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
