"""``vlaflow serve`` called by openpi's own client (``openpi-client`` from PyPI) over loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
client_mod = pytest.importorskip("openpi_client.websocket_client_policy")

from vlaflow.policies import DiffusionConfig, build_policy, save_checkpoint  # noqa: E402
from vlaflow.policies.base_config import NetConfig, UNetConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _stats(shape, lo, hi):
    lo_a, hi_a = np.full(shape, lo, np.float32), np.full(shape, hi, np.float32)
    return {"min": lo_a, "max": hi_a, "mean": (lo_a + hi_a) / 2, "std": hi_a - lo_a, "q01": lo_a, "q99": hi_a}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    net = NetConfig(
        kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, step_embed_dim=16)
    )
    stats = {
        "action": _stats((2,), 0, 512),
        "obs.keypoint": _stats((9, 2), 0, 512),
        "obs.agent_pos": _stats((2,), 0, 512),
    }
    policy = build_policy(
        DiffusionConfig(net=net, horizon=8, n_action_steps=4, num_inference_steps=4), stats
    ).eval()
    ckpt = save_checkpoint(tmp_path_factory.mktemp("srv") / "ckpt", policy)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "vlaflow.cli",
        "serve",
        "--policy",
        str(ckpt),
        "--port",
        str(port),
        "--duration",
        "120",
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    t_end = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                health = (r.status, r.read().decode())
            break
        except OSError as e:
            if time.monotonic() > t_end or proc.poll() is not None:
                proc.kill()
                raise AssertionError(f"vlaflow serve did not come up: {proc.stderr.read()}") from e
            time.sleep(0.2)
    yield ckpt, port, health
    proc.terminate()
    proc.wait(20)


def _obs(rng):
    return {
        "obs.keypoint": rng.uniform(0, 512, (2, 9, 2)).astype(np.float32),
        "obs.agent_pos": rng.uniform(0, 512, (2, 2)).astype(np.float32),
    }


def test_openpi_client_gets_the_chunk_policy_infer_gives(served):
    import vlaflow

    ckpt, port, health = served
    assert health == (200, "OK\n")
    torch.set_num_threads(1)
    client = client_mod.WebsocketClientPolicy(host="127.0.0.1", port=port)
    meta = client.get_server_metadata()
    assert meta["horizon"] == 8 and meta["action_dim"] == 2 and meta["obs_shapes"]["obs.keypoint"] == [9, 2]
    local = vlaflow.load_policy(ckpt)
    rng = np.random.default_rng(0)
    for seed in (3, 4):
        obs = _obs(rng)
        assert client.infer({"reset": True, "seed": seed}) == {"reset": True}
        out = client.infer(obs)
        local.reset(seed=seed)
        ref = local.infer(obs).actions
        assert out["actions"].dtype == np.float32 and out["actions"].shape == (8, 2)
        np.testing.assert_allclose(out["actions"], ref, rtol=0, atol=1e-5)
        assert out["server_timing"]["infer_ms"] > 0


def test_bad_requests_get_an_error_reply_and_the_server_stays_up(served):
    _, port, _ = served
    client = client_mod.WebsocketClientPolicy(host="127.0.0.1", port=port)
    rng = np.random.default_rng(1)
    good = _obs(rng)
    with pytest.raises(RuntimeError, match=r"missing observation key\(s\) \['obs.agent_pos'\]"):
        client.infer({"obs.keypoint": good["obs.keypoint"]})
    with pytest.raises(
        RuntimeError, match=r"obs.keypoint: expected \(9, 2\) \(one step\) or \(2, 9, 2\), got \(2, 7, 2\)"
    ):
        client.infer({**good, "obs.keypoint": np.zeros((2, 7, 2), np.float32)})
    with pytest.raises(RuntimeError, match="obs.agent_pos: expected an array, got str"):
        client.infer({**good, "obs.agent_pos": "left"})
    one_step = {k: v[-1] for k, v in good.items()}  # single steps build the connection's window
    assert client.infer(one_step)["actions"].shape == (8, 2)
    assert client.infer(good)["actions"].shape == (8, 2)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
        assert r.status == 200
