"""The two-cube instruction-following probe (``probe:two_cubes``): does a policy read the instruction?

``pick_place_two_red`` and ``pick_place_two_blue`` show the same scenes for the same seeds (a red and a blue
cube, a tray) and differ only in the instruction ("put the red cube in the tray" / "... blue ..."), so a
policy that ignores the instruction follows it in at most about half of the episodes. Per instruction:

- the scripted expert (which reads the target from the env) over ``--experts`` seeds;
- with ``--policy CKPT``: the policy through ``vlaflow eval --task probe:two_cubes`` (same seeds for both
  instructions).

Measures (``TwoCubePickPlaceEnv.episode_metrics``): success; ``followed`` (success, or the first cube the
grasp point came within 2.5 cm of was the instructed one); the wrong cube reached first; the instructed /
the wrong cube lifted first (3 cm).

Target (issue 16): >= 90% of episodes follow the given instruction, for each instruction.

    python benchmarks/instruction_probe.py [--experts 100] [--policy RUN/checkpoints/last --episodes 50]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

from vlaflow.sim.collect import rollout_expert  # noqa: E402
from vlaflow.sim.evaluate import evaluate  # noqa: E402
from vlaflow.sim.experts import make_expert  # noqa: E402
from vlaflow.sim.harness import wilson_interval  # noqa: E402
from vlaflow.sim.tasks import TASK_SETS, make_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROBE = "probe:two_cubes"
SEED = 100000
METRICS = ("followed", "wrong_cube_reached", "target_lifted", "wrong_cube_lifted")


def rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else 0.0, "ci95": [round(lo, 4), round(hi, 4)]}


def experts(n: int) -> dict:
    out = {}
    for task in TASK_SETS[PROBE]:
        env = make_env(task)
        expert = make_expert(task, env)
        counts = dict.fromkeys(("success", *METRICS), 0)
        for s in range(SEED, SEED + n):
            ro = rollout_expert(env, expert, s, env.task_spec.max_steps, record=False)
            counts["success"] += ro.success
            for m, v in env.episode_metrics().items():
                counts[m] += v == 1.0
        out[task] = {"instruction": env.task_spec.instruction, **{k: rate(v, n) for k, v in counts.items()}}
        env.close()
        print(task, out[task], flush=True)
    return out


def policy_probe(policy: str, episodes: int, workers: int, out_dir: Path) -> dict:
    report = evaluate(
        policy, task=PROBE, n_episodes=episodes, start_seed=SEED, workers=workers, out_dir=out_dir
    )
    out = {}
    for task in TASK_SETS[PROBE]:
        eps = [e for e in report["episodes"] if e["task"] == task]
        n = len(eps)
        out[task] = {
            "instruction": report["per_task"][task]["instructions"],
            "success": rate(sum(e["success"] for e in eps), n),
            **{m: rate(sum(e["metrics"][m] == 1.0 for e in eps), n) for m in METRICS},
        }
        print(task, out[task], flush=True)
    return {
        "policy": policy,
        "episodes_per_instruction": episodes,
        "report": str(out_dir / "report.json"),
        **out,
    }


def render_md(res: dict) -> str:
    info = res["run"]
    lines = [
        "# Instruction-following probe: two cubes, one instruction (probe:two_cubes)",
        "",
        f"`{info['command']}` at {info['when']} (commit {info['git_commit']}); seeds {SEED}.. for both "
        "instructions (the same scenes). followed = success, or the first cube the grasp point came within "
        "2.5 cm of was the instructed one. Target: followed >= 90% for each instruction.",
        "",
        "| who | instruction | success | followed | wrong cube reached first | instructed cube lifted first "
        "| wrong cube lifted first |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict | None) -> str:
        if r is None:
            return ""
        lo, hi = r["ci95"]
        return f"{r['k']}/{r['n']} ({100 * r['rate']:.0f}%, CI {100 * lo:.0f}-{100 * hi:.0f}%)"

    for who, block in (("expert", res.get("experts")), ("policy", res.get("policy"))):
        if not block:
            continue
        for task in TASK_SETS[PROBE]:
            r = block[task]
            text = r["instruction"] if isinstance(r["instruction"], str) else ", ".join(r["instruction"])
            cells = " | ".join(cell(r.get(k)) for k in ("success", *METRICS))
            lines.append(f"| {who} | {text} | {cells} |")
    if res.get("policy"):
        lines += [
            "",
            f"Policy: `{res['policy']['policy']}`; per-episode report: `{res['policy']['report']}`.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=100, help="expert episodes per instruction (0 = skip)")
    ap.add_argument("--policy", default=None, help="checkpoint to probe")
    ap.add_argument("--episodes", type=int, default=50, help="policy episodes per instruction")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/instruction_probe.json"))
    args = ap.parse_args()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res["run"] = run_info(("vlaflow", "numpy", "pybullet", "torch"))
    if args.experts:
        res["experts"] = experts(args.experts)
    if args.policy:
        res["policy"] = policy_probe(
            args.policy, args.episodes, args.workers, out.parent / "instruction_probe_eval"
        )
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_md(res))
    print(render_md(res))


if __name__ == "__main__":
    main()
