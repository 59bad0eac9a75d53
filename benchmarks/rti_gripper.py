"""RTI-DP's gripper remedies measured on an arm task (issue 17): success with and without them.

RTI-DP runs only a few low-noise reverse steps from the shifted previous chunk. A binary gripper sits at +-1
in normalized units, and from there a few low-noise steps cannot flip it: the warm start keeps the old
command. The paper's two remedies:
- ``clip`` (inference): binarize the warm start's gripper dims to +-1 (``RTIConfig.gripper_mode="clip"``);
- ``scale`` (training): normalize the gripper to a tenth of its range (``data.action_scale_dims=3``), so a
  flip is a short move the few steps can make.

Every row is one closed-loop evaluation of ``--episodes`` seeds from ``--seed`` on ``--task``, through the
real-time executor replanning every control tick (``exec_horizon=1``, RTI-DP's own regime) for RTI rows and
with plain chunking (the checkpoint's own sampler, every Ta steps) for the reference rows. Subcommands:

    contraction CKPT --data STORE   the RTI tail's contraction ratio per warm length (choose_warm_steps)
    row CKPT --label L --out DIR    one evaluation -> DIR/L.json (per-seed successes kept)
    trace CKPT --seed S             one RTI episode: the gripper value of every returned chunk, per call
    table DIR                       DIR/*.json -> DIR/table.md (+ paired McNemar tests against a base row)

Commands of the committed run: ``benchmarks/results/rti_gripper.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _meta import run_info  # noqa: E402
from rl_pusht import mcnemar  # noqa: E402

from vlaflow.sim.harness import wilson_interval  # noqa: E402


def contraction(args) -> dict:
    import torch

    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler
    from vlaflow.deploy.rti import RTIConfig, choose_warm_steps
    from vlaflow.policies.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    pol = load_checkpoint(args.ckpt)
    c = pol.config
    ws = WindowSampler(EpisodeStore.open(args.data), list(c.obs_shapes), c.n_obs_steps, c.horizon)
    idx = np.random.default_rng(0).integers(0, len(ws), size=args.windows)
    batch = ws.get_batch(idx)
    base = RTIConfig(sampler=args.sampler, num_steps=args.num_steps)
    cands = tuple(int(w) for w in args.candidates.split(","))
    per = {w: [] for w in cands}
    choices = []
    for i in range(len(idx)):
        obs = {k: torch.from_numpy(batch[k][i : i + 1]) for k in c.obs_shapes}
        with torch.no_grad():
            cond = pol.encode(obs)
            anchor = pol.denoise(cond, sampler="ddim", num_steps=10).x0
        choice, table = choose_warm_steps(
            pol, cond, anchor, base, candidates=cands, target=args.target, scale=args.scale, n_pairs=8
        )
        choices.append(choice)
        for w in cands:
            per[w].append(table[w]["mean"])
    means = {w: float(np.mean(v)) for w, v in per.items()}
    pick = next((w for w in cands if means[w] <= args.target), cands[-1])
    # replanning every tick, an action is refined on H - 1 calls before it runs: the per-call ratios compound
    # (an optimistic bound: the observation changes between calls, and the padded tail starts far off)
    comp = {w: means[w] ** (c.horizon - 1) for w in cands}
    for w in cands:
        print(f"contraction {args.sampler}:{args.num_steps} warm={w}: {means[w]:.4f} per call, "
              f"{comp[w]:.2e} over H-1={c.horizon - 1} calls", flush=True)  # fmt: skip
    print(f"target {args.target}: smallest warm length whose mean ratio per call is below it: {pick}")
    out = {
        "run": run_info(),
        "ckpt": args.ckpt,
        "grid": f"{args.sampler}:{args.num_steps}",
        "perturbation_scale": args.scale,
        "target": args.target,
        "mean_ratio": {str(w): round(m, 4) for w, m in means.items()},
        "compounded_over_horizon": {str(w): float(f"{v:.3e}") for w, v in comp.items()},
        "chosen_warm_steps": pick,
        "per_window_choice": choices,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


def row(args) -> dict:
    import functools

    from vlaflow.deploy.executor import RealtimeConfig
    from vlaflow.deploy.rti import load_rti_policy
    from vlaflow.policies.runtime import load_policy
    from vlaflow.sim.evaluate import evaluate
    from vlaflow.sim.realtime import SimRealtimeConfig

    out = Path(args.out) / f"{args.label}.json"
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists (pass --overwrite to replace it)")
    kw: dict = {}
    if args.warm:  # RTI through the real-time executor, replanning every exec_horizon ticks
        fields = dict(sampler=args.sampler, num_steps=args.num_steps, n_warm_steps=args.warm)
        if args.gripper_mode != "none":
            fields.update(gripper_dims=tuple(int(d) for d in args.gripper_dims.split(",")),
                          gripper_mode=args.gripper_mode)  # fmt: skip
        factory = functools.partial(load_rti_policy, args.ckpt, **fields)
        rt = RealtimeConfig(merge="rti", exec_horizon=args.exec_horizon)
        kw = {"executor": "realtime", "realtime": SimRealtimeConfig(rt)}
        how = {"runtime": "rti", **fields, "exec_horizon": args.exec_horizon}
    else:  # the checkpoint's own sampler (or --ref SAMPLER:STEPS), plain chunking every Ta
        ref = {}
        if args.ref:
            s, n = args.ref.split(":")
            ref = {"sampler": s, "num_steps": int(n)}
        factory = functools.partial(load_policy, args.ckpt, **ref)
        how = {"runtime": "plain chunking", **ref}
    rep = evaluate(
        factory, task=args.task, n_episodes=args.episodes, start_seed=args.seed, workers=args.workers,
        progress=not args.quiet, **kw,
    )  # fmt: skip
    if rep["errors"]:
        raise SystemExit(
            f"{len(rep['errors'])} episode(s) failed: {rep['errors'][0]['error'].splitlines()[0]}"
        )
    eps = sorted(rep["episodes"], key=lambda e: e["seed"])
    nfe = [e["executor"]["nfe_total"] / max(1, e["executor"]["ticks"]) for e in eps if "executor" in e]
    res = {
        "label": args.label,
        "run": run_info(),
        "ckpt": args.ckpt,
        "task": args.task,
        "how": how,
        "seeds": [eps[0]["seed"], eps[-1]["seed"]],
        "episodes": len(eps),
        "success_rate": float(np.mean([e["success"] for e in eps])),
        "success_bits": "".join("1" if e["success"] else "0" for e in eps),
        "mean_length": float(np.mean([e["length"] for e in eps])),
        "nfe_per_control_step": float(np.mean(nfe)) if nfe else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{args.label}: success {res['success_rate']:.3f} over {len(eps)} episodes -> {out}")
    return res


class _Traced:
    """A runtime policy that records the gripper dims of every chunk it returns (and the call's NFE)."""

    def __init__(self, policy, dims: list[int]):
        self._p, self._dims, self.calls = policy, dims, []

    def __getattr__(self, name):
        return getattr(self._p, name)

    def infer(self, obs, **kw):
        res = self._p.infer(obs, **kw)
        g = np.asarray(res.actions)[..., self._dims].reshape(-1, len(self._dims))
        self.calls.append({"nfe": int(self._p.last_nfe), "gripper": np.round(g[:, 0], 3).tolist()})
        return res


def trace(args) -> dict:
    """One RTI episode with the gripper dim of every returned chunk (index 0: the action executed next)."""
    from vlaflow.deploy.executor import RealtimeConfig
    from vlaflow.deploy.rti import load_rti_policy
    from vlaflow.sim.evaluate import evaluate
    from vlaflow.sim.realtime import SimRealtimeConfig

    dims = [int(d) for d in args.gripper_dims.split(",")]
    fields = dict(sampler=args.sampler, num_steps=args.num_steps, n_warm_steps=args.warm)
    if args.gripper_mode != "none":
        fields.update(gripper_dims=tuple(dims), gripper_mode=args.gripper_mode)
    pol = _Traced(load_rti_policy(args.ckpt, **fields), dims)
    rt = SimRealtimeConfig(RealtimeConfig(merge="rti", exec_horizon=args.exec_horizon))
    rep = evaluate(pol, task=args.task, n_episodes=1, start_seed=args.seed, workers=0, progress=False,
                   executor="realtime", realtime=rt)  # fmt: skip
    ep = rep["episodes"][0]
    first = [c["gripper"][0] for c in pol.calls]
    flips = int(np.sum(np.diff(np.sign(first)) != 0))
    print(f"seed {args.seed}: success {ep['success']}, length {ep['length']}, {len(pol.calls)} calls, "
          f"{flips} sign changes of the next action's gripper")  # fmt: skip
    for i, c in enumerate(pol.calls[: args.show]):
        print(f"{i:3d} nfe {c['nfe']:3d} gripper " + " ".join(f"{v:+.2f}" for v in c["gripper"]))
    out = {"run": run_info(), "ckpt": args.ckpt, "task": args.task, "seed": args.seed, "rti": fields,
           "success": bool(ep["success"]), "length": ep["length"], "sign_changes": flips,
           "calls": pol.calls}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out) + "\n")
    return out


