"""Meta-World MT10: one language-conditioned policy for ten tasks, from 50 expert demos per task.

The whole protocol, each step skipped when its output exists (so a finished run is only summarised):

    vlaflow collect --task mw:mt10 --episodes 50 --out STORE [--obs-mode image --image-size 84]
    vlaflow train --preset PRESET --data STORE --out RUN [overrides]       # final eval: 50 per task
    vlaflow eval --task mw:mt10 --policy RUN/checkpoints/last --episodes-per-task 50 --workers 2  (if asked)

Demonstrations use the training seeds 0.. (Meta-World's own goal/object sampler); evaluation the
held-out seeds 100000..100049 of every task, up to 500 steps, success = the env's success flag. The
score is the last (EMA) checkpoint's; no checkpoint is chosen on the evaluation seeds. Writes
``results/metaworld_mt10_<obs>.json`` (per-task table, average with its Wilson interval, training
minutes, the periodic evaluations, command, machine, versions) and the Markdown beside it.

    MUJOCO_GL=egl python benchmarks/metaworld_mt10.py --preset mt10_lowdim_language_diffusion \
        --data runs/mt10.zarr --run runs/mt10_lowdim
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

from vlaflow.sim.multitask import format_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def sh(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def final_report(run: Path, eval_dir: Path | None) -> Path:
    if eval_dir is not None:
        return eval_dir / "report.json"
    steps = sorted((run / "eval").glob("step_*"))
    if not steps:
        sys.exit(f"{run}: no evaluation report under eval/ (train with an eval task, or pass --reeval)")
    return steps[-1] / "report.json"


def summarise(args, report_path: Path) -> dict:
    report = json.loads(report_path.read_text())
    rows = list(csv.DictReader((args.run / "log.csv").open()))
    train_rows = [r for r in rows if r["kind"] == "train"]
    periodic = [
        {"step": int(r["step"]), "success_rate": float(r["success_rate"])}
        for r in rows
        if r["kind"] == "eval" and r["success_rate"]
    ]
    cfg = json.loads((args.run / "run_config.json").read_text())
    agg = report["aggregate"]
    return {
        "preset": args.preset,
        "obs_mode": report["obs_mode"],
        "store": str(args.data),
        "run": str(args.run),
        "train_steps": int(train_rows[-1]["step"]),
        "train_minutes": round(float(train_rows[-1]["elapsed_s"]) / 60, 1),
        "batch_size": cfg["train"]["batch_size"],
        "torch_threads": cfg["train"]["num_threads"] or "auto",
        "eval": {
            "report": str(report_path),
            "episodes_per_task": report["episodes_per_task"],
            "seeds": report["seeds"],
            "goal_split": sorted({e.get("goal_split", "") for e in report["episodes"]}),
            "workers": report["workers"],
            "wall_s": round(agg["wall_s"], 1),
        },
        "average_success": agg["success_rate"],
        "average_success_ci95": agg["success_ci95"],
        "target": ">= 0.80 average over 50 episodes per task",
        "pass": agg["success_rate"] >= 0.80,
        "per_task": {
            t: {k: a[k] for k in ("success_rate", "success_ci95", "n_episodes", "mean_length")}
            for t, a in report["per_task"].items()
        },
        "periodic_eval_success": periodic,
        "table": format_table(report),
    }


def render_md(res: dict) -> str:
    info = res["run_info"]
    load0 = [round(x, 1) for x in info["machine"]["load_avg_at_start"]]
    flags = " --obs-mode image --image-size 84" if res["obs_mode"] == "image" else ""
    periodic = ", ".join(f"{p['success_rate']:.0%} @ {p['step']}" for p in res["periodic_eval_success"])
    return "\n".join(
        [
            f"# Meta-World MT10, {res['obs_mode']}: `{res['preset']}`",
            "",
            f"`{info['command']}` at {info['when']} (commit {info['git_commit']}), "
            f"{info['machine']['cpu_count']} CPUs shared with other jobs (load {load0} when summarised).",
            "",
            f"- data: `vlaflow collect --task mw:mt10 --episodes 50{flags}` (seeds 0.., 500 episodes) -> "
            f"`{res['store']}`",
            f"- training: {res['train_steps']} steps at batch {res['batch_size']} in "
            f"**{res['train_minutes']} min** of training time ({res['torch_threads']} torch thread(s); "
            "rollouts not counted)",
            f"- evaluation: {res['eval']['episodes_per_task']} episodes per task on seeds "
            f"{res['eval']['seeds'][0]}..{res['eval']['seeds'][1]} (goal split {res['eval']['goal_split']}), "
            f"last EMA checkpoint, {res['eval']['workers']} workers, {res['eval']['wall_s']} s",
            f"- average success **{100 * res['average_success']:.1f}%** (95% CI "
            f"{100 * res['average_success_ci95'][0]:.1f}-{100 * res['average_success_ci95'][1]:.1f}%); "
            f"target >= 80%: {'met' if res['pass'] else 'not met'}",
            f"- rollouts during training (10 episodes per task on the same seeds; the last is the final "
            f"evaluation above): {periodic}",
            *([f"- note: {res['note']}"] if res.get("note") else []),
            "",
            res["table"],
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mt10_lowdim_language_diffusion")
    ap.add_argument("--data", type=Path, required=True, help="MT10 store (collected when missing)")
    ap.add_argument("--run", type=Path, required=True, help="training run directory (trained when missing)")
    ap.add_argument("--image-size", type=int, default=84, help="camera side when collecting image data")
    ap.add_argument("--reeval", type=Path, default=None, help="evaluate again into this directory")
    ap.add_argument("--report", type=Path, default=None, help="summarise this evaluation report instead")
    ap.add_argument("--episodes", type=int, default=50, help="episodes per task (with --reeval)")
    ap.add_argument("--note", default="", help="a remark for the results (e.g. the machine's load)")
    ap.add_argument("overrides", nargs="*", help="training overrides, e.g. train.max_minutes=30")
    args = ap.parse_args()
    image = "image" in args.preset
    if not args.data.exists():
        extra = ["--obs-mode", "image", "--image-size", str(args.image_size)] if image else []
        sh(["vlaflow", "collect", "--task", "mw:mt10", "--episodes", "50", "--out", str(args.data), *extra])
    if not (args.run / "run_config.json").exists():
        sh(["vlaflow", "train", "--preset", args.preset, "--data", str(args.data), "--out", str(args.run)]
           + ["train.progress=false", *args.overrides])  # fmt: skip
    if args.reeval is not None:
        ckpt = str(args.run / "checkpoints" / "last")
        n = str(args.episodes)
        sh(["vlaflow", "eval", "--task", "mw:mt10", "--policy", ckpt, "--episodes-per-task", n,
            "--workers", "2", "--out", str(args.reeval), "--quiet"])  # fmt: skip
    report = args.report or final_report(args.run, args.reeval)
    res = summarise(args, report)
    res["run_info"] = run_info(("vlaflow", "numpy", "torch", "mujoco", "metaworld"))
    res["note"] = args.note
    name = f"metaworld_mt10_{'image' if image else 'lowdim'}"
    shutil.copyfile(report, RESULTS / f"{name}_report.json")  # every episode
    res["eval"]["report_copy"] = f"benchmarks/results/{name}_report.json"
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(render_md(res))
    print(render_md(res))


if __name__ == "__main__":
    main()
