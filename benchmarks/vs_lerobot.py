"""Training throughput side by side: vlaflow's loop vs LeRobot 0.4.4's DiffusionPolicy, same net, same batch.

    python benchmarks/vs_lerobot.py --data /work/base/pusht.zarr            # 3 alternating rounds
    python benchmarks/vs_lerobot.py --data pusht.zarr --rounds 5 --threads 2 train.fused_adamw=true

Both nets are the PushT low-dim U-Net (down_dims 64/128/256, kernel 5, 8 groups, To = 2, H = 16, DDPM-100
training; 4,559,554 parameters -- checked before timing, the run stops if the counts differ), batch 256,
the same number of torch threads. Each round runs, in fresh processes and alternating which goes first:

* **vlaflow**: ``vlaflow.train.train`` -- the whole training loop on the real store (background batch
  assembly from the episode store, the per-step seed, AdamW, EMA, clipping, the NaN check, log rows):
  samples/s over ``--steps`` optimiser steps after ``--warmup`` steps, from the loop's own log rows.
* **LeRobot**: ``benchmarks/lerobot_side.py train`` in LeRobot's venv -- its ``update_policy`` step
  (forward + loss, backward, clipping, Adam, scheduler) after its preprocessor, on pre-built batches of
  the same real windows (``--synthetic`` for random ones): LeRobot's data loading is not timed at all.

Writes ``benchmarks/results/vs_lerobot.json`` (every round, commands, machine, versions, load averages)
and ``vs_lerobot.md`` (the table). The machine is shared: the load average is recorded before each
measurement, and the ratio is the median over rounds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
LEROBOT_PY = "/work/venvs/lerobot/bin/python"
PRESET = "pusht_lowdim_diffusion"


def vlaflow_train(data: str, steps: int, warmup: int, threads: int, batch: int, overrides: list[str]) -> dict:
    """samples/s of ``vlaflow.train.train`` on ``data`` over ``steps`` steps after ``warmup`` steps."""
    import torch

    from vlaflow.train import apply_overrides, get_preset, train

    every = warmup
    if steps % every:
        raise SystemExit(
            f"--steps ({steps}) must be a multiple of --warmup ({warmup}): rows every warmup steps"
        )
    cfg = apply_overrides(
        get_preset(PRESET),
        [
            f"train.steps={warmup + steps}",
            f"train.batch_size={batch}",
            f"train.log_every={every}",
            "train.ckpt_every=0",
            "train.keep_step_ckpts=false",
            "eval.task=",
            f"train.num_threads={threads}",
            "train.progress=false",
            *overrides,
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, data, Path(tmp) / "run")
        with open(Path(tmp) / "run" / "log.csv") as fh:
            rows = [r for r in csv.DictReader(fh) if r["kind"] == "train"]
    timed = [r for r in rows if int(r["step"]) > warmup]
    seconds = sum(every * batch / float(r["samples_per_s"]) for r in timed)
    losses = [float(r["loss"]) for r in rows]
    return {
        "side": "vlaflow",
        "what": "vlaflow.train.train: the whole loop on the real store (batches, AdamW, EMA, clip, log)",
        "samples_per_s": len(timed) * every * batch / seconds,
        "steps_per_s": len(timed) * every / seconds,
        "steps": len(timed) * every,
        "warmup_steps": warmup,
        "batch_size": batch,
        "threads": torch.get_num_threads(),
        "overrides": overrides,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "loop_samples_per_s_incl_warmup": res.samples_per_s,
    }


def vlaflow_phases(data: str, steps: int, warmup: int, threads: int, batch: int) -> dict:
    """CPU ms per step in each phase of the loop's step, replayed with the loop's own pieces."""
    import copy
    import time

    import torch

    import vlaflow.train.schedule as S
    from vlaflow.train import get_preset
    from vlaflow.train.loop import _Ema, clip_grad_norm
    from vlaflow.train.objectives.bc import BehaviourCloning
    from vlaflow.train.trainer import build_run_policy, open_training_data

    torch.set_num_threads(threads)
    cfg = get_preset(PRESET)
    store, ws, stats = open_training_data(cfg, data)
    torch.manual_seed(0)
    policy = build_run_policy(cfg, stats, store)
    obj = BehaviourCloning(policy, ws, batch_size=batch, seed=0, rank=0, world=1)
    ema = _Ema(copy.deepcopy(policy).requires_grad_(False), policy)
    params = obj.param_groups()[0]["params"]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, foreach=True)
    phases: dict[str, float] = {}
    clock = time.process_time

    def tick(name: str, t0: float) -> float:
        phases[name] = phases.get(name, 0.0) + clock() - t0
        return clock()

    for i in range(warmup + steps):
        if i == warmup:
            phases.clear()
        t = clock()
        b = obj.batch(i)  # on the loop's background thread in training
        t = tick("batch (background)", t)
        torch.manual_seed(S.step_seed(0, i))
        loss, _ = obj.loss(b)
        t = tick("forward", t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t = tick("backward", t)
        gn = clip_grad_norm(params, 10.0)
        ok = bool((torch.isfinite(loss.detach()) & torch.isfinite(gn)).item())
        opt.step()
        t = tick("clip+optimizer", t)
        ema.update(0.99)
        tick("ema", t)
        assert ok
    return {
        "side": "vlaflow",
        "what": "CPU ms per step by phase (the loop's step, replayed with its own pieces)",
        "cpu_ms": {k: 1e3 * v / steps for k, v in phases.items()},
        "threads": torch.get_num_threads(),
    }


def vlaflow_params(data: str) -> int:
    from vlaflow.train import get_preset
    from vlaflow.train.trainer import build_run_policy, open_training_data

    cfg = get_preset(PRESET)
    store, _, stats = open_training_data(cfg, data)
    return sum(p.numel() for p in build_run_policy(cfg, stats, store).parameters())


def write_real_batches(data: str, path: Path, n: int) -> None:
    """``n`` PushT windows of the store in LeRobot's keys: state = agent position, env = keypoints."""
    import numpy as np

    from vlaflow.train import get_preset
    from vlaflow.train.trainer import open_training_data

    _, ws, _ = open_training_data(get_preset(PRESET), data)
    b = ws.get_batch(np.random.default_rng(0).permutation(len(ws))[:n])
    np.savez(
        path,
        state=b["obs.agent_pos"].astype(np.float32),
        env=b["obs.keypoint"].reshape(n, b["obs.keypoint"].shape[1], -1).astype(np.float32),
        action=b["action"].astype(np.float32),
        action_is_pad=b["action_is_pad"],
    )


