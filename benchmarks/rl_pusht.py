"""RL refinement on PushT low-dim from an imitation checkpoint, success before / after on held-out seeds.

    nice -n 10 python benchmarks/rl_pusht.py --policy /work/base/diffusion/checkpoints/last \\
        --data /work/base/pusht.zarr --out /tmp/rl_pusht --minutes 40 [--algo rl100|dsrl|dppo] \\
        [--clipfrac] [--task pick_place] [FIELD=VALUE ...]

1. ``vlaflow eval`` of the policy on the 200 held-out seeds 100000..100199 (the paper's 50 are the first 50).
2. Optionally (``--clipfrac``) one DPPO iteration each with ``dppo.logprob=sum`` at lr 1e-4 and
   ``mean_executed`` at lr 1e-4 and 3e-5, clip 0.01: the PPO clip fraction of the iteration's last update.
3. ``vlaflow refine --algo ALGO`` on training seeds only (rl100 collects on 20000.., DSRL on 50000..,
   DPPO on 0..): rl100 for as many iterations as fit the time left (its per-iteration rows: gate
   estimates, accepted, env steps, wall); dsrl / dppo for ``--rl-minutes`` of training wall time, with no
   held-out evaluation during the run, so nothing is selected on the evaluation seeds: the result is
   ``checkpoints/last``.
4. ``vlaflow eval`` of the result on the same 200 seeds.

Everything is bounded by ``--minutes`` (each step gets the time left). Appends one row to
``benchmarks/results/rl.json`` (command, machine, versions beside the numbers) and rewrites ``rl.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import append_rows, run_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = "100000..100199 (held out; RL-100 collects on 20000.., DPPO on 0..)"


class OutOfTime(Exception):
    pass


class Done(Exception):
    """The requested parts are done (``--clipfrac-only``, or a dsrl / dppo run evaluated)."""


def vlaflow(deadline: float, *args: str) -> subprocess.CompletedProcess:
    left = deadline - time.time()
    if left < 30:
        raise OutOfTime(" ".join(args[:2]))
    try:
        return subprocess.run(
            [sys.executable, "-m", "vlaflow.cli", *args], capture_output=True, text=True, timeout=left
        )
    except subprocess.TimeoutExpired as e:
        raise OutOfTime(" ".join(args[:2])) from e


def evaluate(
    deadline: float, policy: str, out: Path, episodes: int, reuse: str = "", task: str = "pusht"
) -> dict:
    """Held-out evaluation of ``policy`` (or the report of an earlier ``vlaflow eval`` of it in ``reuse``)."""
    t0 = time.time()
    if reuse:
        out = Path(reuse)
    else:
        ev = vlaflow(
            deadline, "eval", "--task", task, "--policy", policy, "--episodes", str(episodes),
            "--workers", "2", "--out", str(out), "--quiet",
        )  # fmt: skip
        if ev.returncode:
            raise RuntimeError(ev.stderr[-3000:])
    rep = json.loads((out / "report.json").read_text())
    if reuse and (rep["aggregate"]["n_episodes"] != episodes or Path(rep["policy"]) != Path(policy)):
        raise RuntimeError(f"{reuse}: not {episodes} episodes of {policy}: {rep['policy']}")
    agg, eps = rep["aggregate"], sorted(rep["episodes"], key=lambda e: e["seed"])
    first = eps[:50]
    return {
        "score": agg["mean_score"],
        "success_rate": agg["success_rate"],
        "success_ci95": agg.get("success_ci95"),
        "n_episodes": agg["n_episodes"],
        "first50_success": sum(bool(e["success"]) for e in first) / max(len(first), 1),
        "first50_score": sum(min(e["max_reward"], 1.0) for e in first) / max(len(first), 1),
        "seeds": [eps[0]["seed"], eps[-1]["seed"]] if eps else None,
        "wall_s": agg.get("wall_s") if reuse else round(time.time() - t0, 1),
        "reused_report": str(out / "report.json") if reuse else None,
        "per_seed": per_seed(rep),
    }


def per_seed(rep: dict) -> str:
    """The report's successes in seed order as a 0/1 string (for the paired test between rows)."""
    return "".join("1" if e["success"] else "0" for e in sorted(rep["episodes"], key=lambda e: e["seed"]))


