"""Imagination through the normal harness: ``vlaflow eval --task wm:WM_CKPT``, bad requests named, flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rl_fixtures import tiny_pusht_policy

from vlaflow.errors import VlaflowError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


def human_episodes(n: int):
    """The first ``n`` PushT human demos as (states, actions) from the shared zarr."""
    import zarr
    from conftest import shared

    g = zarr.open_group(str(shared("pusht_cchi_v7", "pusht_cchi_v7_replay.zarr")), mode="r")
    ends = np.asarray(g["meta/episode_ends"][:n])
    state = np.asarray(g["data/state"][: ends[-1]], np.float32)
    action = np.asarray(g["data/action"][: ends[-1]], np.float32)
    starts = np.concatenate([[0], ends[:-1]])
    return [(state[a:b], action[a:b]) for a, b in zip(starts, ends, strict=True)]


def tiny_pusht_wm(tmp_path: Path, n_eps: int = 60, steps: int = 300) -> Path:
    from vlaflow.policies.base_config import MLPConfig, NetConfig
    from vlaflow.world_models.checkpoint import save_world_model
    from vlaflow.world_models.config import PRESETS
    from vlaflow.world_models.data import train_world_model, transition_windows

    net = NetConfig(kind="mlp", mlp=MLPConfig(width=64, n_blocks=1, step_embed_dim=16))
    cfg = PRESETS["pusht_lowdim"].replace(net=net, n_bins=21)
    win = transition_windows(human_episodes(n_eps), cfg.n_obs_steps, 1)
    wm, _ = train_world_model(cfg, win, steps=steps, batch_size=128, max_seconds=15)
    return save_world_model(tmp_path / "wm", wm)


def tiny_policy(
    tmp_path: Path, name: str, obs_key: str = "obs.state", shape=(5,), action_dim: int = 2
) -> Path:
    from vlaflow.policies import save_checkpoint

    pol = tiny_pusht_policy("diffusion", obs_key, tuple(shape), action_dim, num_inference_steps=4)
    return save_checkpoint(tmp_path / name, pol)


@pytest.fixture(scope="module")
def wm_dir(tmp_path_factory):
    pytest.importorskip("gym_pusht")
    return tiny_pusht_wm(tmp_path_factory.mktemp("wm"))


def _eval(args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "vlaflow.cli", "eval", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def test_eval_task_wm_runs_a_policy_in_imagination_through_the_cli_and_says_so(wm_dir, tmp_path):
    pol = tiny_policy(tmp_path, "pol")
    out = tmp_path / "ev"
    args = ["--task", f"wm:{wm_dir}", "--policy", pol, "--episodes", 3, "--seed", 100000, "--workers", 0]
    res = _eval([*args, "--max-steps", 24, "--videos", 1, "--quiet", "--out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMAGINED by world model" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    im = rep["imagined"]
    assert im["world_model"] == str(wm_dir) and im["task"] == "pusht" and im["reward"] == "coverage"
    assert im["real_env_steps"] == 0
    assert [e["seed"] for e in rep["episodes"]] == [100000, 100001, 100002]
    assert all(1 <= e["length"] <= 24 and 0 <= e["max_reward"] <= 1 for e in rep["episodes"])
    flags = [e["metrics"]["imagined_invalid"] for e in rep["episodes"]]
    assert im["n_invalid_episodes"] == sum(f > 0 for f in flags)
    assert rep["aggregate"]["n_episodes"] == 3 and not rep["errors"]
    # an imagined episode is a function of its seed: the same in a spawned worker as in this process
    res = _eval(
        [*args[:-2], "--workers", 1, "--max-steps", 24, "--videos", 0, "--quiet", "--out", tmp_path / "w1"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((tmp_path / "w1" / "report.json").read_text())["episodes"]
    assert again == [{k: v for k, v in e.items() if k != "video"} for e in rep["episodes"]]
    # the video is the scene drawn from the predicted states with PushT's own renderer
    import av

    (video,) = rep["videos"]
    with av.open(str(out / video)) as c:
        n_frames = sum(1 for _ in c.decode(video=0))
    assert n_frames == rep["episodes"][0]["length"] + 1


def test_imagined_episodes_start_from_the_real_resets_and_are_reproducible(wm_dir):
    from vlaflow.sim.tasks import make_env

    env, real = make_env(f"wm:{wm_dir}"), make_env("pusht")
    try:
        obs, info = env.reset(seed=100007)
        robs, _ = real.reset(seed=100007)
        assert info["imagined"] and np.array_equal(obs["obs.state"], robs["obs.state"])
        assert set(obs) == {"obs.state", "obs.keypoint", "obs.agent_pos"}
        assert np.allclose(obs["obs.keypoint"], robs["obs.keypoint"], atol=1e-3)  # as the sim computes them
        assert np.array_equal(obs["obs.agent_pos"], robs["obs.agent_pos"])
        assert env.task_spec.extra["imagined"]["task"] == "pusht"
        acts = np.tile(robs["obs.state"][:2] + 20, (6, 1))
        first = [env.step(a)[0]["obs.state"] for a in acts]
        env.reset(seed=100007)
        again = [env.step(a)[0]["obs.state"] for a in acts]
        assert np.array_equal(np.stack(first), np.stack(again))  # the episode seed fixes the sampler noise
        assert not np.array_equal(first[-1], robs["obs.state"])  # it moved in imagination
        assert env.real_resets == 2
    finally:
        env.close()
        real.close()


def test_a_world_model_asked_for_what_it_was_not_trained_on_says_what_it_has(wm_dir, tmp_path):
    from vlaflow.sim.imagined import ImaginedTaskEnv

    with pytest.raises(VlaflowError, match="trained on task 'pusht', not 'lift'"):
        ImaginedTaskEnv(str(wm_dir), task="lift")
    with pytest.raises(VlaflowError, match=r"predicts 'obs.state' \(5,\) only .*'image'"):
        ImaginedTaskEnv(str(wm_dir), obs_mode="image")
    with pytest.raises(VlaflowError, match="no success classifier"):
        ImaginedTaskEnv(str(wm_dir), reward="classifier")
    kp = tiny_policy(tmp_path, "kp", "obs.keypoint", (9, 2))  # keypoints: computed from the predicted state
    res = _eval(["--task", f"wm:{wm_dir}", "--policy", kp, "--episodes", 1, "--workers", 0, "--max-steps", 8,
                 "--videos", 0, "--out", tmp_path / "e0"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "e0" / "report.json").read_text())["episodes"][0]["length"] >= 1
    nc = tiny_policy(tmp_path, "nc", "obs.n_contacts", (1,))  # the contact count is no function of the state
    res = _eval(
        ["--task", f"wm:{wm_dir}", "--policy", nc, "--episodes", 1, "--workers", 0, "--out", tmp_path / "e1"]
    )
    assert res.returncode != 0 and "obs.n_contacts is not provided" in res.stderr
    assert "task provides: obs.state (5,), obs.keypoint (9, 2), obs.agent_pos (2,)" in res.stderr
    a3 = tiny_policy(tmp_path, "a3", action_dim=3)
    res = _eval(
        ["--task", f"wm:{wm_dir}", "--policy", a3, "--episodes", 1, "--workers", 0, "--out", tmp_path / "e2"]
    )
    assert res.returncode != 0 and "action dim: policy gives 3, task expects 2" in res.stderr
    res = _eval(["--task", f"wm:{tmp_path}", "--policy", "random", "--episodes", 1, "--out", tmp_path / "e3"])
    assert res.returncode != 0 and "not a world-model checkpoint" in res.stderr


def test_imagined_episodes_leaving_the_data_range_end_flagged_and_the_report_counts_them(wm_dir, tmp_path):
    """A margin of -0.45 keeps the middle tenth of the data range: every first imagined step leaves it."""
    out = tmp_path / "ev"
    args = ["--task", f"wm:{wm_dir}", "--policy", "random", "--episodes", 3, "--workers", 0, "--quiet"]
    res = _eval([*args, "--max-steps", 30, "--videos", 0, "--wm-range-margin", -0.45, "--out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["imagined"]["n_invalid_episodes"] == 3 and rep["imagined"]["range_margin"] == -0.45
    assert all(e["length"] == 1 and e["metrics"]["imagined_invalid"] == 1.0 for e in rep["episodes"])
    assert all(e["max_reward"] == 0.0 for e in rep["episodes"])  # the bad step earned nothing
    assert "(3 invalid episode(s))" in res.stdout
    # the default margin on the same seeds: the episodes run on (the flag is not always set)
    res = _eval([*args, "--max-steps", 30, "--videos", 0, "--out", tmp_path / "ev2"])
    rep = json.loads((tmp_path / "ev2" / "report.json").read_text())
    assert res.returncode == 0 and rep["imagined"]["n_invalid_episodes"] < 3
    res = _eval(["--task", "pusht", "--policy", "random", "--episodes", 1, "--wm-range-margin", 0.2,
                 "--out", tmp_path / "ev3"])  # fmt: skip
    assert res.returncode != 0 and "are for --task wm:WM_CKPT" in res.stderr


# -- the success classifier head --------------------------------------------------------------------------
CENTRE, RADIUS = np.array([256.0, 256.0]), 25.0  # the toy's success region: the block within 25 px of it


def region_store(path, n_eps: int = 60, length: int = 30, seed: int = 0):
    """PushT-shaped 5-d toy episodes: a success drives the block into the region and keeps it there for the
    last 10 steps; a failure keeps it more than 60 px away. Episode success flags as the store records."""
    from vlaflow.data.store import EpisodeStore, KeySpec

    rng = np.random.default_rng(seed)
    states, actions, flags = [], [], []
    for i in range(n_eps):
        ok = i % 2 == 0
        s = np.zeros((length, 5))
        s[:, :2] = rng.uniform(50, 450, (length, 2))
        s[:, 4] = rng.uniform(0, 2 * np.pi, length)
        if ok:
            start = rng.uniform(100, 400, 2)
            end = CENTRE + rng.uniform(-0.6, 0.6, 2) * RADIUS
            w = np.clip(np.arange(length) / (length - 10), 0, 1)[:, None]
            s[:, 2:4] = (1 - w) * start + w * end
        else:
            ang, r = rng.uniform(0, 2 * np.pi, length), rng.uniform(60, 150, length)
            s[:, 2:4] = CENTRE + np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
        states.append(s)
        actions.append(rng.uniform(50, 450, (length, 2)))
        flags.append(ok)
    keys = {"obs.state": KeySpec("float32", (5,)), "action": KeySpec("float32", (2,))}
    with EpisodeStore.create(path, keys, fps=10) as st:
        data = {"obs.state": np.concatenate(states), "action": np.concatenate(actions)}
        st.append_episodes(
            {k: v.astype(np.float32) for k, v in data.items()}, [length] * n_eps, successes=flags
        )
    return path


def test_success_classifier_from_store_flags_separates_the_known_region(tmp_path):
    from vlaflow.world_models.data import success_labels
    from vlaflow.world_models.reward import auroc, train_success_classifier

    store = region_store(tmp_path / "r.zarr")
    x, y = success_labels(store, "obs.state", tail=10)
    assert y.sum() == 30 * 10 and len(y) == 30 * 10 + 30 * 10 + 30 * 30  # tails, early parts, failures
    assert (np.linalg.norm(x[y > 0, 2:4] - CENTRE, axis=1) < RADIUS).all()
    clf = train_success_classifier(x, y, steps=600)
    rng = np.random.default_rng(1)  # fresh states over the whole arena, labelled by the known region
    test = np.concatenate([rng.uniform(50, 450, (4000, 2)), rng.uniform(100, 400, (4000, 2))], 1)
    test = np.concatenate([test, rng.uniform(0, 2 * np.pi, (4000, 1))], 1)
    truth = np.linalg.norm(test[:, 2:4] - CENTRE, axis=1) < RADIUS
    p, _ = clf.reward(test)
    assert truth.sum() > 20 and auroc(p, truth) > 0.9, auroc(p, truth)
    assert auroc(-p, truth) < 0.1 and auroc(np.zeros(10), np.arange(10) < 5) == 0.5  # the metric itself
    with pytest.raises(VlaflowError, match="no per-step key 'reward'"):
        success_labels(store, "obs.state", key="reward")


def test_train_wm_records_the_classifier_reward_and_imagination_uses_it(tmp_path):
    pytest.importorskip("gym_pusht")
    from vlaflow.sim.imagined import ImaginedTaskEnv
    from vlaflow.world_models.checkpoint import imagined_reward, load_success_classifier

    store = region_store(tmp_path / "r.zarr", n_eps=40)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlaflow.cli", "train-wm", "--data", store, "--out", run, "--steps", 30]
    cmd += [
        "--holdout",
        10,
        "--batch-size",
        64,
        "--no-progress",
        "--success-classifier",
        "--success-steps",
        300,
    ]
    out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((run / "world_model.json").read_text())["imagined_reward"]
    assert rec["reward"] == "classifier" and rec["classifier"]["heldout_auroc"] > 0.9
    ckpt = run / "checkpoints" / "last"
    clf, meta = load_success_classifier(ckpt)
    assert meta["reward"] == "classifier" and meta["n_train_positive"] == 15 * 10
    name, fn = imagined_reward(ckpt, "pusht")
    assert name == "classifier"
    inside, outside = np.array([[100, 100, 256, 256, 1.0]]), np.array([[100, 100, 150, 380, 1.0]])
    assert fn(inside)[0][0] > 0.5 > fn(outside)[0][0]
    assert imagined_reward(ckpt, "pusht", "coverage")[0] == "coverage"  # the task's own is still there
    env = ImaginedTaskEnv(str(ckpt))
    try:
        assert env.task_spec.extra["imagined"]["reward"] == "classifier"
    finally:
        env.close()


# -- vlaflow imagine: the video and the error plot ---------------------------------------------------------
def test_imagine_writes_the_side_by_side_mp4_and_the_error_plot(wm_dir, tmp_path):
    import av

    pol = tiny_policy(tmp_path, "pol")
    out = tmp_path / "im"
    cmd = [sys.executable, "-m", "vlaflow.cli", "imagine", "--world-model", wm_dir, "--policy", pol]
    cmd += ["--task", "pusht", "--seed", 100003, "--max-steps", 20, "--out", out]
    res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=ENV, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "imagine.json").read_text())
    assert s["n_frames"] == max(s["real"]["length"], s["imagined"]["length"]) + 1
    with av.open(str(out / "imagine.mp4")) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        assert stream.codec_context.name == "h264"
    assert len(frames) == s["n_frames"] and frames[0].shape[1] > 1.9 * frames[0].shape[0]  # two scenes
    h = frames[0].shape[0]
    left, right = frames[0][:, :h].astype(float), frames[0][:, -h:].astype(float)
    assert np.abs(left - right).mean() < 3  # the same real start on both sides (up to H.264)
    png = (out / "error_vs_horizon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    ol = s["open_loop_error"]
    assert set(ol) == {"block_px", "angle_rad", "agent_px"} and len(ol["agent_px"]) == s["real"]["length"]
    assert all(np.isfinite(v).all() for v in ol.values())
    # the world model's task only
    cmd[cmd.index("pusht")] = "lift"
    res = subprocess.run(
        list(map(str, cmd[:-1] + [tmp_path / "im2"])), capture_output=True, text=True, env=ENV
    )
    assert res.returncode != 0 and "trained on task 'pusht', not 'lift'" in res.stderr
