"""``vlaflow import-lerobot`` parity at full PushT size: LeRobot 0.4.4's DiffusionPolicy vs the imported one.

    python benchmarks/lerobot_import.py                        # PushT low-dim + LeRobot's PushT image policy
    python benchmarks/lerobot_import.py --configs small --batch 3

1. ``benchmarks/lerobot_policy_fixture.py SIZE TMP`` in LeRobot's venv (never imports vlaflow) builds the
   policy, saves it with ``save_pretrained`` + its processors and records ``predict_action_chunk`` for
   fixed observations and initial noise (DDPM-100 with seeded per-step noise, DDIM-10). ``pusht``: the
   low-dim PushT U-Net (down_dims 64/128/256, step embedding 128, kernel 5, To 2, H 16, Ta 8, DDPM-100,
   squared cosine, epsilon, clip 1.0; 4,559,554 parameters); ``pusht_image``: LeRobot's
   lerobot/diffusion_pusht configuration (its default down_dims 512/1024/2048, one 96x96 camera
   ``observation.image`` cropped to 84x84, ResNet-18 with GroupNorm, pixels normalised by mean/std).
2. ``vlaflow import-lerobot TMP --out TMP/ckpt --fps 10`` (a subprocess, as a user runs it).
3. The checkpoint is loaded and sampled with the same noise; the first Ta rows of its chunk (which
   starts at the current step) are compared with LeRobot's chunk: max abs difference in raw action units
   (pixels) and in normalised units.
4. ``vlaflow export`` of the checkpoint (dynamo exporter, opset 18; its own parity report against PyTorch)
   and the ONNX Runtime chunk (DDIM-10, same noise) against LeRobot's (configs in ``--onnx``).

Writes ``benchmarks/results/lerobot_import.json`` and ``.md`` with the commands, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LEROBOT_PY = "/work/venvs/lerobot/bin/python"
RESULTS = ROOT / "benchmarks" / "results"
TA = 8


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    p.seconds = time.perf_counter() - t0
    return p


def _short(cmd: list[str], tmp: str) -> str:
    return " ".join(cmd).replace(tmp, "$TMP").replace(sys.executable, "python").replace(str(ROOT) + "/", "")


def parity(cfg_name: str, args, tmp: str, onnx: bool) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    import vlaflow.keys as K
    from vlaflow.deploy.onnx_runtime import OnnxPolicy
    from vlaflow.policies.checkpoint import load_checkpoint

    lr_dir, ckpt, onnx_dir = f"{tmp}/{cfg_name}/lerobot", f"{tmp}/{cfg_name}/ckpt", f"{tmp}/{cfg_name}/onnx"
    fixture = [args.lerobot_python, "benchmarks/lerobot_policy_fixture.py", cfg_name, lr_dir]
    fixture += ["--batch", str(args.batch)]
    lr_info = json.loads(_run(fixture).stdout.strip().splitlines()[-1])
    imp = [sys.executable, "-m", "vlaflow.cli", "import-lerobot", lr_dir, "--out", ckpt, "--fps", "10"]
    p_imp = _run(imp)
    cmds = [fixture, imp]
    e = load_file(f"{lr_dir}/expected.safetensors")
    policy = load_checkpoint(ckpt)
    std = torch.as_tensor(policy.normalizer.stats["action"]["std"])
    lr_obs = {"observation.state": e["state"], "observation.environment_state": e["env"]}
    lr_obs.update({k: v for k, v in e.items() if k.startswith("observation.image")})
    obs = {K.from_lerobot(k): v for k, v in lr_obs.items()}
    t0 = time.perf_counter()
    with torch.inference_mode():
        ddim = policy.sample(obs, noise=e["noise"], sampler="ddim", num_steps=10)
        g = torch.Generator().manual_seed(int(e["ddpm_seed"][0]))
        ddpm = policy.sample(obs, noise=e["noise"], sampler="ddpm", num_steps=100, generator=g)
    sample_s = time.perf_counter() - t0

    def diff(ours, theirs):
        d = (ours[:, :TA] - theirs).abs()
        return {"max_abs_raw": float(d.max()), "max_abs_normalised": float((d / std).max())}

    res = {
        "lerobot_side": lr_info,
        "observation_windows": int(e["state"].shape[0]),
        "inputs": list(policy.config.obs_shapes),
        "parameters": {"lerobot": lr_info["parameters"], "vlaflow": policy.num_parameters()},
        "action_scale": {"std": std.tolist(), "max_abs_chunk": float(e["chunk_ddim"].abs().max())},
        "chunk_vs_lerobot": {
            "ddim_10": diff(ddim, e["chunk_ddim"]),
            "ddpm_100_seeded": diff(ddpm, e["chunk_ddpm"]),
        },
        "seconds": {"import": p_imp.seconds, "vlaflow_sampling_ddim10_plus_ddpm100": sample_s},
        "import_stdout": p_imp.stdout.strip().splitlines(),
    }
    if onnx:
        exp = [sys.executable, "-m", "vlaflow.cli", "export", ckpt, "--out", onnx_dir]
        exp += ["--samplers", "ddim:10,ddpm:100"]
        p_exp = _run(exp)
        cmds.append(exp)
        ort = OnnxPolicy(onnx_dir)
        chunks = []
        for i in range(e["state"].shape[0]):
            cond = ort.encode({k: v[i].numpy() for k, v in lr_obs.items()})  # LeRobot's names as aliases
            x0 = ort.denoise(cond, e["noise"][i : i + 1].numpy(), "ddim", 10)
            chunks.append(ort.unnormalize_action(x0[0])[ort.action_offset :])
        res["chunk_vs_lerobot"]["onnx_ddim_10"] = diff(torch.from_numpy(np.stack(chunks)), e["chunk_ddim"])
        res["onnx_parity_vs_pytorch"] = json.loads(Path(onnx_dir, "parity.json").read_text()).get("summary")
        res["seconds"]["export"] = p_exp.seconds
    res["commands"] = [_short(c, tmp) for c in cmds]
    shutil.rmtree(f"{tmp}/{cfg_name}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="pusht,pusht_image", help="fixture sizes, comma-separated")
    ap.add_argument("--onnx", default="pusht", help="configs also exported to ONNX, comma-separated")
    ap.add_argument("--batch", type=int, default=4, help="observation windows")
    ap.add_argument("--lerobot-python", default=LEROBOT_PY)
    ap.add_argument("--out", default=str(RESULTS / "lerobot_import"), help="results path without suffix")
    args = ap.parse_args(argv)

    import torch

    from benchmarks._meta import run_info

    torch.set_num_threads(1)
    info = run_info(("vlaflow", "numpy", "torch", "onnx", "onnxruntime", "safetensors"))
    onnx = set(filter(None, args.onnx.split(",")))
    with tempfile.TemporaryDirectory(prefix="lerobot_import_") as tmp:
        results = {c: parity(c, args, tmp, c in onnx) for c in filter(None, args.configs.split(","))}
    doc = {
        "benchmark": "vlaflow import-lerobot: the imported diffusion policy vs LeRobot's chunk",
        **info,
        "configs": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    m = doc["machine"]
    lv = next(iter(results.values()))["lerobot_side"]["versions"]
    lines = [
        f"# `vlaflow import-lerobot`: imported diffusion policies vs LeRobot {lv['lerobot']}",
        "",
        f"{doc['when']}, {m.get('processor', '')} x {m.get('cpu_count', '?')} CPUs, 1 torch thread; "
        f"LeRobot side: lerobot {lv['lerobot']}, diffusers {lv['diffusers']}, torch {lv['torch']}; "
        f"vlaflow side: torch {doc['versions'].get('torch')}, "
        f"onnxruntime {doc['versions'].get('onnxruntime')}.",
        "",
        f"Same observations, same initial noise: LeRobot's `predict_action_chunk` (Ta = {TA} rows from the "
        f"current step) vs the first {TA} rows of the imported checkpoint's chunk. Actions in pixels; "
        "'normalised' divides by the action std (90, 110). DDPM-100's per-step noise is drawn from "
        "generators seeded alike on both sides.",
        "",
        "| config | inputs | parameters (LeRobot / vlaflow) | sampler | max abs diff (px) | (normalised) |",
        "|---|---|---|---|---:|---:|",
    ]
    names = {"ddim_10": "DDIM-10", "ddpm_100_seeded": "DDPM-100", "onnx_ddim_10": "DDIM-10, ONNX Runtime"}
    for c, r in results.items():
        par = f"{r['parameters']['lerobot']:,} / {r['parameters']['vlaflow']:,}"
        for k, row in r["chunk_vs_lerobot"].items():
            lines.append(
                f"| `{c}` | {', '.join(r['inputs'])} | {par} | {names[k]} | {row['max_abs_raw']:.2e} | "
                f"{row['max_abs_normalised']:.2e} |"
            )
    lines += ["", "Commands:", "", f"    {info['command']}"]
    for r in results.values():
        lines += [f"    {cmd}" for cmd in r["commands"]]
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
