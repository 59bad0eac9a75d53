"""The world model's per-step denoiser exported to ONNX: torch vs ONNX Runtime parity, no Loop op."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlaflow.errors import VlaflowError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained_toy():
    from test_world_models import linear_episodes, small_config

    from vlaflow.world_models.data import train_world_model, transition_windows

    cfg = small_config(n_obs_steps=2, n_future=2)
    win = transition_windows(linear_episodes(32, 30, seed=0), 2, 2)
    model, _ = train_world_model(cfg, win, steps=200, batch_size=128, lr=2e-3, max_seconds=20)
    return model


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_world_model_denoiser_exports_and_onnx_runtime_matches_torch(trained_toy, tmp_path, exporter):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from vlaflow.policies.onnx_graph import graph_ops
    from vlaflow.world_models.export import export_world_model

    out = tmp_path / "onnx"
    man = export_world_model(trained_toy, out, exporter=exporter, n_parity=4)
    assert sorted(p.name for p in out.iterdir()) == ["denoiser.onnx", "manifest.json", "parity.json"]
    par = json.loads((out / "parity.json").read_text())
    assert (
        par["step_max_abs"] < 1e-4
        and par["next_max_abs_normalized"] < 1e-3
        and par["next_min_cosine"] > 0.9999
    )
    assert par["num_steps"] == 3 and man["graphs"]["denoiser"]["inputs"]["x_t"] == [1, 2, 3]
    assert not {"Loop", "Scan", "If"} & set(graph_ops(out / "denoiser.onnx"))
    # an independent check: a fresh session on one (x_t, t, cond) equals the model's predict
    sess = ort.InferenceSession(str(out / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(5)
    x, cond = torch.randn(1, 2, 3, generator=g), torch.randn(1, 1, trained_toy.cond_dim, generator=g)
    t = torch.tensor([0.7])
    got = sess.run(None, {"x_t": x.numpy(), "t": t.numpy(), "cond": cond.numpy()})[0]
    with torch.no_grad():
        want = trained_toy.predict(x, t, cond).numpy()
    assert np.abs(got - want).max() < 1e-4 and np.abs(want).max() > 1e-3
    with pytest.raises(VlaflowError, match="exists"):
        export_world_model(trained_toy, out)


def test_a_failed_parity_leaves_no_export(trained_toy, tmp_path):
    pytest.importorskip("onnxruntime")
    from vlaflow.world_models.export import export_world_model

    with pytest.raises(VlaflowError, match="parity failed: .*step_min_cosine"):  # an unreachable cosine
        export_world_model(trained_toy, tmp_path / "x", exporter="torchscript", n_parity=1, min_cosine=1.0001)
    assert not (tmp_path / "x").exists()


def test_vlaflow_export_of_a_world_model_checkpoint(trained_toy, tmp_path):
    pytest.importorskip("onnxruntime")
    import subprocess
    import sys
    from pathlib import Path

    from vlaflow.world_models.checkpoint import save_world_model

    save_world_model(tmp_path / "wm", trained_toy)
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "vlaflow.cli", "export", str(tmp_path / "wm"), "--out", str(tmp_path / "x")]
    res = subprocess.run(
        [*cmd, "--exporter", "torchscript"], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "exported world model" in res.stdout and "denoiser step  max-abs" in res.stdout
    man = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert man["format"] == "vlaflow.onnx_world_model" and man["source"] == str(tmp_path / "wm")
