"""World4RL's success classifier on real PushT success labels: what it learns and whether it is a reward.

    OMP_NUM_THREADS=1 python benchmarks/success_classifier.py --data RL100_RUN/rl100/store.zarr \\
        [--folds 5 --tail 10 --steps 1000 --probe 4000]

The labels are real: the episodes that RL-100 deployed in the sim and merged into its store carry the sim's
success flag (``vlaflow refine --algo rl100``; the human demos carry none and are left out). The classifier
is the one ``vlaflow train-wm --success-classifier`` trains (:func:`vlaflow.world_models.reward.
train_success_classifier` on :func:`vlaflow.world_models.data.success_labels`: the last ``--tail`` states
of a success are 1, failures and the early part of successes 0), scored by episode-grouped ``--folds``-fold
cross-validation (every labelled episode is held out once):

- ``auroc_labels``: held-out states against the same World4RL labels;
- episodes: ``max_p`` over each held-out episode against its success flag (AUROC), and how often the
  imagined env (success = p > 0.5) would end a held-out *failed* episode as a success / a successful one;
- ``spearman_p_coverage``: p against the true coverage of every held-out state (does p track progress?);
- the near-goal probe: ``--probe`` states with the block placed about the goal pose (x, y ~ N(0, (12 u) px),
  angle ~ N(0, 0.15 u rad) around (256, 256, pi/4), u ~ U(0.05, 1) per state), the agent where a stored
  state had it, labelled by the
  true rule (coverage > 0.95, :func:`vlaflow.world_models.reward.pusht_reward`): AUROC, and the rate of
  p > 0.5 among states that are not a success (coverage 0.85..0.95: the near-misses a policy stops at).

A stored state never has coverage > 0.95 (an episode ends at success: the success state is the one after
the last stored observation), so the tail labels mark near-goal states as "success"; the probe says what
that costs. Results: ``benchmarks/results/success_classifier.json`` + ``success_classifier.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import append_rows, run_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def labelled_episodes(path: str) -> list[tuple[int, bool]]:
    """(episode index, success) of every episode that carries a success flag."""
    from vlaflow.data.store import EpisodeStore

    with EpisodeStore.open(path) as st:
        metas = [(i, st.episode_meta(i)["success"]) for i in range(st.n_episodes)]
    return [(i, bool(s)) for i, s in metas if s is not None]


def folds_of(eps: list[tuple[int, bool]], k: int, seed: int) -> list[list[int]]:
    """``k`` held-out groups of episode indices, successes and failures dealt round-robin (stratified)."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(k)]
    for flag in (True, False):
        idx = [i for i, s in eps if s == flag]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            out[j % k].append(int(i))
    return out


