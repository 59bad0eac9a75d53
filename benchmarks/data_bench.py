"""Data benchmarks: ingest of the full PushT human dataset (with images) and training-window throughput.

Targets (issue 2): ingest 25,650 frames with images in <= 30 s; windows (To=2, H=16) at >= 20,000
samples/s low-dim and >= 2,000 samples/s with one 96x96 camera, single process.

    python benchmarks/data_bench.py [--src ../shared/data/pusht_cchi_v7/pusht_cchi_v7_replay.zarr]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

from vlaflow.data.ingest import dp_zarr  # noqa: E402
from vlaflow.data.store import EpisodeStore  # noqa: E402
from vlaflow.data.windows import WindowSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sample_rate(ws: WindowSampler, batch: int, seconds: float) -> float:
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ws.get_batch(rng.integers(0, len(ws), batch))
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(REPO.parent / "shared/data/pusht_cchi_v7/pusht_cchi_v7_replay.zarr"))
    ap.add_argument("--repeats", type=int, default=3, help="ingest repeats (best and all are recorded)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/data.json"))
    args = ap.parse_args()
    info = run_info()
    tmp = Path(tempfile.mkdtemp())
    ingest_s = []
    try:
        for r in range(args.repeats):
            dest = tmp / f"pusht{r}.zarr"
            t0 = time.perf_counter()
            summary = dp_zarr.ingest(args.src, dest, progress=False)
            ingest_s.append(time.perf_counter() - t0)
        store = EpisodeStore.open(tmp / "pusht0.zarr")
        t0 = time.perf_counter()
        low = WindowSampler(store, ["obs.keypoint", "obs.agent_pos"], n_obs_steps=2, horizon=16)
        load_low = time.perf_counter() - t0
        t0 = time.perf_counter()
        img = WindowSampler(store, ["obs.image.top", "obs.agent_pos"], n_obs_steps=2, horizon=16)
        load_img = time.perf_counter() - t0
        rows = {
            "ingest_pusht_with_images": {
                "frames": summary["n_steps"],
                "episodes": summary["n_episodes"],
                "seconds_best": round(min(ingest_s), 2),
                "seconds_all": [round(s, 2) for s in ingest_s],
                "target_s": 30.0,
                "pass": min(ingest_s) <= 30.0,
            },
            "windows_lowdim_b256": {
                "samples_per_s": round(sample_rate(low, 256, 3.0)),
                "load_s": round(load_low, 2),
                "target": 20000,
            },
            "windows_1cam96_b64": {
                "samples_per_s": round(sample_rate(img, 64, 3.0)),
                "load_s": round(load_img, 2),
                "target": 2000,
            },
        }
        for k in ("windows_lowdim_b256", "windows_1cam96_b64"):
            rows[k]["pass"] = rows[k]["samples_per_s"] >= rows[k]["target"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {**info, "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| benchmark | measured | target | pass |", "|---|---|---|---|"]
    r = rows["ingest_pusht_with_images"]
    lines.append(
        f"| ingest PushT 25,650 frames + 96x96 images | {r['seconds_best']} s | <= 30 s | {r['pass']} |"
    )
    for k, label in (
        ("windows_lowdim_b256", "windows low-dim To=2 H=16"),
        ("windows_1cam96_b64", "windows 1 camera 96x96 To=2 H=16"),
    ):
        r = rows[k]
        lines.append(f"| {label} | {r['samples_per_s']:,} samples/s | >= {r['target']:,} | {r['pass']} |")
    md = "\n".join(lines)
    Path(args.out).with_suffix(".md").write_text(
        f"# Data benchmarks\n\n`{info['command']}` at {info['when']} (commit {info['git_commit']}) on "
        f"{info['machine']['platform']}, {info['machine']['cpu_count']} CPUs, load average at start "
        f"{info['machine']['load_avg_at_start']}.\n\n{md}\n"
    )
    print(md)


if __name__ == "__main__":
    main()
