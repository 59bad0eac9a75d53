"""Does RL-100's offline policy-evaluation gate rank policies as the real sim does? Both gate models.

    OMP_NUM_THREADS=1 python benchmarks/gate_ranking.py --data RL100_RUN/rl100/store.zarr \\
        --world-model WM_DIR --policy NAME=CKPT=REAL_EVAL_DIR ... [--starts 256 --horizon 5]

The gate (:func:`vlaflow.rl.gate.gate`) accepts a candidate when its imagined score beats the current
policy's: mean over the model's members (ensemble) or samples (world model) of the discounted return of
``--horizon`` imagined decisions from real start windows, minus the members' spread (MOPO-style per-step
disagreement penalty included: ``rl100.gate_uncertainty`` / ``gate_disagreement``, defaults 1). Here every
policy is scored on the same start windows by

- ``ensemble``: the MLP dynamics ensemble fit on the store's chunk transitions (``rl100.gate_model=ensemble``,
  the run's defaults: 5 members, width 128, 1000 steps);
- ``wm``: the frozen diffusion world model (``rl100.gate_model=wm``); a keypoint policy is judged through
  the PushT state recovered from its keypoints (:func:`vlaflow.sim.imagined.state_codec`).

No terminal value (RL-100 adds gamma^H V(s_H) from its IQL critic; a critic is fit to one policy's data and
would not be comparable across these policies): the number measures the dynamics models. Each policy's real
success / score comes from an earlier ``vlaflow eval`` on the held-out seeds (REAL_EVAL_DIR/report.json). The
gate decides pairs, so beside the Spearman correlation over the policies the table reports the fraction of
policy pairs (with different real success) that the gate orders as the sim does. Results:
``benchmarks/results/gate_ranking.json`` + ``gate_ranking.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import append_rows, run_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def judge_of(policy):
    """The module whose config / normalizer the gate's models read (a steered policy: its frozen base)."""
    return getattr(policy, "base", policy)


def policy_fn(policy, seed: int):
    """Flat obs windows (B, Ds) -> normalized flat chunks (B, H x Da) of the policy's own inference (its
    sampler; a steered policy's actor noise), noise from a generator seeded by ``seed``."""
    import torch

    from vlaflow.interfaces import unflat_obs

    j = judge_of(policy)
    c = j.config
    keys, shapes = tuple(c.obs_shapes), {k: tuple(v) for k, v in c.obs_shapes.items()}
    g = torch.Generator().manual_seed(seed)
    steered = j is not policy

    @torch.no_grad()
    def fn(s):
        obs = unflat_obs(s, keys, shapes, int(c.n_obs_steps))
        gen = policy.generate(obs) if steered else policy.generate(obs, generator=g)
        return j.normalize_target(gen.actions).flatten(1)

    return fn


def real_result(eval_dir: Path) -> dict:
    rep = json.loads((eval_dir / "report.json").read_text())
    agg, eps = rep["aggregate"], sorted(rep["episodes"], key=lambda e: e["seed"])
    return {
        "success_rate": agg["success_rate"],
        "score": agg["mean_score"],
        "n_episodes": agg["n_episodes"],
        "seeds": f"{eps[0]['seed']}..{eps[-1]['seed']}",
    }


