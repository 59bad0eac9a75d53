"""Training pipeline: schedules, configs/overrides/presets, the loop end to end, exact resume after SIGKILL,
incompatible resume, missing keys, NaN stop, and a 2-process torchrun (DDP, gloo) run.

All runs use a tiny synthetic store and a tiny U-Net with 1 torch thread, so weights are bit-reproducible.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from vlaflow.errors import ConfigError  # noqa: E402
from vlaflow.train import schedule as S  # noqa: E402
from vlaflow.train.config import RunConfig, apply_overrides, config_diff, parse_value  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A tiny run: 2 U-Net levels of 16/32 channels, H=8, batch 8, checkpoints every 5 steps, no rollouts.
TINY = [
    "policy.net.unet.down_dims=[16,32]",
    "policy.net.unet.step_embed_dim=16",
    "data.obs_keys=[obs.state]",
    "data.horizon=8",
    "data.n_action_steps=4",
    "train.batch_size=8",
    "train.warmup_steps=3",
    "train.ckpt_every=5",
    "train.log_every=5",
    "train.num_threads=1",
    "train.num_workers=1",
    "train.progress=false",
    "eval.task=",
]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    from vlaflow.data.store import EpisodeStore, KeySpec

    path = tmp_path_factory.mktemp("data") / "tiny.zarr"
    st = EpisodeStore.create(
        path,
        keys={"action": KeySpec("float32", (3,)), "obs.state": KeySpec("float32", (5,))},
        fps=10,
    )
    rng = np.random.default_rng(0)
    for i in range(6):
        n = 20 + 3 * i
        s = np.cumsum(rng.normal(size=(n, 5)), 0).astype(np.float32)
        st.append_episode(
            {"action": (s[:, :3] * 0.5).astype(np.float32), "obs.state": s},
            task="move",
            source="syn",
            success=True,
        )
    return path


def tiny_cfg(*extra: str) -> RunConfig:
    from vlaflow.train.presets import get_preset

    return apply_overrides(get_preset("pick_place_lowdim_diffusion"), [*TINY, *extra])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlaflow.cli", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo")
    return e


def weights(ckpt: Path) -> dict:
    return {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "train_state.safetensors"))}


# ----------------------------------------------------------------------------------------- pure functions
def test_lr_schedule_warmup_then_cosine_to_zero():
    assert S.lr_at(0, 1e-3, 10, 110) == 0.0
    assert S.lr_at(5, 1e-3, 10, 110) == pytest.approx(5e-4)
    assert S.lr_at(10, 1e-3, 10, 110) == pytest.approx(1e-3)
    assert S.lr_at(60, 1e-3, 10, 110) == pytest.approx(5e-4)  # half-way down the cosine
    assert S.lr_at(110, 1e-3, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert S.lr_at(50, 1e-3, 10, 110, "constant") == 1e-3


def test_ema_decay_follows_diffusion_policy_warmup():
    assert S.ema_decay(0) == 0.0 and S.ema_decay(1) == 0.0
    assert S.ema_decay(2) == pytest.approx(1 - 2**-0.75)
    assert S.ema_decay(100) == pytest.approx(1 - 100**-0.75)
    assert S.ema_decay(10**9) == 0.9999  # capped


def test_batches_are_a_function_of_seed_and_step():
    a = [S.batch_indices(3, s, 50, 8) for s in range(12)]
    b = [S.batch_indices(3, s, 50, 8) for s in range(12)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    epoch = np.concatenate(a[:6])  # 50 // 8 = 6 batches per epoch: no window twice
    assert len(np.unique(epoch)) == 48
    assert not np.array_equal(a[0], S.batch_indices(4, 0, 50, 8))
    g = S.batch_indices(0, 5, 100, 9)
    parts = [S.shard(g, r, 2) for r in range(2)]
    assert (
        sorted(np.concatenate(parts).tolist()) == sorted(g.tolist())
        and abs(len(parts[0]) - len(parts[1])) <= 1
    )


# ----------------------------------------------------------------------------------------- configs
def test_override_parsing_checks_types_and_names_field():
    from vlaflow.train.presets import get_preset

    cfg = get_preset("pusht_lowdim_diffusion")
    c = apply_overrides(
        cfg, ["train.steps=1e3", "train.lr=3e-4", "train.ema=false", "policy.net.unet.down_dims=[32,64,128]"]
    )
    assert c.train.steps == 1000 and c.train.lr == 3e-4 and c.train.ema is False
    assert c.policy.net.unet.down_dims == (32, 64, 128)
    assert c.data.obs_keys == ("obs.keypoint", "obs.agent_pos")
    with pytest.raises(ConfigError, match=r"train\.steps.*'ten'"):
        apply_overrides(cfg, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"train\.batch_size must be >= 1, got 0"):
        apply_overrides(cfg, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"Did you mean 'train\.steps'"):
        apply_overrides(cfg, ["train.stpes=5"])
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        apply_overrides(cfg, ["train.steps"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(cfg, ["train=3"])
    with pytest.raises(ConfigError, match="n_action_steps"):
        apply_overrides(cfg, ["data.n_action_steps=17"])
    with pytest.raises(ConfigError, match="cosine"):
        apply_overrides(cfg, ["train.schedule=linear"])
    assert parse_value("none", int | None) is None
    assert parse_value("(1, 2)", tuple[int, int]) == (1, 2)


def test_presets_round_trip_and_unknown_name_suggests():
    from vlaflow.train.presets import PRESETS, get_preset

    for name in ("pusht_lowdim_diffusion", "pusht_lowdim_flow", "pusht_image_diffusion"):
        assert name in PRESETS
    assert any(
        p.policy.encoder.language.enabled and any(k.startswith("obs.image.") for k in p.data.obs_keys)
        for p in PRESETS.values()
    ), "an arm preset with camera + language is required"
    for name, cfg in PRESETS.items():
        again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg, name
    assert get_preset("pusht_lowdim_flow").policy.sampler == "euler"
    d = get_preset("pusht_lowdim_diffusion")
    assert (d.policy.sampler, d.policy.num_inference_steps, d.data.horizon, d.data.n_action_steps) == (
        "ddim",
        10,
        16,
        8,
    )
    assert (d.eval.task, d.eval.seed_start, d.eval.max_steps) == ("pusht", 100000, 300)
    with pytest.raises(ConfigError, match="Did you mean 'pusht_lowdim_flow'"):
        get_preset("pusht_lowdim_flw")


def test_config_diff_names_fields():
    a = tiny_cfg().to_dict()
    b = tiny_cfg("train.lr=5e-4", "policy.net.unet.kernel_size=3").to_dict()
    diff = config_diff(a, b)
    assert any(d.startswith("train.lr:") for d in diff)
    assert any(d.startswith("policy.net.unet.kernel_size: 5 -> 3") for d in diff)


# ----------------------------------------------------------------------------------------- the loop
def test_train_cli_end_to_end(store_path, tmp_path, capsys):
    import vlaflow
    from vlaflow.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--preset",
            "pick_place_lowdim_diffusion",
            "--data",
            str(store_path),
            "--out",
            str(out),
            *TINY,
            "train.steps=12",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "trained 12 steps" in printed
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,kind,loss,lr") and len(rows) == 1 + 3  # steps 5, 10, 12
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("last", "step_0000005", "step_0000010", "step_0000012"):
        assert (out / "checkpoints" / name / "train_state.json").exists(), name
    files = {p.name for p in (out / "checkpoints" / "last").iterdir()}
    assert files == {
        "config.json",
        "model.safetensors",
        "normalizer.json",
        "train_state.json",
        "train_state.safetensors",
    }  # no pickles
    state = json.loads((out / "checkpoints" / "last" / "train_state.json").read_text())
    assert state["step"] == 12 and state["run_config"]["train"]["steps"] == 12
    policy = vlaflow.load_policy(out / "checkpoints" / "last")
    chunk = policy.infer({"obs.state": np.zeros((2, 5), np.float32)}).actions
    assert chunk.shape == (8, 3) and np.isfinite(chunk).all()
    # an existing run is not overwritten silently
    assert (
        main(
            [
                "train",
                "--preset",
                "pick_place_lowdim_diffusion",
                "--data",
                str(store_path),
                "--out",
                str(out),
                *TINY,
                "train.steps=12",
            ]
        )
        == 1
    )
    assert "--resume" in capsys.readouterr().err


def test_training_lowers_the_loss_and_checkpoints_hold_the_ema(store_path, tmp_path):
    from vlaflow.policies import load_checkpoint
    from vlaflow.train.objectives.bc import make_batch
    from vlaflow.train.trainer import build_run_policy, open_training_data, train

    cfg = tiny_cfg("train.steps=40", "train.lr=3e-3", "train.ckpt_every=0")
    res = train(cfg, store_path, tmp_path / "r")
    store, ws, stats = open_training_data(cfg, store_path)
    torch.manual_seed(cfg.train.seed)
    init = build_run_policy(cfg, stats, store)  # the same initial weights the run started from
    trained = load_checkpoint(res.last_ckpt)
    batch = make_batch(ws, np.arange(len(ws)))

    def loss(p):  # every window, fixed noise and diffusion times
        torch.manual_seed(123)
        with torch.no_grad():
            return float(p.eval().compute_loss(batch)[0])

    assert loss(trained) < 0.95 * loss(init)
    w = weights(res.last_ckpt)
    raw = {k[len("model/") :]: v for k, v in w.items() if k.startswith("model/")}
    ema = {k: v for k, v in w.items() if not k.startswith(("model/", "optim/"))}
    assert set(raw) == set(ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the deployable weights are the EMA's
    assert any(k.endswith("/exp_avg_sq") for k in w)  # AdamW moments saved for resume
    assert res.samples_per_s > 0


def test_data_episodes_range_trains_on_exactly_those_episodes(store_path):
    """data.episodes=START:STOP selects store episodes START..STOP-1 (two parents on disjoint halves), the
    held-out split stays inside the range, the range goes into the run config, and bad ranges are refused."""
    from vlaflow.data.store import EpisodeStore
    from vlaflow.train.trainer import open_training_data, split_episodes_of

    store = EpisodeStore.open(store_path)
    ends = store.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    cfg = tiny_cfg("data.episodes=2:5")
    assert cfg.to_dict()["data"]["episodes"] == "2:5"
    _, ws, _ = open_training_data(cfg, store_path)
    assert ws.rows == [(int(starts[i]), int(ends[i])) for i in (2, 3, 4)]
    want = np.concatenate(
        [store.get_episode(i, ["action"])["action"] for i in (2, 3, 4)]
    )  # the rows themselves
    np.testing.assert_array_equal(ws.data["action"], want)
    train_eps, val_eps = split_episodes_of(tiny_cfg("data.episodes=1:6", "data.val_ratio=0.2"), store)
    assert sorted([*train_eps, *val_eps]) == [1, 2, 3, 4, 5] and len(val_eps) == 1
    assert list(split_episodes_of(tiny_cfg(), store)[0]) == list(range(6))  # "" = all
    for bad in ("5:3", "3:3", "-1:2", "2", "a:b", "1:2:3"):
        with pytest.raises(ConfigError, match="data.episodes must be a half-open range START:STOP"):
            tiny_cfg(f"data.episodes={bad}")
    with pytest.raises(ConfigError, match="both select episodes"):
        tiny_cfg("data.episodes=0:3", "data.max_episodes=3")
    with pytest.raises(ConfigError, match="reaches past the store's 6 episodes"):
        open_training_data(tiny_cfg("data.episodes=4:7"), store_path)


def test_action_scale_dims_shrink_the_gripper_in_the_checkpoints_normalizer(store_path, tmp_path):
    """data.action_scale_dims (RTI-DP's gripper "scale" remedy) trains with those action dims normalized to a
    tenth of their range; the checkpoint's normalizer carries it, so its actions un-normalize unchanged;
    a dim the store's actions do not have is refused before any training step."""
    from vlaflow.data.store import EpisodeStore
    from vlaflow.policies import load_checkpoint
    from vlaflow.train.trainer import train

    res = train(tiny_cfg("train.steps=5", "data.action_scale_dims=2"), store_path, tmp_path / "r")
    policy = load_checkpoint(res.last_ckpt)
    a = np.asarray(EpisodeStore.open(store_path).read("action"), np.float32)
    n = policy.normalizer.normalize("action", a)
    assert n[:, :2].min() == pytest.approx(-1, abs=1e-4) and n[:, :2].max() == pytest.approx(1, abs=1e-4)
    assert n[:, 2].min() == pytest.approx(-0.1, abs=1e-4) and n[:, 2].max() == pytest.approx(0.1, abs=1e-4)
    np.testing.assert_allclose(policy.normalizer.unnormalize("action", n), a, rtol=1e-4, atol=1e-3)
    with pytest.raises(ConfigError, match=r"action dims \[3\] out of range for action dim 3"):
        train(tiny_cfg("data.action_scale_dims=3"), store_path, tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="data.action_scale_factor must be > 0"):
        tiny_cfg("data.action_scale_dims=0", "data.action_scale_factor=0")


def test_missing_key_lists_what_the_dataset_has(store_path, tmp_path):
    from vlaflow.train.trainer import train

    with pytest.raises(ConfigError, match=r"obs\.keypoint.*the dataset has \['action', 'obs\.state'\]"):
        train(tiny_cfg("data.obs_keys=[obs.keypoint]"), store_path, tmp_path / "r")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(store_path, tmp_path, monkeypatch):
    from vlaflow.policies import DiffusionPolicy
    from vlaflow.train.trainer import TrainingDiverged, train

    orig = DiffusionPolicy.compute_loss
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss, m = orig(self, batch)
        return (loss * float("nan"), m) if calls["n"] == 8 else (loss, m)

    monkeypatch.setattr(DiffusionPolicy, "compute_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 7.*last good checkpoint.*\(step 5\)"):
        train(tiny_cfg("train.steps=20"), store_path, tmp_path / "r")
    state = json.loads((tmp_path / "r" / "checkpoints" / "last" / "train_state.json").read_text())
    assert state["step"] == 5
    assert all(
        torch.isfinite(v).all()
        for v in weights(tmp_path / "r" / "checkpoints" / "last").values()
        if v.is_floating_point()
    )


def test_resume_after_sigkill_matches_uninterrupted(store_path, tmp_path):
    """A real subprocess killed with SIGKILL mid-run, resumed to the end: bit-identical final weights."""
    from vlaflow.train.trainer import train

    steps = 80
    cfg = tiny_cfg(f"train.steps={steps}")
    ref = train(cfg, store_path, tmp_path / "ref")

    run = tmp_path / "killed"
    args = [
        "train",
        "--preset",
        "pick_place_lowdim_diffusion",
        "--data",
        str(store_path),
        "--out",
        str(run),
        *TINY,
        f"train.steps={steps}",
    ]
    proc = subprocess.Popen(cli(*args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = run / "checkpoints" / "last" / "train_state.json"
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state_file.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 10:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = step
            break
        time.sleep(0.02)
    if killed_at is None:
        proc.kill()
        pytest.fail(
            f"the run ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read()[-2000:]}"
        )
    assert proc.returncode == -signal.SIGKILL
    before = json.loads(state_file.read_text())["step"] if state_file.exists() else None
    assert before is None or before < steps

    res = train(cfg, store_path, run, resume=True)
    assert res.step == steps
    a, b = weights(ref.last_ckpt), weights(res.last_ckpt)
    assert set(a) == set(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"
    # the log continues without duplicated steps
    steps_logged = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps


def test_resume_with_incompatible_config_says_what_differs(store_path, tmp_path):
    from vlaflow.train.trainer import train

    train(tiny_cfg("train.steps=5"), store_path, tmp_path / "r")
    with pytest.raises(
        ConfigError, match=r"(?s)cannot resume.*policy\.net\.unet\.kernel_size: 5 -> 3.*train\.lr"
    ):
        train(
            tiny_cfg("train.steps=10", "policy.net.unet.kernel_size=3", "train.lr=2e-3"),
            store_path,
            tmp_path / "r",
            resume=True,
        )
    res = train(tiny_cfg("train.steps=10"), store_path, tmp_path / "r", resume=True)  # more steps is fine
    assert res.step == 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_ddp(store_path, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found beside {sys.executable}")
    out = tmp_path / "ddp"
    cmd = [
        str(torchrun),
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "vlaflow.cli",
        "train",
        "--preset",
        "pick_place_lowdim_diffusion",
        "--data",
        str(store_path),
        "--out",
        str(out),
        *TINY,
        "train.steps=10",
    ]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("trained 10 steps") == 1  # only rank 0 reports
    state = json.loads((out / "checkpoints" / "last" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 10
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # one writer: steps 5 and 10 once each
    w = weights(out / "checkpoints" / "last")
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    assert not math.isnan(float(rows[-1].split(",")[2]))


def test_pusht_benchmark_runner_appends_rows(tmp_path):
    """benchmarks/pusht_train.py end to end at toy size on a PushT-shaped synthetic store."""
    pytest.importorskip("gym_pusht")
    from vlaflow.data.store import EpisodeStore, KeySpec

    data = tmp_path / "pusht_like.zarr"
    st = EpisodeStore.create(
        data,
        keys={
            "action": KeySpec("float32", (2,)),
            "obs.keypoint": KeySpec("float32", (9, 2)),
            "obs.agent_pos": KeySpec("float32", (2,)),
        },
        fps=10,
    )
    rng = np.random.default_rng(1)
    for _ in range(3):
        n = 24
        st.append_episode(
            {
                "action": rng.uniform(50, 450, (n, 2)).astype(np.float32),
                "obs.keypoint": rng.uniform(50, 450, (n, 9, 2)).astype(np.float32),
                "obs.agent_pos": rng.uniform(50, 450, (n, 2)).astype(np.float32),
            },
            task="push",
            source="syn",
            success=True,
        )
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import pusht_train
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    results = tmp_path / "pusht.json"
    results.write_text('[{"policy": "earlier row"}]')
    rc = pusht_train.main(
        [
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "3",
            "--episodes",
            "2",
            "--max-steps",
            "8",
            "--samplers",
            "ddim:10,ddpm:100",
            "--results",
            str(results),
            "policy.net.unet.down_dims=[16,32]",
            "policy.net.unet.step_embed_dim=16",
            "train.batch_size=8",
            "train.num_threads=1",
            "train.progress=false",
        ]
    )
    assert rc == 0
    rows = json.loads(results.read_text())
    assert rows[0] == {"policy": "earlier row"} and len(rows) == 3
    for row, sampler in zip(rows[1:], ("ddim-10", "ddpm-100"), strict=True):
        assert row["sampler"] == sampler and row["policy"] == "pusht_lowdim_diffusion"
        assert (
            0.0 <= row["mean_score"] <= 1.0 and row["seeds"] == "100000..100001" and row["train_steps"] == 3
        )
        assert {"success_rate", "train_minutes", "command", "machine", "versions"} <= set(row)


# ----------------------------------------------------------------------------------------- the loop's seams
def test_train_needs_an_evaluator_for_rollouts_and_does_not_import_the_simulators(store_path, tmp_path):
    from vlaflow.train.trainer import train

    with pytest.raises(ConfigError, match="no evaluate callable"):
        train(tiny_cfg("eval.task=pick_place"), store_path, tmp_path / "r")
    code = (
        "import sys, vlaflow.train.trainer, vlaflow.train.loop, vlaflow.train.objectives.distill; "
        "print(sorted(m for m in sys.modules if m.startswith('vlaflow.sim') or m.startswith('vlaflow.cli')))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_periodic_evaluation_through_an_evaluate_callable_selects_best(store_path, tmp_path):
    from vlaflow.train.trainer import train

    calls = []

    def evaluate(policy, *, n_episodes, out_dir, video, ckpt):
        step = json.loads((ckpt / "train_state.json").read_text())["step"]
        calls.append((step, n_episodes, video, out_dir.name, policy.training))
        return {"score": {5: 0.3, 10: 0.8, 15: 0.5}.get(step, 0.6), "success_rate": 0.1}

    cfg = tiny_cfg("train.steps=17", "train.eval_every=5", "train.eval_episodes=3", "eval.final_episodes=7")
    res = train(apply_overrides(cfg, ["eval.task=pick_place"]), store_path, tmp_path / "r", evaluate=evaluate)
    assert calls == [
        (5, 3, False, "step_0000005", False),
        (10, 3, False, "step_0000010", False),
        (15, 3, False, "step_0000015", False),
        (17, 7, True, "step_0000017", False),  # the final evaluation, with video
    ]
    assert res.best_score == 0.8 and res.final_eval["score"] == 0.6
    best = json.loads((res.best_ckpt / "train_state.json").read_text())
    assert best["step"] == 10 and best["best_step"] == 10
    rows = (tmp_path / "r" / "log.csv").read_text().splitlines()
    assert sum(",eval," in r for r in rows) == 4 and rows[0].startswith(
        "step,kind,loss,lr,grad_norm,ema_decay"
    )


def _toy_actor_critic():
    """An RL-shaped objective: a tiny diffusion policy (deployed) + a critic trained beside it at 10x lr,
    a counter as objective state, batches drawn on the loop's thread."""
    from vlaflow.policies import DiffusionConfig, NetConfig, UNetConfig, build_policy
    from vlaflow.train.objective import Objective

    z = {k: np.zeros(d, np.float32) for k, d in (("action", 3), ("obs.state", 5))}
    stats = {k: {"min": v - 3, "max": v + 3, "mean": v, "std": v + 1} for k, v in z.items()}
    net = NetConfig(
        kind="unet", unet=UNetConfig(down_dims=(8, 16), kernel_size=3, n_groups=4, step_embed_dim=8)
    )
    cfg = DiffusionConfig(obs_shapes={"obs.state": (5,)}, action_dim=3, horizon=8, n_action_steps=4, net=net)

    class ActorCritic(Objective):
        prefetch = "none"

        def __init__(self):
            torch.manual_seed(0)
            self.module = torch.nn.ModuleDict(
                {"actor": build_policy(cfg, stats), "critic": torch.nn.Linear(10, 1)}
            )
            self.updates = torch.zeros(())

        def param_groups(self):
            m = self.module
            critic = {"params": list(m["critic"].parameters()), "lr_scale": 10.0}
            return [{"params": list(m["actor"].parameters())}, critic]

        def batch(self, step):
            g = torch.Generator().manual_seed(step)
            return {
                "obs.state": torch.randn(4, 2, 5, generator=g),
                "action": torch.randn(4, 8, 3, generator=g),
            }

        def loss(self, batch):
            bc, _ = self.module["actor"].compute_loss(batch)
            v = self.module["critic"](batch["obs.state"].flatten(1)).squeeze(-1)
            value_loss = ((v - batch["action"].sum((1, 2))) ** 2).mean()
            return bc + value_loss, {"value_loss": float(value_loss.detach())}

        def after_step(self, step):
            self.updates += 1
            return {"updates": float(self.updates)}

        def deploy(self, module):
            return module["actor"]

        def extra_state(self):
            return {"updates": self.updates.clone()}

        def load_extra_state(self, tensors, where):
            self.updates = tensors["updates"].clone()

    return ActorCritic


def test_an_actor_critic_objective_fits_the_loop_and_resumes_exactly(tmp_path):
    """Resumed at step 4 of a constant-lr run (the cut run's schedule is the full run's): bit-identical."""
    import dataclasses

    import vlaflow
    from vlaflow.train.loop import LoopConfig, RunMeta, TrainingLoop

    ActorCritic = _toy_actor_critic()

    def run(out, steps, resume=False):
        lc = LoopConfig(steps=steps, batch_size=4, lr=1e-3, schedule="constant", ema=True, grad_clip=1.0)
        lc = dataclasses.replace(lc, log_every=2, ckpt_every=3, num_threads=1, progress=False, device="cpu")
        loop = TrainingLoop(lc, out, resume=resume)
        obj = ActorCritic()
        meta = RunMeta(config={"steps": steps, "lr": 1e-3}, resumable=frozenset({"steps"}))
        return loop.run(obj, meta=meta), obj

    ref, ref_obj = run(tmp_path / "ref", 8)
    run(tmp_path / "cut", 4)
    res, obj = run(tmp_path / "cut", 8, resume=True)
    assert res.step == 8 and float(obj.updates) == float(ref_obj.updates) == 8
    a, b = weights(ref.last_ckpt), weights(res.last_ckpt)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("ema/critic.") for k in a) and "objective/updates" in a
    assert any(k.startswith("model/critic.") for k in a)
    assert not any(k.startswith("critic") for k in load_file(str(ref.last_ckpt / "model.safetensors")))
    header = (tmp_path / "ref" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"updates", "value_loss", "loss", "grad_norm"} <= set(header)
    rt = vlaflow.load_policy(ref.last_ckpt)  # the deployed part is a plain policy checkpoint
    assert rt.infer({"obs.state": np.zeros((2, 5), np.float32)}).actions.shape == (8, 3)
    with pytest.raises(ConfigError, match=r"(?s)cannot resume.*lr: 0.001 -> 0.002"):
        lc = LoopConfig(steps=9, batch_size=4, lr=1e-3, num_threads=1, progress=False, device="cpu")
        TrainingLoop(lc, tmp_path / "ref", resume=True).run(
            ActorCritic(), meta=RunMeta(config={"steps": 9, "lr": 2e-3}, resumable=frozenset({"steps"}))
        )


def test_critic_group_gets_its_learning_rate_scale(monkeypatch):
    from vlaflow.train.loop import LoopConfig, TrainingLoop

    ActorCritic = _toy_actor_critic()
    seen, groups = [], []

    class Watch(ActorCritic):
        def after_step(self, step):
            seen.append([g["lr"] for g in groups[0]])

    real = torch.optim.AdamW

    def spy(params, **kw):
        opt = real(params, **kw)
        groups.append(opt.param_groups)
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    lc = LoopConfig(steps=3, lr=1e-3, warmup_steps=2, num_threads=1, progress=False, device="cpu")
    TrainingLoop(lc).run(Watch())
    assert (
        seen[0] == [0.0, 0.0] and seen[1] == pytest.approx([5e-4, 5e-3]) and seen[2][1] == pytest.approx(1e-2)
    )


def test_fused_adamw_is_float_rounding_away_from_the_default(store_path, tmp_path):
    from vlaflow.train.trainer import train

    a = train(tiny_cfg("train.steps=10", "train.log_every=1"), store_path, tmp_path / "a")
    b = train(
        tiny_cfg("train.steps=10", "train.log_every=1", "train.fused_adamw=true"), store_path, tmp_path / "b"
    )

    def losses(run):
        return [float(r.split(",")[2]) for r in (run / "log.csv").read_text().splitlines()[1:]]

    np.testing.assert_allclose(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-5)
    wa, wb = weights(a.last_ckpt), weights(b.last_ckpt)
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
