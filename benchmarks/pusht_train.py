"""PushT benchmark: train a preset for a wall-time budget, evaluate on the paper's seeds, append the result.

    python benchmarks/pusht_train.py --preset pusht_lowdim_diffusion --minutes 30 \
        --samplers ddim:10,ddpm:100 --out runs/bench/pusht_lowdim_diffusion

Trains with ``vlaflow.train.trainer.train`` (the same loop as ``vlaflow train``, with the CLI's rollout
evaluator for the ``--monitor-every`` rollouts): the step count is
calibrated from a short timing run so the cosine schedule ends at the budget, and ``train.max_minutes``
stops it there regardless. Then the final (EMA) checkpoint is rolled out on seeds 100000.. (50 by
default, 300 steps each) once per sampler, and one row per sampler is appended to
``benchmarks/results/pusht.json``: policy, sampler, mean_score, success_rate, train_minutes, seeds,
command, plus steps, throughput, machine and versions. No checkpoint selection on the test seeds: the
score is that of the last checkpoint (the paper's "mean of last checkpoints" column is closest).

Data: ``--data STORE`` (an ingested PushT store), else the shared diffusion_policy zarr is ingested once
into ``--cache`` (default runs/pusht.zarr).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_PUSHT = ROOT.parent / "shared" / "data" / "pusht_cchi_v7" / "pusht_cchi_v7_replay.zarr"
RESULTS = ROOT / "benchmarks" / "results" / "pusht.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pusht_lowdim_diffusion")
    p.add_argument(
        "--data", default=None, help="ingested PushT store (default: ingest the shared zarr to --cache)"
    )
    p.add_argument(
        "--cache", default=str(ROOT / "runs" / "pusht.zarr"), help="where to ingest the shared zarr"
    )
    p.add_argument("--out", default=None, help="run directory (default runs/bench/<preset>-<time>)")
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget")
    p.add_argument("--steps", type=int, default=0, help="fixed step count (0 = calibrate to --minutes)")
    p.add_argument(
        "--samplers",
        default="",
        help="comma list of sampler:steps, e.g. ddim:10,ddpm:100 (default: preset's)",
    )
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes (seeds 100000..)")
    p.add_argument("--max-steps", type=int, default=300, help="evaluation episode length")
    p.add_argument("--workers", type=int, default=1, help="parallel evaluation workers")
    p.add_argument(
        "--monitor-every",
        type=int,
        default=0,
        help="also roll out every N training steps on seeds 0.. (never the test seeds; not training time)",
    )
    p.add_argument("--monitor-episodes", type=int, default=10, help="episodes per monitoring rollout")
    p.add_argument("--results", default=str(RESULTS), help="JSON list to append rows to")
    p.add_argument("--no-append", action="store_true", help="print the rows, do not write --results")
    p.add_argument(
        "overrides", nargs="*", metavar="FIELD=VALUE", help="config overrides (train.batch_size=256 ...)"
    )
    return p.parse_args(argv)


def ensure_data(args) -> Path:
    if args.data:
        return Path(args.data)
    cache = Path(args.cache)
    if not cache.exists():
        if not SHARED_PUSHT.exists():
            raise SystemExit(f"no --data given and the shared PushT zarr is absent: {SHARED_PUSHT}")
        from vlaflow.data.ingest.dp_zarr import ingest

        print(f"ingesting {SHARED_PUSHT} -> {cache}")
        ingest(SHARED_PUSHT, cache)
    return cache


def sampler_variants(cfg, spec: str) -> list[tuple[str, int]]:
    """[(sampler, steps)] from "ddim:10,ddpm:100"; empty = the preset's own sampler."""
    if not spec:
        return [(cfg.policy.sampler, cfg.policy.num_inference_steps)]
    out = []
    for item in spec.split(","):
        name, _, k = item.partition(":")
        out.append((name.strip(), int(k) if k else cfg.policy.num_inference_steps))
    return out