def _run_json(cmd: list[str], env: dict | None = None) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _md(doc: dict) -> str:
    s = doc["summary"]
    lines = [
        "# Training throughput: vlaflow vs LeRobot 0.4.4 (PushT low-dim U-Net, batch 256)",
        "",
        f"{doc['when']}, {doc['machine']['processor']} x {doc['machine']['cpu_count']} CPUs, "
        f"{doc['threads']} torch threads; parameters: vlaflow {doc['parameters']['vlaflow']:,}, "
        f"LeRobot {doc['parameters']['lerobot']:,}.",
        "",
        "| side | samples/s (median) | per round | what is timed |",
        "|---|---:|---|---|",
    ]
    for side in doc["commands"]:
        rounds = ", ".join(f"{r[side]['samples_per_s']:.0f}" for r in doc["rounds"])
        what = doc["rounds"][0][side]["what"] + (" + train.fused_adamw=true" if "fused" in side else "")
        lines.append(f"| {side} | **{s[side]:.0f}** | {rounds} | {what} |")
    fused = (
        f"; with train.fused_adamw=true **{s['ratio_fused']:.2f}x** "
        f"({', '.join(f'{r:.2f}' for r in s['ratios_fused'])})"
        if "ratio_fused" in s
        else ""
    )
    lines += [
        "",
        f"Ratio vlaflow / LeRobot: **{s['ratio']:.2f}x** (median of per-round ratios "
        f"{', '.join(f'{r:.2f}' for r in s['ratios'])}){fused}. Load average before each measurement: "
        f"{', '.join(f'{x:.2f}' for x in s['load_avgs'])}.",
        "",
        *_phases_md(doc.get("phases") or {}),
        f"Repeat: `{doc['command']}`",
        "",
        f"vlaflow: torch {doc['versions']['vlaflow_side'].get('torch')}; LeRobot side: "
        f"{json.dumps(doc['versions']['lerobot_side'])}.",
        "",
    ]
    return "\n".join(lines)