def mcnemar(x: str, y: str) -> tuple[int, int, float]:
    """Paired test on the same seeds: (x only, y only, exact two-sided McNemar p)."""
    n10 = sum(a == "1" and b == "0" for a, b in zip(x, y, strict=True))
    n01 = sum(a == "0" and b == "1" for a, b in zip(x, y, strict=True))
    n, k = n10 + n01, min(n10, n01)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return n10, n01, p


def annotate(results: Path, when: str, reports: list[str]) -> None:
    """Add ``per_seed`` to the evaluations of row ``when`` from their saved reports (``name=DIR``)."""
    rows = json.loads((results / "rl.json").read_text())
    row = next(r for r in rows if r["when"] == when)
    for item in reports:
        name, d = item.split("=", 1)
        rep = json.loads((Path(d) / "report.json").read_text())
        if len(rep["episodes"]) != row[name]["n_episodes"]:
            raise SystemExit(
                f"{d}: {len(rep['episodes'])} episodes, the row's {name} has {row[name]['n_episodes']}"
            )
        row[name]["per_seed"] = per_seed(rep)
    (results / "rl.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_md(rows, results / "rl.md")


def clipfracs(deadline: float, policy: str, out: Path) -> list[dict]:
    rows = []
    for logprob, lr in (("sum", 1e-4), ("mean_executed", 1e-4), ("mean_executed", 3e-5)):
        run = out / f"dppo_{logprob}_{lr:g}"
        rf = vlaflow(
            deadline, "refine", "--policy", policy, "--algo", "dppo", "--out", str(run), "iterations=1",
            f"lr={lr}", f"dppo.logprob={logprob}", "dppo.clip=0.01", "eval_episodes=0", "final_episodes=0",
            "progress=false",
        )  # fmt: skip
        if rf.returncode:
            raise RuntimeError(rf.stderr[-3000:])
        with open(run / "log.csv", newline="") as f:
            train = [r for r in csv.DictReader(f) if r["kind"] == "train"]
        last = train[-1]  # refine logs one row per iteration: the metrics of its last update
        rows.append(
            {
                "logprob": logprob,
                "lr": lr,
                "clip": 0.01,
                "updates": int(float(last["step"])),
                "clipfrac_last_update": float(last["clipfrac"]),
                "approx_kl_last_update": float(last["approx_kl"]),
                "env_steps": float(last["env_steps"]),
            }
        )
    return rows


def zero_noise_policy(policy: str, out: Path, width: int = 256) -> str:
    """The DSRL starting point as deployed: the steered policy whose actor is at its zero init (w = 0)."""
    from vlaflow.policies import load_checkpoint, save_checkpoint
    from vlaflow.policies.steered.actor import NoiseActor
    from vlaflow.policies.steered.model import SteeredPolicy

    base = load_checkpoint(policy)
    actor = NoiseActor(base.n_cond_tokens * base.cond_dim, math.prod(base.target_shape), 1.5, width)
    return str(save_checkpoint(out, SteeredPolicy.wrap(base, actor, width)))


def online(deadline: float, a, row: dict, out: Path) -> None:
    """``vlaflow refine --algo dsrl|dppo|world4rl`` for ``--rl-minutes``, then the held-out evaluation of
    ``last`` (or, with ``--select-every``, of ``best`` as chosen on validation seeds 90000..). world4rl:
    PPO in the frozen ``--world-model``, starts from ``--data``'s episode starts; its count of real env
    steps during RL is kept."""
    run = out / a.algo
    if a.algo == "dsrl" and a.zero_noise:
        zero = zero_noise_policy(a.policy, out / "zero_noise")
        row["zero_noise"] = evaluate(deadline, zero, out / "zero_noise_eval", a.episodes, task=a.task)
    t1 = time.time()
    wm = ["--world-model", a.world_model, "--starts", a.data] if a.algo == "world4rl" else []
    # no selection (the result is `last`), or best-of on validation seeds 90000.. (never the held-out ones)
    select = ["eval_every=0", "eval_episodes=0"]
    if a.select_every:
        select = [f"eval_every={a.select_every}", f"eval_episodes={a.select_episodes}"]
        select.append("eval_seed_start=90000")
    rf = vlaflow(
        deadline - 1.3 * float(row["before"]["wall_s"] or 0),
        "refine", "--policy", a.policy, "--task", a.task, "--algo", a.algo, "--out", str(run), *wm,
        "iterations=100000",
        f"max_minutes={a.rl_minutes}", *select, "final_episodes=0", "progress=false", *a.overrides,
    )  # fmt: skip
    if rf.returncode:
        raise RuntimeError(rf.stderr[-3000:])
    row["rl_wall_s"] = round(time.time() - t1, 1)
    with open(run / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    train = [r for r in log if r["kind"] == "train"]
    row["env_steps"] = int(float(train[-1]["env_steps"])) if train else 0
    row["updates"] = int(float(train[-1]["step"])) if train else 0
    row["curve"] = [
        {k: r.get(k) for k in ("step", "elapsed_s", "env_steps", "rollout_success", "rollout_return")}
        for r in train
    ]
    row["curves_png"] = str(run / "rl_curves.png")
    if a.algo == "world4rl":
        row["world4rl"] = json.loads((run / "world4rl.json").read_text())
        row["env_steps"] = row["world4rl"]["real_env_steps_during_rl"]  # real steps; imagined ones apart
    best = run / "checkpoints" / "best"
    row["after_policy"] = str(best if a.select_every and best.exists() else run / "checkpoints" / "last")
    if a.select_every:
        row["selection"] = {
            "seeds": f"90000.. ({a.select_episodes} per evaluation, every {a.select_every} rounds)",
            "evals": [r for r in log if r["kind"] == "eval"],
        }
    row["after"] = evaluate(deadline, row["after_policy"], out / "after", a.episodes, task=a.task)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="")
    ap.add_argument("--data", default="", help="the demonstrations the policy was trained on")
    ap.add_argument("--out", default="", help="scratch directory (must not exist)")
    ap.add_argument("--minutes", type=float, default=40.0, help="bound on the whole benchmark")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--clipfrac", action="store_true", help="also measure DPPO's clip fractions")
    ap.add_argument("--clipfrac-only", action="store_true", help="only DPPO's clip fractions (no rl100)")
    ap.add_argument("--note", default="", help="what the policy is")
    ap.add_argument("--results", default=str(RESULTS), help="where rl.json / rl.md go")
    ap.add_argument("--before", default="", help="reuse this `vlaflow eval --out` of --policy (same seeds)")
    ap.add_argument("--annotate", default="", help="only add per-seed successes to the row of this time")
    ap.add_argument("--report", action="append", default=[], help="with --annotate: NAME=EVAL_DIR")
    ap.add_argument("--task", default="pusht", help="sim task with a reward (pusht, pick_place)")
    ap.add_argument("--algo", default="rl100", choices=("rl100", "dsrl", "dppo", "world4rl"))
    ap.add_argument("--world-model", default="", help="world4rl: the frozen world-model checkpoint")
    ap.add_argument("--zero-noise", action="store_true", help="dsrl: also evaluate w = 0 steering")
    ap.add_argument(
        "--select-every", type=int, default=0,
        help="dsrl / dppo: evaluate every N rounds on validation seeds 90000.. and report checkpoints/best",
    )  # fmt: skip
    ap.add_argument("--select-episodes", type=int, default=50, help="episodes per validation evaluation")
    ap.add_argument("--rl-minutes", type=float, default=30.0, help="dsrl / dppo / world4rl: RL wall time")
    ap.add_argument("overrides", nargs="*", help="refine FIELD=VALUE settings of the RL run")
    a = ap.parse_args()
    if a.annotate:
        annotate(Path(a.results), a.annotate, a.report)
        return 0
    if not (a.policy and a.data and a.out):
        ap.error("--policy, --data and --out are required (unless --annotate)")
    if (a.algo == "world4rl") != bool(a.world_model):
        ap.error("--world-model goes with --algo world4rl (and world4rl needs one)")
    if a.task != "pusht" and a.algo in ("rl100", "world4rl"):
        ap.error(f"--task {a.task}: only dsrl / dppo rows here (rl100 and world4rl are PushT's)")
    if a.select_every and a.algo == "rl100":
        ap.error("--select-every is for dsrl / dppo / world4rl (rl100's gate does its own selection)")
    out = Path(a.out)
    out.mkdir(parents=True)
    t0 = time.time()
    deadline = t0 + 60 * a.minutes
    algo = {"rl100": "rl100 (offline iterations only)"}.get(a.algo, a.algo)
    row: dict = {"algo": algo, "task": a.task, "policy": a.policy, "policy_note": a.note}
    row.update({"data": a.data, "overrides": a.overrides, "seeds": SEEDS, "complete": False})
    try:
        if a.clipfrac_only:
            row["algo"] = "dppo clip-fraction probe (one iteration per setting; no success measured)"
            row["dppo_clipfrac"] = clipfracs(deadline, a.policy, out)
            raise Done
        row["before"] = evaluate(deadline, a.policy, out / "before", a.episodes, a.before, a.task)
        if a.clipfrac:
            row["dppo_clipfrac"] = clipfracs(deadline, a.policy, out)
        if a.algo != "rl100":
            online(deadline, a, row, out)
            raise Done
        run = out / "rl100"
        t1 = time.time()
        try:
            reserve = max(60 * 0.25 * a.minutes, 1.3 * float(row["before"]["wall_s"] or 0))
            rf = vlaflow(
                deadline - reserve,  # leave the evaluation after the time the one before took (+30 %)
                "refine", "--policy", a.policy, "--algo", "rl100", "--data", a.data, "--out", str(run),
                "progress=false", "eval_episodes=0", "final_episodes=0", *a.overrides,
            )  # fmt: skip
            if rf.returncode:
                raise RuntimeError(rf.stderr[-3000:])
            row["rl100_finished"] = True
        except OutOfTime:
            row["rl100_finished"] = False  # killed at the time bound: the iterations done so far count
        row["rl100_wall_s"] = round(time.time() - t1, 1)
        log = run / "rl100_log.jsonl"
        row["iterations"] = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        state = json.loads((run / "rl100_state.json").read_text())
        row["env_steps"] = state["env_steps"]
        after = str(run / "final") if (run / "final").exists() else state["current"]
        row["after_policy"] = after
        if after != a.policy:
            row["after"] = evaluate(deadline, after, out / "after", a.episodes)
        row["complete"] = True
    except Done:
        row["complete"] = True
    except OutOfTime as e:
        row["stopped"] = f"time bound of {a.minutes} min reached during {e}"
    row["total_wall_s"] = round(time.time() - t0, 1)
    row.update(run_info())
    res = Path(a.results)
    append_rows(res / "rl.json", [row])
    write_md(json.loads((res / "rl.json").read_text()), res / "rl.md")
    print(json.dumps({k: row.get(k) for k in ("before", "after", "env_steps", "total_wall_s")}, indent=1))
    return 0


def _pct(ev: dict | None, key: str = "success_rate") -> str:
    if not ev:
        return "-"
    ci = ev.get("success_ci95") if key == "success_rate" else None
    s = f"{100 * ev[key]:.1f}%"
    return s + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def write_md(rows: list[dict], path: Path) -> None:
    lines = [
        "# RL refinement on PushT low-dim (benchmarks/rl_pusht.py)",
        "",
        "Held-out seeds 100000..100199 (200 episodes, 300 steps; first 50 = the paper's), success =",
        "max coverage > 0.95 (95% interval), score = mean max clip(coverage / 0.95). Every row's command,",
        "machine and versions are in rl.json. Rows marked `(pick_place)` are the demo task instead",
        "(pybullet Panda, low-dim, 120 steps, the same held-out seeds drawn by the task's own reset;",
        "success = the cube rests released inside the tray, its only reward, so score = success there).",
        "",
        "| when | algo | policy | success before | after | first-50 before / after | score before / after "
        "| iterations (accepted) / updates | env steps | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, af = r.get("before"), r.get("after")
        its = r.get("iterations", [])
        acc = sum(bool(i.get("accepted")) for i in its)
        f50 = f"{_pct(b, 'first50_success')} / {_pct(af, 'first50_success')}"
        done_col = f"{r['updates']} updates" if "updates" in r else f"{len(its)} ({acc})"
        sc = f"{b['score']:.3f}" if b else "-"
        sc += f" / {af['score']:.3f}" if af else " / -"
        task = f" ({r['task']})" if r.get("task", "pusht") != "pusht" else ""
        lines.append(
            f"| {r['when']} | {r['algo']}{task} | {r['policy']} | {_pct(b)} | {_pct(af)} | {f50} | {sc} | "
            f"{done_col} | "
            f"{r.get('env_steps', '-')} | {r['total_wall_s']} |"
        )
    for r in rows:
        if r.get("iterations"):
            head = (
                "| it | gate cand / current | accepted | collected success | env steps total | wall s total |"
            )
            lines += ["", f"Per iteration ({r['when']}):", "", head, "|---|---|---|---|---|---|"]
            for i in r["iterations"]:
                col = i.get("collected") or {}
                lines.append(
                    f"| {i['iteration']} | {i['gate_candidate']:.3f} / {i['gate_current']:.3f} | "
                    f"{i['accepted']} | {col.get('success', '-')} | {i['env_steps_total']} | "
                    f"{i['wall_s_total']} |"
                )
        if r.get("dppo_clipfrac"):
            head = "| logprob | lr | updates | clipfrac (last update) | approx KL (last update) |"
            lines += ["", f"DPPO clip fraction at clip 0.01, one iteration ({r['when']}):", ""]
            lines += [head, "|---|---|---|---|---|"]
            for c in r["dppo_clipfrac"]:
                lines.append(
                    f"| {c['logprob']} | {c['lr']:g} | {c['updates']} | {c['clipfrac_last_update']:.3f} | "
                    f"{c['approx_kl_last_update']:.2e} |"
                )
        paired = [("after", "before"), ("after", "zero_noise")]
        pairs = [
            (x, y) for x, y in paired if (r.get(x) or {}).get("per_seed") and (r.get(y) or {}).get("per_seed")
        ]
        for x, y in pairs:
            n10, n01, p = mcnemar(r[x]["per_seed"], r[y]["per_seed"])
            lines += [
                "",
                f"Paired on the same seeds ({r['when']}, {x} vs {y}): {n10} seeds succeed only {x}, "
                f"{n01} only {y}; exact McNemar p = {p:.3g}.",
            ]
        if r.get("zero_noise"):
            z = r["zero_noise"]
            lines += [
                "",
                f"DSRL's start as deployed ({r['when']}): the base denoised from w = 0 (actor at init),"
                f" success {_pct(z)}, first 50 {_pct(z, 'first50_success')}, score {z['score']:.3f}.",
            ]
        if r.get("selection"):
            ev = r["selection"]["evals"]
            got = ", ".join(f"{float(e['success_rate']):.2f} @ {int(float(e['step']))}" for e in ev)
            lines += [
                "",
                f"Selection ({r['when']}): `best` chosen on validation seeds {r['selection']['seeds']}, "
                f"success @ update: {got}; the held-out row evaluates `{Path(r['after_policy']).name}`.",
            ]
        if r.get("stopped"):
            lines += ["", f"Note ({r['when']}): {r['stopped']}."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