def near_goal_states(stored: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, 5) states with the block about the goal pose and the agent where a stored state had it."""
    from vlaflow.world_models.reward import PUSHT_GOAL

    rng = np.random.default_rng(seed)
    gx, gy, ga = PUSHT_GOAL
    s = stored[rng.integers(0, len(stored), n)].copy()
    u = rng.uniform(0.05, 1.0, n)  # a spread of distances: success needs the pose within a few px / degrees
    s[:, 2] = gx + u * rng.normal(0, 12.0, n)
    s[:, 3] = gy + u * rng.normal(0, 12.0, n)
    s[:, 4] = ga + u * rng.normal(0, 0.15, n)
    return s.astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a store whose sim episodes carry success flags")
    ap.add_argument("--obs-key", default="obs.state")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--tail", type=int, default=10, help="as train-wm --success-tail")
    ap.add_argument("--steps", type=int, default=1000, help="as train-wm --success-steps")
    ap.add_argument("--success-key", default=None, help="as train-wm --success-key (e.g. reward)")
    ap.add_argument("--success-threshold", type=float, default=1.0, help="as train-wm --success-threshold")
    ap.add_argument("--probe", type=int, default=4000, help="near-goal probe states")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()

    import torch

    from vlaflow.data.store import EpisodeStore
    from vlaflow.world_models.data import success_labels
    from vlaflow.world_models.reward import auroc, pusht_coverage, pusht_reward, train_success_classifier

    torch.set_num_threads(1)
    t0 = time.time()
    eps = labelled_episodes(a.data)
    flag = dict(eps)
    if len(eps) < a.folds or len({s for _, s in eps}) < 2:
        raise SystemExit(f"{a.data}: {len(eps)} labelled episodes; need >= {a.folds} with both outcomes")
    with EpisodeStore.open(a.data) as st:
        states = {i: np.asarray(st.get_episode(i, [a.obs_key])[a.obs_key], np.float32) for i, _ in eps}
    probe = near_goal_states(np.concatenate(list(states.values())), a.probe, a.seed)
    probe_cov = pusht_coverage(probe)
    probe_true = pusht_reward(probe)[1]
    near_miss = (probe_cov >= 0.85) & (probe_cov <= 0.95)

    kw = {"tail": a.tail, "key": a.success_key, "threshold": a.success_threshold}
    labels = (
        f"per-step {a.success_key} >= {a.success_threshold}"
        if a.success_key
        else f"episode flags, last {a.tail} states of a success = 1"
    )
    per_fold, held_p, held_cov, ep_rows = [], [], [], []
    for k, held in enumerate(folds_of(eps, a.folds, a.seed)):
        train = [i for i, _ in eps if i not in set(held)]
        x, y = success_labels(a.data, a.obs_key, episodes=train, **kw)
        clf = train_success_classifier(x, y, steps=a.steps, seed=a.seed + k)
        hx, hy = success_labels(a.data, a.obs_key, episodes=held, **kw)
        fold = {"fold": k, "train_episodes": len(train), "held_episodes": len(held)}
        fold["auroc_labels"] = auroc(clf.reward(hx)[0], hy)
        for i in held:
            p = clf.reward(states[i])[0]
            held_p.append(p)
            held_cov.append(pusht_coverage(states[i]))
            ep_rows.append(
                {
                    "episode": i,
                    "success": flag[i],
                    "max_p": float(p.max()),
                    "calls_success": bool((p > 0.5).any()),
                }
            )
        pp = clf.reward(probe)[0]
        fold["probe_auroc"] = auroc(pp, probe_true)
        fold["probe_near_miss_called_success"] = float((pp[near_miss] > 0.5).mean())
        fold["probe_success_called_success"] = float((pp[probe_true] > 0.5).mean())
        per_fold.append(fold)
        print(json.dumps(fold))

    succ = np.array([r["success"] for r in ep_rows])
    maxp = np.array([r["max_p"] for r in ep_rows])
    calls = np.array([r["calls_success"] for r in ep_rows])
    row = {
        **run_info(("vlaflow", "numpy", "torch", "scipy")),
        "data": a.data,
        "obs_key": a.obs_key,
        "labelled_episodes": len(eps),
        "successes": int(sum(s for _, s in eps)),
        "folds": a.folds,
        "labels": labels,
        "steps": a.steps,
        "per_fold": per_fold,
        "auroc_labels_mean": float(np.mean([f["auroc_labels"] for f in per_fold])),
        "episode_auroc_max_p": auroc(maxp, succ),
        "failed_episodes_called_success": float(calls[~succ].mean()),
        "successful_episodes_called_success": float(calls[succ].mean()),
        "spearman_p_coverage": spearman(np.concatenate(held_p), np.concatenate(held_cov)),
        "stored_states_above_0.95": int(sum((c > 0.95).sum() for c in held_cov)),
        "probe": {
            "n": a.probe,
            "true_successes": int(probe_true.sum()),
            "near_misses": int(near_miss.sum()),
            "auroc_mean": float(np.mean([f["probe_auroc"] for f in per_fold])),
            "near_miss_called_success_mean": float(
                np.mean([f["probe_near_miss_called_success"] for f in per_fold])
            ),
            "success_called_success_mean": float(
                np.mean([f["probe_success_called_success"] for f in per_fold])
            ),
        },
        "wall_s": round(time.time() - t0, 1),
    }
    results = Path(a.results)
    append_rows(results / "success_classifier.json", [row])
    write_md(json.loads((results / "success_classifier.json").read_text()), results / "success_classifier.md")
    return 0


def _f(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_md(rows: list[dict], path: Path) -> None:
    lines = [
        "# World4RL's success classifier on real PushT success labels (benchmarks/success_classifier.py)",
        "",
        "Labels: the sim's success flags of the episodes RL-100 deployed and merged into its store; the",
        "classifier and its labels are `vlaflow train-wm --success-classifier`'s (last `tail` states of a",
        "success = 1). Episode-grouped cross-validation: every labelled episode is held out once. The probe",
        "places the block about the goal pose and labels each state by the true rule (coverage > 0.95).",
        "",
        "| when | labels | episodes (successes) | folds | AUROC, held-out labels | episode AUROC (max p) "
        "| failed episodes called success | successes called success | Spearman p vs coverage "
        "| probe AUROC | probe near-misses (0.85-0.95) called success | probe successes called success |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["probe"]
        lines.append(
            f"| {r['when']} | {r['labels']} | {r['labelled_episodes']} ({r['successes']}) | {r['folds']} | "
            f"{_f(r['auroc_labels_mean'])} | {_f(r['episode_auroc_max_p'])} | "
            f"{_f(r['failed_episodes_called_success'])} | {_f(r['successful_episodes_called_success'])} | "
            f"{_f(r['spearman_p_coverage'])} | {_f(p['auroc_mean'])} | "
            f"{_f(p['near_miss_called_success_mean'])} | {_f(p['success_called_success_mean'])} |"
        )
    last = rows[-1]
    lines += [
        "",
        "Stored states with coverage > 0.95 in the held-out episodes: "
        f"{last['stored_states_above_0.95']} (an episode ends at success; the success state is never an "
        "observation). Probe: "
        f"{last['probe']['n']} states, {last['probe']['true_successes']} true successes, "
        f"{last['probe']['near_misses']} near-misses.",
        "",
        "Commands: `" + "`; `".join(r["command"] for r in rows) + "`",
    ]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
