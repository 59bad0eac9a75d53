"""Multi-task evaluation pieces: which tasks a policy has seen, per-task aggregates, the per-task table.

:func:`vlaflow.sim.evaluate.evaluate` runs a task set (``mw:mt10``, ``probe:two_cubes``, ...) as one pool
of jobs, ``episodes_per_task`` per member with the same seeds for every member; this module turns the
per-episode results into the report's ``per_task`` entries and its average, and decides whether a
policy may be evaluated on the tasks at all.

Seen tasks: a policy trained by vlaflow carries the instructions of its training store
(``PolicyConfig.tasks``). A task that declares the instructions naming it
(``task_spec.extra["instructions"]``: Meta-World and the probe) is *seen* when one of them is among the
policy's. Evaluating on unseen tasks is refused with both lists unless ``allow_unseen_tasks`` is given;
then it runs and the report lists them. Policies without that record (random, replay, ONNX, a user's
object) are not checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlaflow.errors import VlaflowError
from vlaflow.sim.harness import aggregate, wilson_interval


def _norm(text: str) -> str:
    return " ".join(str(text).strip().lower().rstrip(".").split())


def trained_instructions(policy) -> tuple[str, ...] | None:
    """The instructions a policy was trained with (its config's ``tasks``), or None when it has no record."""
    config = getattr(getattr(policy, "policy", None), "config", None)
    tasks = getattr(config, "tasks", None)
    return tuple(str(t) for t in tasks) if tasks else None


def name_instruction(text: str) -> str:
    """A training instruction as a task name where the catalogs know it, else the quoted text."""
    from vlaflow.sim.metaworld_catalog import task_of_instruction
    from vlaflow.sim.pick_place_two import INSTRUCTIONS as TWO_CUBES

    task = task_of_instruction(text)
    if task is None:
        task = next((f"pick_place_two_{c}" for c, t in TWO_CUBES.items() if _norm(t) == _norm(text)), None)
    return task or repr(text)


def unseen_tasks(trained: Sequence[str] | None, task_specs: dict) -> list[str]:
    """Tasks (name -> TaskSpec) none of whose declared instructions the policy was trained with."""
    if not trained:
        return []
    known = {_norm(t) for t in trained}
    out = []
    for name, spec in task_specs.items():
        texts = spec.extra.get("instructions")
        if texts and not known & {_norm(t) for t in texts}:
            out.append(name)
    return out


def refuse_unseen(policy_name: str, trained: Sequence[str], unseen: list[str], tasks: Sequence[str]) -> None:
    seen_names = sorted({name_instruction(t) for t in trained})
    raise VlaflowError(
        f"policy {policy_name!r} was not trained on {len(unseen)} of the {len(tasks)} task(s) to evaluate:\n"
        f"  trained on:   {', '.join(seen_names)}\n"
        f"  evaluating:   {', '.join(tasks)}\n"
        f"  unseen:       {', '.join(unseen)}\n"
        "pass --allow-unseen-tasks (allow_unseen_tasks=True) to run them anyway; the report lists them"
    )


def per_task_report(tasks: Sequence[str], episodes: list[dict], errors: list[dict], specs: dict) -> dict:
    """``per_task``: for each task its aggregate (success with a Wilson interval, score, lengths, the means
    of the env's ``episode_metrics`` such as the probe's ``followed``), the instruction(s) its episodes
    were given, its error count and the first video."""
    out = {}
    for task in tasks:
        eps = [e for e in episodes if e.get("task") == task]
        agg = aggregate(eps, wall_s=0.0)
        agg.pop("wall_s")
        agg["mean_length"] = float(np.mean([e["length"] for e in eps])) if eps else 0.0
        names = sorted({k for e in eps for k in e.get("metrics", {})})  # the env's episode_metrics()
        if names:
            agg["metrics"] = {
                k: float(np.mean([e["metrics"][k] for e in eps if k in e.get("metrics", {})])) for k in names
            }
        agg["n_errors"] = sum(e.get("task") == task for e in errors)
        agg["instructions"] = sorted({e["instruction"] for e in eps if "instruction" in e})
        agg["task_instruction"] = specs[task].instruction
        videos = [e["video"] for e in eps if "video" in e]
        if videos:
            agg["video"] = videos[0]
        out[task] = agg
    return out


def average(per_task: dict, episodes: list[dict], wall_s: float) -> dict:
    """The report's ``aggregate`` for a task set: the mean of the per-task success rates (each task weighs
    the same) and a Wilson interval on all episodes pooled (equal to the mean when every task ran the same
    number of episodes), plus the mean score and the mean over tasks of each episode metric."""
    rates = [a["success_rate"] for a in per_task.values() if a["n_episodes"]]
    n = len(episodes)
    k = sum(bool(e["success"]) for e in episodes)
    lo, hi = wilson_interval(k, n)
    agg = {
        "success_rate": float(np.mean(rates)) if rates else 0.0,
        "success_ci95": [lo, hi],
        "pooled_success_rate": k / n if n else 0.0,
        "mean_score": float(np.mean([a["mean_score"] for a in per_task.values()])) if per_task else 0.0,
        "mean_final_reward": float(np.mean([e["final_reward"] for e in episodes])) if n else 0.0,
        "n_episodes": n,
        "n_tasks": len(per_task),
        "wall_s": float(wall_s),
    }
    names = sorted({m for a in per_task.values() for m in a.get("metrics", {})})
    if names:
        agg["metrics"] = {
            m: float(np.mean([a["metrics"][m] for a in per_task.values() if m in a.get("metrics", {})]))
            for m in names
        }
    return agg


def format_table(report: dict) -> str:
    """The per-task table (Markdown) of a multi-task report, with the average last."""
    per_task = report["per_task"]
    extra = [m for m in ("followed",) if any(m in a.get("metrics", {}) for a in per_task.values())]
    head = "| task | instruction | success | 95% CI | mean len |" + "".join(f" {m} |" for m in extra)
    lines = [head, "|" + "---|" * (5 + len(extra))]
    for task, a in per_task.items():
        lo, hi = a["success_ci95"]
        told = a["instructions"][0] if len(a["instructions"]) == 1 else a["task_instruction"]
        n_ok = round(a["success_rate"] * a["n_episodes"])
        row = (
            f"| {task} | {told} | {n_ok}/{a['n_episodes']} ({100 * a['success_rate']:.0f}%) | "
            f"{100 * lo:.0f}-{100 * hi:.0f}% | {a['mean_length']:.0f} |"
        )
        lines.append(row + "".join(f" {100 * a['metrics'][m]:.0f}% |" for m in extra))
    g = report["aggregate"]
    lo, hi = g["success_ci95"]
    row = f"| **average** | | **{100 * g['success_rate']:.1f}%** | {100 * lo:.1f}-{100 * hi:.1f}% | |"
    lines.append(row + "".join(f" **{100 * g['metrics'][m]:.0f}%** |" for m in extra))
    return "\n".join(lines)
