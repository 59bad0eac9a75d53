"""GPU-minded options of the one loop, checked on the CPU: gradient accumulation equals the big batch,
bf16 / fp16 autocast (fp16 with a GradScaler whose state resumes exactly), torch.compile and its fallback,
and the batch size being global under DDP.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from vlaflow.errors import ConfigError  # noqa: E402
from vlaflow.train.accel import split_batch  # noqa: E402
from vlaflow.train.loop import LoopConfig, TrainingLoop  # noqa: E402
from vlaflow.train.objective import Objective  # noqa: E402


class Regression(Objective):
    """A small MLP (dropout present, p=0) regressing a fixed linear map: batches are a function of step."""

    prefetch = "parallel"

    def __init__(self, batch_size: int, seed: int = 0):
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Dropout(p=0.0), torch.nn.Linear(32, 3)
        )
        self.batch_size = batch_size
        self.w = torch.from_numpy(np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32))

    def batch(self, step):
        x = torch.from_numpy(
            np.random.default_rng([7, step]).normal(size=(self.batch_size, 6)).astype(np.float32)
        )
        return {"x": x, "y": x @ self.w, "names": [f"s{i}" for i in range(self.batch_size)]}

    def loss(self, batch):
        assert len(batch["names"]) == batch["x"].shape[0]  # per-sample lists are split with the tensors
        loss = ((self.module(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"loss": loss}


def run_loop(tmp: Path | None = None, resume: bool = False, obj: Objective | None = None, **kw) -> Objective:
    cfg = LoopConfig(
        **{"steps": 5, "batch_size": 16, "lr": 3e-2, "grad_clip": 0.5, "progress": False, "num_threads": 1,
           "workers": 0, "device": "cpu", "logger": "none", **kw}
    )  # fmt: skip
    obj = obj or Regression(cfg.batch_size)
    TrainingLoop(cfg, tmp, resume=resume).run(obj)
    return obj


def weights(obj) -> list[torch.Tensor]:
    return [p.detach().clone() for p in obj.module.parameters()]


def test_grad_accum_micro_batches_give_the_big_batch_update():
    ref = weights(run_loop(grad_accum=1))
    for n in (2, 4):
        got = weights(run_loop(grad_accum=n))
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # and not trivially: a different batch size moves the weights elsewhere
    other = weights(run_loop(batch_size=8, obj=Regression(8)))
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(ref, other, strict=True))


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ConfigError, match="must divide the batch of each rank \\(6 samples\\)"):
        split_batch({"x": torch.zeros(6, 2)}, 4)
    from vlaflow.train.config import TrainConfig

    with pytest.raises(ConfigError, match="batch_size=6 must be a multiple of train.grad_accum=4"):
        TrainConfig(batch_size=6, grad_accum=4)
    parts = split_batch({"x": torch.arange(8), "task": list("abcdefgh"), "k": 3}, 2)
    assert parts[1]["task"] == list("efgh") and parts[1]["x"].tolist() == [4, 5, 6, 7] and parts[1]["k"] == 3


def test_bf16_autocast_trains_close_to_float32_and_keeps_float32_weights():
    ref = run_loop(steps=3)
    obj = run_loop(steps=3, amp="bf16")
    for a, b in zip(weights(ref), weights(obj), strict=True):
        assert b.dtype == torch.float32
        assert torch.allclose(a, b, atol=5e-3), float((a - b).abs().max())
    assert any(not torch.equal(a, b) for a, b in zip(weights(ref), weights(obj), strict=True))  # bf16 ran


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    from vlaflow.data.store import EpisodeStore, KeySpec

    path = tmp_path_factory.mktemp("data") / "tiny.zarr"
    st = EpisodeStore.create(
        path, keys={"action": KeySpec("float32", (3,)), "obs.state": KeySpec("float32", (5,))}, fps=10
    )
    rng = np.random.default_rng(0)
    for i in range(4):
        x = np.cumsum(rng.normal(size=(20 + 3 * i, 5)), 0).astype(np.float32)
        st.append_episode({"action": x[:, :3] * 0.5, "obs.state": x}, task="move", source="syn", success=True)
    return path


def tiny_cfg(*extra: str):
    from vlaflow.train.config import apply_overrides
    from vlaflow.train.presets import get_preset

    return apply_overrides(
        get_preset("pick_place_lowdim_diffusion"),
        ["policy.net.unet.down_dims=[16,32]", "policy.net.unet.step_embed_dim=16",
         "data.obs_keys=[obs.state]", "data.horizon=8", "data.n_action_steps=4", "train.batch_size=8",
         "train.warmup_steps=2",
         "train.log_every=1", "train.ckpt_every=4", "train.num_threads=1", "train.num_workers=0",
         "train.progress=false", "train.logger=none", "eval.task=", *extra],
    )  # fmt: skip


def test_fp16_grad_scaler_state_resumes_exactly(store_path, tmp_path):
    import csv

    from safetensors.torch import load_file

    from vlaflow.train.trainer import train

    fp16 = ["train.amp=fp16", "train.schedule=constant", "train.warmup_steps=0"]  # lr independent of steps
    train(tiny_cfg("train.steps=8", *fp16), store_path, tmp_path / "whole")
    rows = list(csv.DictReader(open(tmp_path / "whole" / "log.csv", newline="")))
    scales = [float(r["amp_scale"]) for r in rows]
    assert len(scales) == 8 and all(s > 0 for s in scales)
    assert all(r["amp_skipped"] in ("0", "1") for r in rows)
    half = tmp_path / "half"
    train(tiny_cfg("train.steps=4", *fp16), store_path, half)
    saved = load_file(str(half / "checkpoints" / "last" / "train_state.safetensors"))
    assert float(saved["amp/scale"][0]) == scales[3]  # the scaler's state is part of the resume point
    assert int(saved["amp/growth_tracker"][0]) == 4  # four clean steps towards the next growth
    train(tiny_cfg("train.steps=8", *fp16), store_path, half, resume=True)
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "last" / "train_state.safetensors"))
    b = load_file(str(half / "checkpoints" / "last" / "train_state.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_bc_with_grad_accum_and_bf16_trains_the_diffusion_policy(store_path, tmp_path):
    from vlaflow.train.trainer import train

    res = train(tiny_cfg("train.steps=4", "train.amp=bf16", "train.grad_accum=2"), store_path, tmp_path / "r")
    assert res.step == 4 and all(np.isfinite(res.recent_losses))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "r" / "log.csv", newline="")))
    # the logged metrics are means over both micro-batches (mse_all: the unmasked loss, close to loss)
    assert len(rows) == 4 and all(abs(float(r["mse_all"]) - float(r["loss"])) < 0.2 for r in rows)


def test_compile_runs_the_loss_through_torch_compile(monkeypatch):
    # inductor's C++ build of even this MLP takes ~50 s on a loaded 2-core CPU: the test traces with
    # dynamo + AOT autograd (the same torch.compile path, without the C++ step)
    calls = []
    real = torch.compile

    def compile_aot(fn, **kw):
        calls.append(fn)
        return real(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot)
    ref = weights(run_loop(steps=3))
    got = weights(run_loop(steps=3, compile=True))
    assert len(calls) == 1
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compile_failure_falls_back_to_eager_with_a_note(monkeypatch, capsys):
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler found for inductor")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    ref = weights(run_loop(steps=3))
    got = weights(run_loop(steps=3, compile=True))
    assert (
        "torch.compile failed (RuntimeError: no C++ compiler found for inductor); training continues eager"
        in (capsys.readouterr().out)
    )
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_batch_size_is_global_under_ddp():
    """Each rank takes batch_size / world of a step's windows (what the README's GPU section says)."""
    import vlaflow.train.schedule as S

    idx = S.batch_indices(0, 3, 1000, 64)
    shards = [S.shard(idx, r, 4) for r in range(4)]
    assert [len(s) for s in shards] == [16] * 4
    assert sorted(np.concatenate(shards).tolist()) == sorted(idx.tolist())


def test_grad_accum_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    """2 torchrun ranks x 2 micro-batches (no_sync on the first) = one process, one batch of 16."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found beside {sys.executable}")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    worker = str(here / "ddp_accum_worker.py")
    subprocess.run([sys.executable, worker, str(tmp_path / "one.safetensors"), "1"], env=env, check=True)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), worker, str(tmp_path / "ddp.safetensors"), "2"]  # fmt: skip
    p = subprocess.run(
        cmd, env={**env, "GLOO_SOCKET_IFNAME": "lo"}, capture_output=True, text=True, timeout=240
    )
    assert p.returncode == 0, p.stderr[-3000:]
    one, ddp = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "ddp.safetensors"))
    assert set(one) == set(ddp)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-5, atol=1e-6)