def _phases_md(phases: dict) -> list[str]:
    if not phases:
        return []
    names = list(dict.fromkeys([*phases["vlaflow"]["cpu_ms"], *phases["lerobot"]["cpu_ms"]]))
    lines = [
        "Where the time goes (CPU ms per step at 1 thread -- CPU time, which other jobs on a shared",
        "machine disturb less than wall time -- each side's step replayed phase by phase):",
        "",
    ]
    lines += ["| phase | vlaflow | LeRobot |", "|---|---:|---:|"]
    for n in names:
        v, le = phases["vlaflow"]["cpu_ms"].get(n), phases["lerobot"]["cpu_ms"].get(n)
        lines.append(f"| {n} | {'' if v is None else f'{v:.1f}'} | {'' if le is None else f'{le:.1f}'} |")
    return [*lines, ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="ingested PushT episode store")
    ap.add_argument("--rounds", type=int, default=3, help="alternating vlaflow / LeRobot measurement rounds")
    ap.add_argument("--steps", type=int, default=30, help="timed optimiser steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (also the log interval)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads on both sides")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--synthetic", action="store_true", help="LeRobot on random batches, not the store's")
    ap.add_argument("--lerobot-python", default=LEROBOT_PY, help="python of the LeRobot venv")
    ap.add_argument("--out", default=str(RESULTS / "vs_lerobot.json"))
    ap.add_argument("--phases", action="store_true", help="also a CPU-time breakdown by phase (1 thread)")
    ap.add_argument(
        "--fused-row", action="store_true", help="also vlaflow with train.fused_adamw=true in every round"
    )
    ap.add_argument("--side", choices=("vlaflow", "vlaflow-phases"), help=argparse.SUPPRESS)  # JSON out
    ap.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="vlaflow training overrides")
    args = ap.parse_args(argv)
    if args.side == "vlaflow":
        print(
            json.dumps(
                vlaflow_train(args.data, args.steps, args.warmup, args.threads, args.batch, args.overrides)
            )
        )
        return 0
    if args.side == "vlaflow-phases":
        print(json.dumps(vlaflow_phases(args.data, 10, 3, args.threads, args.batch)))
        return 0

    sys.path.insert(0, str(HERE))
    from _meta import run_info

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    lerobot = [args.lerobot_python, str(HERE / "lerobot_side.py")]
    ours = vlaflow_params(args.data)
    theirs = _run_json([*lerobot, "params", "--threads", str(args.threads)], env)["parameters"]
    print(f"parameters: vlaflow {ours:,}, LeRobot {theirs:,}")
    if ours != theirs:
        raise SystemExit("the two nets differ in size; the comparison would not be like for like")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "pusht_windows.npz"
        if not args.synthetic:
            write_real_batches(args.data, batches, 8 * args.batch)
        vl_cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "vlaflow", "--data", args.data]
        vl_cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        vl_cmd += ["--batch", str(args.batch), *args.overrides]
        le_cmd = [*lerobot, "train", "--threads", str(args.threads), "--batch", str(args.batch)]
        le_cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        le_cmd += [] if args.synthetic else ["--batches", str(batches)]
        sides = {"vlaflow": vl_cmd, "lerobot": le_cmd}
        if args.fused_row:
            sides["vlaflow fused"] = [*vl_cmd, "train.fused_adamw=true"]
        for r in range(args.rounds):
            row = {}
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                load = os.getloadavg()[0]
                row[side] = _run_json(sides[side], env)
                row[side]["load_avg_before"] = load
                print(
                    f"round {r + 1}: {side:14s} {row[side]['samples_per_s']:7.0f} samples/s (load {load:.2f})"
                )
            row["ratio"] = row["vlaflow"]["samples_per_s"] / row["lerobot"]["samples_per_s"]
            if args.fused_row:
                row["ratio_fused"] = row["vlaflow fused"]["samples_per_s"] / row["lerobot"]["samples_per_s"]
            rounds.append(row)
        phases = {}
        if args.phases:
            ph_cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "vlaflow-phases"]
            ph_cmd += ["--data", args.data, "--threads", "1", "--batch", str(args.batch)]
            phases["vlaflow"] = _run_json(ph_cmd, env)
            le_ph = [*lerobot, "phases", "--threads", "1", "--batch", str(args.batch)]
            phases["lerobot"] = _run_json(
                le_ph + ([] if args.synthetic else ["--batches", str(batches)]), env
            )
    ratios = [r["ratio"] for r in rounds]
    summary = {side: statistics.median(r[side]["samples_per_s"] for r in rounds) for side in sides}
    summary |= {"ratio": statistics.median(ratios), "ratios": ratios}
    if args.fused_row:
        summary["ratios_fused"] = [r["ratio_fused"] for r in rounds]
        summary["ratio_fused"] = statistics.median(summary["ratios_fused"])
    summary["load_avgs"] = [r[side]["load_avg_before"] for r in rounds for side in sides]
    info = run_info()
    doc = {
        **info,
        "threads": args.threads,
        "batch_size": args.batch,
        "parameters": {"vlaflow": ours, "lerobot": theirs},
        "summary": summary,
        "rounds": rounds,
        "phases": phases,
        "commands": {side: " ".join(cmd) for side, cmd in sides.items()},
        "versions": {"vlaflow_side": info["versions"], "lerobot_side": rounds[0]["lerobot"]["versions"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(_md(doc))
    v, le = summary["vlaflow"], summary["lerobot"]
    print(f"vlaflow {v:.0f} vs LeRobot {le:.0f} samples/s: {summary['ratio']:.2f}x")
    print(f"-> {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
