"""Training throughput of the one loop with ``train.amp=off|bf16|fp16`` (and ``train.grad_accum``) on the
CPU: the PushT low-dim U-Net preset (batch 256) and the PushT image preset (ResNet-18, batch 16) on a
synthetic store of PushT's shapes. No GPU was lent when this ran; on a GPU the same options apply
(``train.device=cuda``), and this script takes ``--device cuda`` to measure there.

    python benchmarks/amp_cpu.py --steps 20 --threads 1

Each (preset, amp) is run ``--repeats`` times alternately; a row gives the median samples/s of the logged
intervals (the first interval, with one-off costs, left out) and the mean training loss of the run.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _meta import append_rows, run_info

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {
    "lowdim": ("pusht_lowdim_diffusion", ["train.batch_size=256"]),
    "image": ("pusht_image_diffusion", ["train.batch_size=16"]),
}


def make_store(path: Path, image: bool) -> Path:
    from vlaflow.data.store import EpisodeStore, KeySpec

    keys = {
        "action": KeySpec("float32", (2,)),
        "obs.keypoint": KeySpec("float32", (9, 2)),
        "obs.agent_pos": KeySpec("float32", (2,)),
    }
    if image:
        keys["obs.image.top"] = KeySpec("uint8", (96, 96, 3))
    st = EpisodeStore.create(path, keys=keys, fps=10)
    rng = np.random.default_rng(0)
    for _ in range(8):
        n = 120
        ep = {
            "action": np.cumsum(rng.normal(size=(n, 2)), 0).astype(np.float32),
            "obs.keypoint": np.cumsum(rng.normal(size=(n, 9, 2)), 0).astype(np.float32),
            "obs.agent_pos": np.cumsum(rng.normal(size=(n, 2)), 0).astype(np.float32),
        }
        if image:
            ep["obs.image.top"] = rng.integers(0, 255, size=(n, 96, 96, 3), dtype=np.uint8)
        st.append_episode(ep, task="push", source="synthetic", success=True)
    st.close()
    return path


def one_run(preset: str, extra: list[str], store: Path, amp: str, steps: int, threads: int, device: str):
    from vlaflow.train.config import apply_overrides
    from vlaflow.train.presets import get_preset
    from vlaflow.train.trainer import train

    cfg = apply_overrides(
        get_preset(preset),
        [*extra, f"train.steps={steps}", "train.log_every=2", "train.ckpt_every=0", "eval.task=",
         "train.keep_step_ckpts=false", "train.progress=false", "train.logger=none", f"train.amp={amp}",
         f"train.num_threads={threads}", f"train.device={device}", "train.warmup_steps=2"],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(cfg, store, Path(tmp) / "run")
        wall = time.perf_counter() - t0
        with open(Path(tmp) / "run" / "log.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
    sps = [float(r["samples_per_s"]) for r in rows[1:]]
    return statistics.median(sps), float(np.mean([float(r["loss"]) for r in rows])), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="lowdim,image")
    ap.add_argument("--amps", default="off,bf16,fp16")
    ap.add_argument("--out", default=str(RESULTS / "amp_cpu.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    info = run_info(("vlaflow", "numpy", "torch"))
    cpu_flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    info["cpu_model"] = names[0] if names else ""
    info["cpu_bf16"] = sorted(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in cpu_flags)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            preset, extra = CASES[case]
            store = make_store(Path(tmp) / f"{case}.zarr", image=case == "image")
            res: dict[str, list] = {a: [] for a in args.amps.split(",")}
            for _ in range(args.repeats):
                for amp in res:
                    res[amp].append(one_run(preset, extra, store, amp, args.steps, args.threads, args.device))
                    print(case, amp, res[amp][-1])
            base = statistics.median(r[0] for r in res["off"]) if "off" in res else None
            if base is None:  # the "off" rows of an earlier invocation of this file
                import json

                old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else []
                offs = [r["samples_per_s"] for r in old if r["case"] == case and r["amp"] == "off"]
                base = offs[-1] if offs else None
            for amp, runs in res.items():
                sps = statistics.median(r[0] for r in runs)
                rows.append(
                    {
                        "case": case,
                        "preset": preset,
                        "overrides": extra,
                        "amp": amp,
                        "device": args.device,
                        "threads": args.threads,
                        "steps": args.steps,
                        "samples_per_s": round(sps, 1),
                        "speedup_vs_off": round(sps / base, 3) if base else None,
                        "mean_loss": round(statistics.mean(r[1] for r in runs), 4),
                        "runs_samples_per_s": [round(r[0], 1) for r in runs],
                        **info,
                    }
                )
    append_rows(args.out, rows)
    import json

    md = Path(args.out).with_suffix(".md")
    every = json.loads(Path(args.out).read_text())  # every row of the file, this run's last
    lines = [
        "# train.amp on the CPU (benchmarks/amp_cpu.py)",
        "",
        "No GPU was lent to the session that measured these; on a GPU the same options apply.",
        "",
        "| case | amp | samples/s | vs off | mean loss | threads | CPU (bf16 flags) | load at start "
        "| command, when |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} ({r['preset']}, {' '.join(r['overrides'])}, {r['steps']} steps) | {r['amp']} | "
        f"{r['samples_per_s']} | {r['speedup_vs_off']} | {r['mean_loss']} | {r['threads']} | "
        f"{r['cpu_model']} ({', '.join(r['cpu_bf16'])}) | {r['machine'].get('load_avg_at_start')} | "
        f"`{r['command']}`, {r['when']}, torch {r['versions'].get('torch')}, commit {r['git_commit']} |"
        for r in every
    ]
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
