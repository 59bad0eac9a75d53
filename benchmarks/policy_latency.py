"""Inference latency per action chunk at batch 1 for the default PushT low-dim policies (eager PyTorch).

    python benchmarks/policy_latency.py [--threads 2] [--rounds 5] [--repeats 20] [--samplers ddim:10,...]
        [--out benchmarks/results/policy_latency.json] [--section NAME]

Measures ``PolicyRuntime.infer`` (numpy in, numpy out: normalize, encode once, sampler loop, unnormalize)
with randomly initialized weights (latency does not depend on training); the model is the PushT low-dim
U-Net of ``DiffusionConfig()`` / ``FlowConfig()`` defaults (obs.keypoint (9, 2) + obs.agent_pos (2),
To = 2, H = 16, 4.56M parameters). Where the time goes: ``network_only_ms`` is the chunk's ``nfe``
network evaluations alone (``policy.predict`` in a loop, timed right after the chunks of the same round),
``outside_network_ms`` = ``median_ms - network_only_ms`` is the rest (observation checks, normalization,
the sampler's step arithmetic, conversions). On a shared machine the policies are measured in
``--rounds`` alternating short runs; each row keeps its per-round medians. ``--section NAME``
merges the result into the existing JSON under NAME instead of replacing the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

from vlaflow.policies import DiffusionConfig, FlowConfig, PolicyRuntime, build_policy  # noqa: E402
from vlaflow.policies.runtime import batch_of_one  # noqa: E402

FAMILY_OF = {"ddim": "diffusion", "ddpm": "diffusion", "euler": "flow", "heun": "flow"}


def _stats(shape, lo, hi):
    lo_a, hi_a = np.full(shape, lo, np.float32), np.full(shape, hi, np.float32)
    return {"min": lo_a, "max": hi_a, "mean": (lo_a + hi_a) / 2, "std": hi_a - lo_a, "q01": lo_a, "q99": hi_a}


def _network_only(policy, obs, device, nfe: int):
    """One chunk's network evaluations alone: ``nfe`` calls of ``policy.predict`` at batch 1, no sampler."""
    with torch.inference_mode():
        cond = policy.encode(batch_of_one(obs, device))
        x = torch.randn(1, policy.config.horizon, policy.config.action_dim, device=device)
        t = policy.path.timesteps(10)[0]

    def run():
        with torch.inference_mode():
            for _ in range(nfe):
                policy.predict(x, t, cond)
            if device != "cpu":
                torch.cuda.synchronize()

    return run


def _timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed chunks per policy per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds over the policies")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samplers", default="ddim:10,ddpm:100,euler:10,heun:10", help="sampler:steps list")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "policy_latency.json"))
    ap.add_argument("--section", default="", help="merge the result into --out under this key")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stats = {
        "action": _stats((2,), 12, 511),
        "obs.keypoint": _stats((9, 2), 0, 512),
        "obs.agent_pos": _stats((2,), 0, 512),
    }
    obs = {
        "obs.keypoint": np.random.rand(2, 9, 2).astype(np.float32) * 512,
        "obs.agent_pos": np.random.rand(2, 2).astype(np.float32) * 512,
    }
    runs = []
    for item in args.samplers.split(","):
        sampler, steps = item.split(":")
        family = FAMILY_OF[sampler]
        cfg = DiffusionConfig() if family == "diffusion" else FlowConfig()
        policy = build_policy(cfg, stats).eval()
        rt = PolicyRuntime(policy, device=args.device, sampler=sampler, num_steps=int(steps))
        nfe = rt.infer(obs).nfe
        network = _network_only(rt.policy, obs, args.device, nfe)
        network()
        run = {"family": family, "sampler": sampler, "steps": int(steps), "nfe": nfe, "rt": rt}
        runs.append({**run, "network": network, "times": [], "rounds": [], "net_times": []})
    load_start = os.getloadavg()
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for run in runs:
            reps = max(3, args.repeats // (10 if run["steps"] >= 100 else 1))
            times = _timed(lambda rt=run["rt"]: rt.infer(obs), reps)
            run["net_times"] += _timed(run["network"], reps)  # back to back: the same machine load
            run["times"] += times
            run["rounds"].append(round(float(np.median(times)), 2))
    rows = []
    for run in runs:
        policy = run["rt"].policy
        net = float(np.median(run["net_times"]))
        med = float(np.median(run["times"]))
        rows.append(
            {
                "policy": f"{run['family']}-unet-pusht-lowdim",
                "device": args.device,
                "sampler": run["sampler"],
                "num_steps": run["steps"],
                "nfe": run["nfe"],
                "params": policy.num_parameters(),
                "median_ms": med,
                "p90_ms": float(np.percentile(run["times"], 90)),
                "round_medians_ms": run["rounds"],
                "network_only_ms": net,
                "outside_network_ms": med - net,
                "repeats": len(run["times"]),
            }
        )
        print(json.dumps(rows[-1]))
    result = {
        **run_info(("vlaflow", "torch", "numpy")),
        "setting": f"batch 1, {args.device}, {args.threads} CPU thread(s), {args.rounds} alternating rounds",
        "load_avg_at_end": list(os.getloadavg()),
        "load_avg_before_timing": list(load_start),
    }
    result["rows"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.section:
        merged = json.loads(out.read_text()) if out.exists() else {}
        merged[args.section] = result
        out.write_text(json.dumps(merged, indent=2) + "\n")
    else:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}" + (f" [{args.section}]" if args.section else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