def table(args) -> str:
    d = Path(args.dir)
    rows = [json.loads(p.read_text()) for p in sorted(d.glob("*.json")) if p.name != "contraction.json"]
    rows = [r for r in rows if "success_bits" in r]
    order = args.order.split(",") if args.order else [r["label"] for r in rows]
    by = {r["label"]: r for r in rows}
    pairs = [p.split(":") for p in args.pairs.split(",")] if args.pairs else []
    lines = [
        "| row | checkpoint | runtime | NFE / call | NFE / control step | success (95% CI) | episodes "
        "| mean length |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for name in order:
        r = by[name]
        k, n = r["success_bits"].count("1"), len(r["success_bits"])
        lo, hi = wilson_interval(k, n)
        h = r["how"]
        if h["runtime"] == "rti":
            rt = f"RTI {h['n_warm_steps']} warm on {h['sampler']}:{h['num_steps']}, "
            rt += f"every {h['exec_horizon']} tick(s), gripper {h.get('gripper_mode', 'none')}"
            per_call = h["n_warm_steps"]
        else:
            if "sampler" not in h:  # the checkpoint's own sampler, as its config names it
                c = json.loads((Path(r["ckpt"]) / "config.json").read_text())["config"]
                h = {**h, "sampler": c["sampler"], "num_steps": c["num_inference_steps"]}
            rt = f"plain chunking ({h['sampler']}:{h['num_steps']})"
            per_call = h["num_steps"]
        nfe = f"{r['nfe_per_control_step']:.2f}" if r["nfe_per_control_step"] is not None else "n/a"
        lines.append(
            f"| {name} | `{r['ckpt']}` | {rt} | {per_call} | {nfe} "
            f"| {100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | {n} | {r['mean_length']:.1f} |"
        )
    if pairs:
        lines += ["", "Paired on the same seeds (exact McNemar):", ""]
        lines += ["| a | b | a only | b only | difference (points) | p |", "|---|---|---:|---:|---:|---:|"]
        for a, b in pairs:  # "x+y": rows x and y pooled (e.g. the same runtime on two training seeds)
            x, y = ("".join(by[n]["success_bits"] for n in side.split("+")) for side in (a, b))
            only_a, only_b, p = mcnemar(x, y)
            diff = 100 * (x.count("1") - y.count("1")) / len(x)
            lines.append(f"| {a} | {b} | {only_a} | {only_b} | {diff:+.1f} | {p:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("contraction", help="contraction ratio of the RTI tail per warm length")
    c.add_argument("ckpt")
    c.add_argument("--data", required=True, help="episode store whose windows give the observations")
    c.add_argument("--windows", type=int, default=8)
    c.add_argument("--candidates", default="2,3,5,10,20")
    c.add_argument("--target", type=float, default=0.1)
    c.add_argument("--scale", type=float, default=0.5)
    c.add_argument("--out", default="")
    for q in (c,):
        q.add_argument("--sampler", default="ddpm")
        q.add_argument("--num-steps", type=int, default=100)
    r = sub.add_parser("row", help="one closed-loop evaluation -> OUT/LABEL.json")
    r.add_argument("ckpt")
    r.add_argument("--label", required=True)
    r.add_argument("--out", required=True, help="directory of row files")
    r.add_argument("--task", default="pick_place")
    r.add_argument("--episodes", type=int, default=200)
    r.add_argument("--seed", type=int, default=100000)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--warm", type=int, default=0, help="RTI warm reverse steps (0: no RTI, plain chunking)")
    r.add_argument("--sampler", default="ddpm", help="RTI grid sampler")
    r.add_argument("--num-steps", type=int, default=100, help="RTI grid length")
    r.add_argument("--exec-horizon", type=int, default=1, help="RTI: replan every S control ticks")
    r.add_argument("--gripper-mode", default="none", choices=["none", "clip"])
    r.add_argument("--gripper-dims", default="3", help="comma list of discrete action dims (pick_place: 3)")
    r.add_argument("--ref", default="", help="plain rows: SAMPLER:STEPS instead of the checkpoint's own")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--quiet", action="store_true")
    tr = sub.add_parser("trace", help="one RTI episode: the gripper dim of every returned chunk")
    tr.add_argument("ckpt")
    tr.add_argument("--task", default="pick_place")
    tr.add_argument("--seed", type=int, default=70000, help="a training seed (diagnosis only)")
    tr.add_argument("--warm", type=int, default=5)
    tr.add_argument("--sampler", default="ddpm")
    tr.add_argument("--num-steps", type=int, default=100)
    tr.add_argument("--exec-horizon", type=int, default=1)
    tr.add_argument("--gripper-mode", default="none", choices=["none", "clip"])
    tr.add_argument("--gripper-dims", default="3")
    tr.add_argument("--show", type=int, default=40, help="calls to print")
    tr.add_argument("--out", default="")
    t = sub.add_parser("table", help="DIR/*.json -> DIR/table.md")
    t.add_argument("dir")
    t.add_argument("--order", default="", help="comma list of row labels")
    t.add_argument("--pairs", default="", help="comma list A:B of rows to compare paired (A+A2:B+B2 pools)")
    args = p.parse_args(argv)
    if args.cmd == "contraction":
        contraction(args)
    elif args.cmd == "row":
        row(args)
    elif args.cmd == "trace":
        trace(args)
    else:
        (Path(args.dir) / "table.md").write_text(table(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