def feature_cache_first(cfg, data) -> dict | None:
    """Build (or find) the frozen-encoder feature cache before the timing run, and say what it cost."""
    from vlaflow.data.store import EpisodeStore
    from vlaflow.train import feature_cache as FC
    from vlaflow.train.trainer import build_run_policy, open_training_data

    if not cfg.train.feature_cache:
        return None
    store, _, stats = open_training_data(cfg, data)
    cams = FC.cacheable_cameras(build_run_policy(cfg, stats, store))
    if not cams:
        return None
    store = EpisodeStore.open(data)
    out = {}
    for key, enc in cams.items():
        feats, info = FC.load_or_build(store, key, enc, cfg.train.feature_cache_dir or None)
        out[key] = {
            "built": info["built"],
            "minutes": round(info["seconds"] / 60, 2),
            "shape": list(feats.shape),
            "backbone": enc.backbone,
        }
        print(f"feature cache {key}: {'built' if info['built'] else 'reused'} in {info['seconds']:.0f} s")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from vlaflow.cli.train import evaluate_policy, rollout_evaluator
    from vlaflow.train.config import apply_overrides
    from vlaflow.train.presets import get_preset
    from vlaflow.train.trainer import steps_for_budget, train

    data = ensure_data(args)
    cfg = apply_overrides(get_preset(args.preset), list(args.overrides))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ROOT / "runs" / "bench" / f"{cfg.name}-{stamp}")
    cache_info = feature_cache_first(cfg, data)
    steps, calib_sps = (
        (args.steps, None)
        if args.steps
        else steps_for_budget(cfg, data, args.minutes, out.with_name(out.name + "-calib"))
    )
    cfg = apply_overrides(
        cfg,
        [
            f"train.steps={steps}",
            f"train.max_minutes={args.minutes}",
            "train.eval_at_end=false",
            f"train.eval_every={args.monitor_every}",
            f"train.eval_episodes={args.monitor_episodes}",
            f"eval.max_steps={args.max_steps}",
            f"eval.n_workers={args.workers}",
            "eval.seed_start=0",  # monitoring rollouts (if any) on seeds 0..; the test seeds are 100000..
        ],
    )
    print(f"training {cfg.name}: {steps} steps, budget {args.minutes} min -> {out}")
    res = train(cfg, data, out, evaluate=rollout_evaluator(cfg))
    cfg = apply_overrides(cfg, ["eval.seed_start=100000"])
    from vlaflow.policies import load_checkpoint

    rows = []
    cmd = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]
    )
    for name, k in sampler_variants(cfg, args.samplers):
        policy = load_checkpoint(res.last_ckpt)
        t = time.perf_counter()
        ev = evaluate_policy(
            policy,
            cfg,
            args.episodes,
            out / "eval" / f"{name}{k}",
            ckpt=res.last_ckpt,
            sampler=name,
            num_steps=k,
        )
        rows.append(
            {
                "policy": cfg.name,
                "family": cfg.family,
                "sampler": f"{name}-{k}",
                "nfe": k,  # network evaluations per action chunk
                "mean_score": round(ev["score"], 4),
                "success_rate": ev["success_rate"],
                "train_minutes": round(res.train_seconds / 60, 2),
                "train_steps": res.step,
                "batch_size": cfg.train.batch_size,
                "samples_per_s": round(res.samples_per_s, 1),
                "calibration_samples_per_s": round(calib_sps, 1) if calib_sps else None,
                "eval_minutes": round((time.perf_counter() - t) / 60, 2),
                "seeds": f"{cfg.eval.seed_start}..{cfg.eval.seed_start + args.episodes - 1}",
                "max_steps": args.max_steps,
                "stopped": res.stopped,
                "command": cmd,
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), {platform.platform()}",
                "versions": {"python": platform.python_version(), "torch": torch.__version__},
                "date": stamp,
                "run_dir": str(out),
            }
        )
        if cache_info:  # a frozen pretrained camera: the cache is part of the end-to-end cost
            rows[-1]["feature_cache"] = cache_info
            rows[-1]["end_to_end_minutes"] = round((time.perf_counter() - t_start) / 60, 2)
        print(json.dumps(rows[-1]))
    if not args.no_append:
        from benchmarks._meta import append_rows

        append_rows(args.results, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
