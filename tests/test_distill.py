"""One-step consistency distillation: the student learns the teacher's noise -> action map, is a policy
checkpoint like any other (registry, load_policy, eval), and samples with one network evaluation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaflow.policies import DiffusionConfig, FlowConfig, NetConfig, UNetConfig, build_policy, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NET = NetConfig(
    kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, step_embed_dim=16)
)
OBS = {"obs.keypoint": (9, 2), "obs.agent_pos": (2,)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from vlaflow.data.store import EpisodeStore, KeySpec

    path = tmp_path_factory.mktemp("d") / "toy.zarr"
    st = EpisodeStore.create(
        path,
        keys={
            "action": KeySpec("float32", (2,)),
            "obs.keypoint": KeySpec("float32", (9, 2)),
            "obs.agent_pos": KeySpec("float32", (2,)),
        },
        fps=10,
    )
    rng = np.random.default_rng(0)
    for _ in range(4):
        n = 30
        pos = (256 + np.cumsum(rng.normal(0, 5, size=(n, 2)), 0)).astype(np.float32)
        kp = (pos[:, None, :] + rng.normal(0, 20, size=(n, 9, 2))).astype(np.float32)
        st.append_episode(
            {"action": pos, "obs.keypoint": kp, "obs.agent_pos": pos}, task="push", source="syn"
        )
    return path


def _teacher(store: Path, tmp: Path, fam: str) -> Path:
    from vlaflow.data.normalize import compute_stats
    from vlaflow.data.store import EpisodeStore

    cls = FlowConfig if fam == "flow" else DiffusionConfig
    cfg = cls(obs_shapes=OBS, action_dim=2, horizon=8, n_action_steps=4, net=NET, num_inference_steps=4)
    torch.manual_seed(0)
    pol = build_policy(cfg, compute_stats(EpisodeStore.open(store), ["action", *OBS]))
    return save_checkpoint(tmp / f"teacher_{fam}", pol)


@pytest.mark.parametrize("fam", ["flow", "diffusion"])
def test_student_learns_the_teacher_map_and_loads_like_any_policy(store, tmp_path, fam):
    import vlaflow
    from vlaflow.train.objectives.distill import distill

    teacher = _teacher(store, tmp_path, fam)
    kw = dict(
        teacher=str(teacher), data=str(store), minutes=0, batch_size=32, pool=256, refresh=32, progress=False
    )
    before = distill(out=str(tmp_path / "s0"), steps=1, **kw)
    after = distill(out=str(tmp_path / "s1"), steps=80, lr=1e-3, **kw)
    err0, err1 = before["val_mean_abs_err_normalized"], after["val_mean_abs_err_normalized"]
    if fam == "diffusion":  # x0 head starts far from the teacher: training must close most of the gap
        assert err1 < 0.5 * err0, (before, after)
    else:  # a flow student starts as the teacher's own one-step Euler (x0 = x_1 - u): already close
        assert err0 < 0.1 and err1 < 0.1, (before, after)
    rt = vlaflow.load_policy(tmp_path / "s1")
    assert rt.policy.config.family == "consistency" and rt.config.extra["num_inference_steps"] == 1
    obs = {
        "obs.keypoint": np.full((2, 9, 2), 256, np.float32),
        "obs.agent_pos": np.full((2, 2), 256, np.float32),
    }
    a = rt.infer(obs).actions
    assert a.shape == (8, 2) and np.isfinite(a).all()
    cond = rt.policy.encode({k: torch.from_numpy(v)[None] for k, v in obs.items()})
    assert rt.policy.denoise(cond).nfe == 1
    with pytest.raises(vlaflow.errors.VlaflowError, match="one step"):
        rt.policy.denoise(cond, sampler="ddim")


def test_distill_cli_and_eval_of_the_student(store, tmp_path):
    pytest.importorskip("gym_pusht")
    from vlaflow.sim.evaluate import evaluate

    teacher = _teacher(store, tmp_path, "flow")
    out = tmp_path / "student"
    cmd = [sys.executable, "-m", "vlaflow.cli", "distill", "--teacher", str(teacher), "--data", str(store)]
    cmd += [
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--pool",
        "64",
        "--refresh",
        "8",
        "--no-progress",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"student_nfe": 1' in res.stdout and (out / "model.safetensors").is_file()
    rep = evaluate(str(out), task="pusht", n_episodes=1, max_steps=10, workers=0, progress=False)
    assert rep["aggregate"]["n_episodes"] == 1 and not rep["errors"]
    bad = subprocess.run(
        cmd[:-1] + ["--no-progress", "--batch-size", "0"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 1 and "batch-size" in bad.stderr + bad.stdout


def test_narrower_student_learns_from_scratch_and_loads(store, tmp_path):
    import vlaflow
    from vlaflow.errors import ConfigError
    from vlaflow.train.objectives.distill import distill, parse_dims

    teacher = _teacher(store, tmp_path, "flow")
    kw = dict(
        teacher=str(teacher), data=str(store), minutes=0, batch_size=32, pool=256, refresh=32, progress=False
    )
    before = distill(out=str(tmp_path / "n0"), steps=1, student_dims=(8, 16), **kw)
    after = distill(out=str(tmp_path / "n1"), steps=120, lr=3e-3, student_dims=(8, 16), **kw)
    assert after["student_down_dims"] == [8, 16]
    assert after["student_parameters"] < 0.5 * after["teacher_parameters"]
    assert after["val_mean_abs_err_normalized"] < 0.5 * before["val_mean_abs_err_normalized"], (before, after)
    rt = vlaflow.load_policy(tmp_path / "n1")
    assert rt.policy.config.net.unet.down_dims == (8, 16)
    assert parse_dims("32, 64,128") == (32, 64, 128) and parse_dims("") is None
    for bad in ("a,b", "0,4"):
        with pytest.raises(ConfigError, match="student-dims"):
            parse_dims(bad)


def test_mlp_student_trains_on_a_cached_fixed_teacher_set(store, tmp_path, monkeypatch):
    import vlaflow
    import vlaflow.train.objectives.distill as D
    from vlaflow.errors import ConfigError

    teacher = _teacher(store, tmp_path, "flow")
    cache = tmp_path / "pairs.pt"
    kw = dict(teacher=str(teacher), data=str(store), minutes=0, batch_size=64, progress=False)
    kw |= dict(student_net="mlp:64x2", teacher_pairs_n=384, teacher_cache=str(cache))
    before = D.distill(out=str(tmp_path / "m0"), steps=1, **kw)
    assert cache.is_file() and before["teacher_pairs"] == 384 and before["student_net"] == "mlp:64x2"

    calls = []
    real = D.teacher_pairs
    monkeypatch.setattr(D, "teacher_pairs", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    after = D.distill(out=str(tmp_path / "m1"), steps=150, lr=3e-3, lr_decay="cosine", **kw)
    assert calls == [256], "the second run must read the cached set (only the 256 check pairs are new)"
    assert not before["teacher_set_cached"] and after["teacher_set_cached"]
    assert after["val_mean_abs_err_normalized"] < 0.5 * before["val_mean_abs_err_normalized"], (before, after)
    rt = vlaflow.load_policy(tmp_path / "m1")
    assert rt.policy.config.net.kind == "mlp" and rt.policy.config.net.mlp.width == 64
    assert rt.infer({k: np.full((2, *s), 256, np.float32) for k, s in OBS.items()}).actions.shape == (8, 2)

    other = _teacher(store, tmp_path, "diffusion")
    with pytest.raises(ConfigError, match="was made by"):
        D.distill(out=str(tmp_path / "m2"), steps=1, **{**kw, "teacher": str(other)})
    retrained = vlaflow.policies.checkpoint.load_checkpoint(teacher)
    with torch.no_grad():
        next(retrained.parameters()).add_(1.0)
    vlaflow.policies.save_checkpoint(tmp_path / "retrained", retrained)
    cache.rename(tmp_path / "pairs_old.pt")  # the same teacher path, other weights: the set is stale
    D.distill(out=str(tmp_path / "m3"), steps=1, **kw)
    teacher.rename(tmp_path / "teacher_old")
    (tmp_path / "retrained").rename(teacher)
    with pytest.raises(ConfigError, match="was made by"):
        D.distill(out=str(tmp_path / "m2"), steps=1, **kw)
    teacher.rename(tmp_path / "retrained")
    (tmp_path / "teacher_old").rename(teacher)
    with pytest.raises(ConfigError, match="fewer than"):
        D.distill(out=str(tmp_path / "m2"), steps=1, **{**kw, "teacher_pairs_n": 999})
    with pytest.raises(ConfigError, match="teacher-pairs"):
        D.distill(out=str(tmp_path / "m2"), steps=1, **{**kw, "teacher_pairs_n": 0})


def test_parse_student_net():
    from vlaflow.errors import ConfigError
    from vlaflow.train.objectives.distill import parse_student_net

    assert parse_student_net("mlp:1024x3") == ("mlp", (1024, 3))
    assert parse_student_net("MLP") == ("mlp", None)
    assert parse_student_net("unet:32,64") == ("unet", (32, 64))
    assert parse_student_net("") is None
    for bad in ("mlp:1024", "mlp:0x2", "unet:", "lstm:3"):
        with pytest.raises(ConfigError, match="student-net"):
            parse_student_net(bad)


def test_narrower_unet_starts_from_a_channel_subset_of_the_teacher(store, tmp_path):
    import vlaflow.train.objectives.distill as D
    from vlaflow.errors import ConfigError
    from vlaflow.policies.checkpoint import load_checkpoint
    from vlaflow.policies.registry import build_policy

    teacher = load_checkpoint(_teacher(store, tmp_path, "flow"))
    stats = {
        k: {s: np.asarray(v) for s, v in st.items()}
        for k, st in teacher.normalizer.to_dict()["stats"].items()
    }
    tsd = teacher.state_dict()

    same = build_policy(D.student_config(teacher, "t", "euler", 4, (16, 32)), stats)
    same.load_state_dict(D.narrowed_unet_state(tsd, same.state_dict(), 4), strict=False)
    x, cond = torch.randn(3, 8, 2), torch.randn(3, 2, teacher.cond_dim)
    torch.testing.assert_close(same.predict(x, 0.5, cond), teacher.predict(x, 0.5, cond))

    small = build_policy(D.student_config(teacher, "t", "euler", 4, (8, 16)), stats)
    cut = D.narrowed_unet_state(tsd, small.state_dict(), 4)
    assert {k for k in small.state_dict() if k.startswith("head.")} == set(cut)
    from vlaflow.policies.nets.unet1d import group_channel_subset

    keep16, keep32 = group_channel_subset(16, 8, 4), group_channel_subset(32, 16, 4)
    assert keep16 == [0, 1, 4, 5, 8, 9, 12, 13]
    k = "head.down.0.1.blocks.0.block.0.weight"  # conv 16 -> 16 channels at level 0
    torch.testing.assert_close(cut[k], tsd[k][keep16][:, keep16])
    k = "head.down.1.0.cond_encoder.1.weight"  # FiLM (scale ; bias) for 32 channels
    torch.testing.assert_close(cut[k], tsd[k][keep32 + [32 + i for i in keep32]])
    k = "head.up.0.0.blocks.0.block.0.weight"  # conv over cat(h 32, skip 32) -> 16
    torch.testing.assert_close(cut[k], tsd[k][keep16][:, keep32 + [32 + i for i in keep32]])
    assert D.narrowable(teacher.config.net, small.config.net)
    assert not D.narrowable(small.config.net, teacher.config.net)  # wider than the teacher

    kw = dict(teacher=str(tmp_path / "teacher_flow"), data=str(store), minutes=0, steps=1, progress=False)
    kw |= dict(batch_size=16, pool=64, refresh=16)
    assert (
        D.distill(out=str(tmp_path / "c"), student_dims=(8, 16), **kw)["student_init"] == "teacher channels"
    )
    assert (
        D.distill(out=str(tmp_path / "r"), student_dims=(8, 16), student_init="scratch", **kw)["student_init"]
        == "scratch"
    )
    with pytest.raises(ConfigError, match="student-init teacher"):
        D.distill(out=str(tmp_path / "m"), student_net="mlp:16x1", student_init="teacher", **kw)


def test_a_dsrl_steered_teacher_is_distilled_from_its_actors_noise(store, tmp_path):
    """A DSRL run's checkpoint (family "steered") distills: the teacher's chunks are its base's chain from
    the noise actor's w (the steered policy's own output, whatever noise the student is handed), and the
    student is a plain one-step checkpoint trained toward them."""
    import vlaflow
    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler
    from vlaflow.policies import load_checkpoint
    from vlaflow.policies.steered.actor import NoiseActor
    from vlaflow.policies.steered.model import SteeredPolicy
    from vlaflow.train.objectives.distill import distill, teacher_pairs

    base = load_checkpoint(_teacher(store, tmp_path, "diffusion")).eval()
    actor = NoiseActor(base.n_cond_tokens * base.cond_dim, int(np.prod(base.target_shape)), 1.5, width=32)
    torch.nn.init.normal_(actor.body[-1].weight, std=0.5)  # a fresh actor says w = 0: move it away
    torch.nn.init.normal_(actor.body[-1].bias, std=0.5)
    ckpt = save_checkpoint(tmp_path / "steered", SteeredPolicy.wrap(base, actor, width=32))
    steered = load_checkpoint(ckpt).eval()

    ws = WindowSampler(EpisodeStore.open(store), list(OBS), 2, 8)
    idx = np.arange(6)
    a = teacher_pairs(steered.base, ws, idx, "ddim", 4, torch.Generator().manual_seed(1), steered.steer)
    b = teacher_pairs(steered.base, ws, idx, "ddim", 4, torch.Generator().manual_seed(2), steered.steer)
    plain = teacher_pairs(steered.base, ws, idx, "ddim", 4, torch.Generator().manual_seed(1))
    assert not torch.allclose(a[1], b[1])  # the student's input noise is a fresh draw ...
    torch.testing.assert_close(a[4], b[4])  # ... the target is not: the steered chunk of the window
    with torch.no_grad():
        own = steered.generate(a[0]).actions
    torch.testing.assert_close(steered.base.unnormalize_target(a[4]), own, atol=1e-4, rtol=1e-4)
    assert (a[4] - plain[4]).abs().mean() > 0.05  # not the base's chunk from the same Gaussian noise

    kw = dict(
        teacher=str(ckpt), data=str(store), minutes=0, batch_size=32, pool=256, refresh=32, progress=False
    )
    before = distill(out=str(tmp_path / "s0"), steps=1, **kw)
    after = distill(out=str(tmp_path / "s1"), steps=80, lr=1e-3, **kw)
    assert before["teacher_steered"] and after["teacher_steered"]
    assert after["val_mean_abs_err_normalized"] < 0.5 * before["val_mean_abs_err_normalized"], (before, after)
    rt = vlaflow.load_policy(tmp_path / "s1")
    assert rt.policy.config.family == "consistency" and rt.policy.config.teacher_family == "diffusion"
