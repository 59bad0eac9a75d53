"""``vlaflow import-lerobot`` parity at full PushT size: LeRobot 0.4.4's DiffusionPolicy vs the imported one.

    python benchmarks/lerobot_import.py                      # PushT low-dim sizes, 8 observation windows
    python benchmarks/lerobot_import.py --size small --batch 3

1. ``benchmarks/lerobot_policy_fixture.py SIZE TMP`` in LeRobot's venv (never imports vlaflow) builds the
   policy (``pusht``: down_dims 64/128/256, step embedding 128, kernel 5, To 2, H 16, Ta 8, DDPM-100,
   squared cosine, epsilon, clip 1.0; 4,559,554 parameters), saves it with ``save_pretrained`` + its
   processors and records ``predict_action_chunk`` for fixed observations and initial noise (DDPM-100
   with seeded per-step noise, DDIM-10).
2. ``vlaflow import-lerobot TMP --out TMP/ckpt --fps 10`` (a subprocess, as a user runs it).
3. The checkpoint is loaded and sampled with the same noise; the first Ta rows of its chunk (which
   starts at the current step) are compared with LeRobot's chunk: max abs difference in raw action units
   (pixels) and in normalised units.
4. ``vlaflow export`` of the checkpoint (dynamo exporter, opset 18; its own parity report against PyTorch)
   and the ONNX Runtime chunk (DDIM-10, same noise) against LeRobot's.

Writes ``benchmarks/results/lerobot_import.json`` and ``.md`` with the commands, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("pusht", "small"), default="pusht")
    ap.add_argument("--batch", type=int, default=8, help="observation windows")
    ap.add_argument("--lerobot-python", default=LEROBOT_PY)
    ap.add_argument("--out", default=str(RESULTS / "lerobot_import"), help="results path without suffix")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from benchmarks._meta import run_info
    from vlaflow.deploy.onnx_runtime import OnnxPolicy
    from vlaflow.policies.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    info = run_info(("vlaflow", "numpy", "torch", "onnx", "onnxruntime", "safetensors"))
    commands = []
    with tempfile.TemporaryDirectory(prefix="lerobot_import_") as tmp:
        lr_dir, ckpt, onnx_dir = f"{tmp}/lerobot", f"{tmp}/ckpt", f"{tmp}/onnx"
        fixture = [
            args.lerobot_python,
            "benchmarks/lerobot_policy_fixture.py",
            args.size,
            lr_dir,
            "--batch",
            str(args.batch),
        ]
        lr_info = json.loads(_run(fixture).stdout.strip().splitlines()[-1])
        imp = [sys.executable, "-m", "vlaflow.cli", "import-lerobot", lr_dir, "--out", ckpt, "--fps", "10"]
        p_imp = _run(imp)
        exp = [
            sys.executable,
            "-m",
            "vlaflow.cli",
            "export",
            ckpt,
            "--out",
            onnx_dir,
            "--samplers",
            "ddim:10,ddpm:100",
        ]
        p_exp = _run(exp)
        commands = [_short(c, tmp) for c in (fixture, imp, exp)]

        e = load_file(f"{lr_dir}/expected.safetensors")
        policy = load_checkpoint(ckpt)
        std = torch.as_tensor(policy.normalizer.stats["action"]["std"])
        obs = {"obs.state": e["state"], "obs.environment_state": e["env"]}
        with torch.inference_mode():
            ddim = policy.sample(obs, noise=e["noise"], sampler="ddim", num_steps=10)
            g = torch.Generator().manual_seed(int(e["ddpm_seed"][0]))
            ddpm = policy.sample(obs, noise=e["noise"], sampler="ddpm", num_steps=100, generator=g)

        def diff(ours, theirs):
            d = (ours[:, :TA] - theirs).abs()
            return {"max_abs_raw": float(d.max()), "max_abs_normalised": float((d / std).max())}

        ort = OnnxPolicy(onnx_dir)
        onnx_chunks = []
        for i in range(e["state"].shape[0]):
            cond = ort.encode(
                {
                    "observation.state": e["state"][i].numpy(),
                    "observation.environment_state": e["env"][i].numpy(),
                }
            )
            x0 = ort.denoise(cond, e["noise"][i : i + 1].numpy(), "ddim", 10)
            onnx_chunks.append(ort.unnormalize_action(x0[0])[ort.action_offset :])
        onnx_chunk = torch.from_numpy(np.stack(onnx_chunks))
        parity = json.loads(Path(onnx_dir, "parity.json").read_text())
        doc = {
            "benchmark": "vlaflow import-lerobot: the imported diffusion policy vs LeRobot's chunk",
            **info,
            "commands": commands,
            "lerobot_side": lr_info,
            "size": args.size,
            "observation_windows": int(e["state"].shape[0]),
            "parameters": {"lerobot": lr_info["parameters"], "vlaflow": policy.num_parameters()},
            "action_scale": {"std": std.tolist(), "max_abs_chunk": float(e["chunk_ddim"].abs().max())},
            "chunk_vs_lerobot": {
                "ddim_10": diff(ddim, e["chunk_ddim"]),
                "ddpm_100_seeded": diff(ddpm, e["chunk_ddpm"]),
                "onnx_ddim_10": diff(onnx_chunk, e["chunk_ddim"]),
            },
            "onnx_parity_vs_pytorch": parity.get("summary"),
            "seconds": {"import": p_imp.seconds, "export": p_exp.seconds},
            "import_stdout": p_imp.stdout.strip().splitlines(),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    c, m, lv = doc["chunk_vs_lerobot"], doc["machine"], lr_info["versions"]
    lines = [
        "# `vlaflow import-lerobot`: imported diffusion policy vs LeRobot "
        f"{lr_info['versions']['lerobot']} (`{args.size}` config)",
        "",
        f"{doc['when']}, {m.get('processor', '')} x {m.get('cpu_count', '?')} CPUs; "
        f"LeRobot side: lerobot {lv['lerobot']}, diffusers {lv['diffusers']}, "
        f"torch {lr_info['versions']['torch']}; vlaflow side: torch {doc['versions'].get('torch')}, "
        f"onnxruntime {doc['versions'].get('onnxruntime')}.",
        "",
        f"Parameters: LeRobot {doc['parameters']['lerobot']:,}, vlaflow {doc['parameters']['vlaflow']:,}. "
        f"{doc['observation_windows']} observation windows, the same initial noise; LeRobot's "
        f"`predict_action_chunk` (Ta = {TA} rows from the current step) vs the first {TA} rows of vlaflow's "
        f"chunk. Actions in pixels (std {', '.join(f'{s:g}' for s in doc['action_scale']['std'])}; "
        f"|chunk| up to {doc['action_scale']['max_abs_chunk']:.0f}).",
        "",
        "| sampler | max abs diff (pixels) | max abs diff (normalised) |",
        "|---|---:|---:|",
        f"| DDIM-10, PyTorch | {c['ddim_10']['max_abs_raw']:.2e} | "
        f"{c['ddim_10']['max_abs_normalised']:.2e} |",
        f"| DDPM-100 (per-step noise seeded alike), PyTorch | {c['ddpm_100_seeded']['max_abs_raw']:.2e} | "
        f"{c['ddpm_100_seeded']['max_abs_normalised']:.2e} |",
        f"| DDIM-10, ONNX Runtime (exported checkpoint) | {c['onnx_ddim_10']['max_abs_raw']:.2e} | "
        f"{c['onnx_ddim_10']['max_abs_normalised']:.2e} |",
        "",
        "Commands:",
        "",
        *[f"    {cmd}" for cmd in [info["command"], *commands]],
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