def pair_agreement(gate: list[float], real: list[float]) -> tuple[int, int]:
    """(pairs the gate orders as ``real`` does, pairs with different real values)."""
    agree = total = 0
    for i, j in itertools.combinations(range(len(real)), 2):
        if real[i] == real[j]:
            continue
        total += 1
        agree += (gate[i] - gate[j]) * (real[i] - real[j]) > 0
    return agree, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="store with per-step 'reward' (an RL-100 run's store copy)")
    ap.add_argument("--world-model", required=True)
    ap.add_argument("--policy", action="append", required=True, help="NAME=CKPT=REAL_EVAL_DIR")
    ap.add_argument("--starts", type=int, default=256, help="start windows (rl100.gate_starts)")
    ap.add_argument("--horizon", type=int, default=5, help="imagined decisions (rl100.gate_horizon)")
    ap.add_argument("--members", type=int, default=5, help="ensemble members / world-model samples")
    ap.add_argument("--ensemble-steps", type=int, default=1000)
    ap.add_argument("--stride", type=int, default=1, help="transition stride (rl100.stride)")
    ap.add_argument("--gamma", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="what the world model and the store are")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()

    import torch

    from vlaflow.policies.checkpoint import load_checkpoint
    from vlaflow.rl.gate import DynamicsEnsemble, fit_dynamics, imagined_score
    from vlaflow.rl.returns import chunk_discount
    from vlaflow.sim.imagined import state_codec
    from vlaflow.train.rl100 import store_transitions
    from vlaflow.world_models.gate import world_model_gate

    torch.set_num_threads(1)
    specs = []
    for p in a.policy:
        parts = p.split("=")
        if len(parts) != 3:
            raise SystemExit(f"--policy wants NAME=CKPT=REAL_EVAL_DIR, got {p!r}")
        if not (Path(parts[2]) / "report.json").exists():
            raise SystemExit(f"{parts[2]}/report.json not found (run `vlaflow eval --out` there first)")
        specs.append(parts)
    policies = {n: load_checkpoint(c).eval() for n, c, _ in specs}
    ref = judge_of(policies[specs[0][0]])
    keys = tuple(ref.config.obs_shapes)
    for n, pol in policies.items():  # one set of transitions and starts serves every policy
        j = judge_of(pol)
        st, st0 = j.normalizer.stats["action"], ref.normalizer.stats["action"]
        same = tuple(j.config.obs_shapes) == keys and all(
            np.allclose(np.asarray(st[s]), np.asarray(st0[s])) for s in ("min", "max")
        )
        if not same:
            raise SystemExit(
                f"policy {n} reads other keys or normalizes actions otherwise than {specs[0][0]}"
            )
    t0 = time.time()
    data = store_transitions(Path(a.data), ref, "task", a.stride)
    g = torch.Generator().manual_seed(a.seed)
    starts = data["s"][torch.randint(0, len(data["s"]), (a.starts,), generator=g)]
    torch.manual_seed(a.seed)
    ens = DynamicsEnsemble(data["s"].shape[1], data["a"].shape[1], a.members, 128)
    ens_loss = fit_dynamics(
        ens, data["s"], data["a"], data["s2"], data["r"], steps=a.ensemble_steps, seed=a.seed
    )
    fit_s = time.time() - t0
    print(f"{len(data['s'])} transitions, ensemble fit in {fit_s:.0f} s (loss {ens_loss:.3f})", flush=True)
    make = world_model_gate(
        a.world_model, task="pusht", n_samples=a.members, seed=a.seed, codec_for=state_codec
    )
    gamma = chunk_discount(a.gamma, int(ref.config.n_action_steps))
    rows = []
    for n, ckpt, real_dir in specs:
        pol = policies[n]
        wm = make(judge_of(pol), seed=a.seed)
        wm.set_stats(data["s"], data["a"], data["s2"], data["r"])
        row = {"policy": n, "ckpt": ckpt, "real": real_result(Path(real_dir))}
        for name, model in (("ensemble", ens), ("wm", wm)):
            t1 = time.time()
            score, spread = imagined_score(
                policy_fn(pol, a.seed),
                model,
                starts,
                a.horizon,
                gamma,
                disagreement_coef=1.0,
                uncertainty_coef=1.0,
            )
            row[name] = {"score": score, "spread": spread, "wall_s": round(time.time() - t1, 1)}
        row["wm"]["invalid_states"] = wm.n_invalid
        rows.append(row)
        print(f"{n}: real {row['real']['success_rate']:.3f} | ensemble {row['ensemble']['score']:.3f} | "
              f"wm {row['wm']['score']:.3f} ({row['wm']['wall_s']} s)", flush=True)  # fmt: skip

    from scipy.stats import spearmanr

    real_s = [r["real"]["success_rate"] for r in rows]
    real_q = [r["real"]["score"] for r in rows]
    summary = {}
    for name in ("ensemble", "wm"):
        est = [r[name]["score"] for r in rows]
        agree, total = pair_agreement(est, real_s)
        summary[name] = {
            "spearman_success": float(spearmanr(est, real_s).statistic),
            "spearman_score": float(spearmanr(est, real_q).statistic),
            "pairs_agree": agree,
            "pairs": total,
        }
    out = {
        "benchmark": "gate_ranking",
        "run": run_info(),
        "note": a.note,
        "data": a.data,
        "world_model": a.world_model,
        "transitions": len(data["s"]),
        "settings": {
            "starts": a.starts,
            "horizon": a.horizon,
            "members": a.members,
            "stride": a.stride,
            "ensemble_steps": a.ensemble_steps,
            "gamma_per_decision": gamma,
            "terminal_value": None,
            "disagreement_coef": 1.0,
            "uncertainty_coef": 1.0,
        },  # fmt: skip
        "ensemble_fit": {"loss": ens_loss, "wall_s": round(fit_s, 1)},
        "policies": rows,
        "summary": summary,
    }
    res = Path(a.results)
    append_rows(res / "gate_ranking.json", [out])
    lines = [
        f"## Gate ranking ({out['run']['when']}, `{out['run']['command']}`)",
        "",
        f"{a.note}. {len(data['s'])} chunk transitions of `{a.data}`; {a.starts} start windows drawn from "
        f"them (seed {a.seed}), the same for every policy; {a.horizon} imagined decisions, {a.members} "
        "members / samples, no terminal value. Real success / score: each policy's `vlaflow eval` on the "
        "held-out seeds.",
        "",
        "| policy | real success | real score | gate score: ensemble | gate score: world model "
        "| wm s / policy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {100 * r['real']['success_rate']:.1f}% ({r['real']['n_episodes']}) | "
            f"{r['real']['score']:.3f} | {r['ensemble']['score']:.3f} | {r['wm']['score']:.3f} | "
            f"{r['wm']['wall_s']} |"
        )
    lines += ["", "| gate model | Spearman vs success | Spearman vs score | pairs ordered as the sim |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['spearman_success']:.3f} | {s['spearman_score']:.3f} | "
            f"{s['pairs_agree']}/{s['pairs']} |"
        )
    md = res / "gate_ranking.md"
    old = md.read_text() if md.exists() else "# RL-100's gate as a judge of policies\n\n"
    md.write_text(old + "\n".join(lines) + "\n\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
