"""RL on the demo task (issue 13's pick_place target): pick_place declares its reward (1 at the success that
ends the episode) and `vlaflow refine --task pick_place --algo dsrl` runs on it end to end.

A real pybullet env in worker processes; a tiny untrained diffusion policy on pick_place's 21-dim state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("pybullet")

from rl_fixtures import tiny_pusht_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _resting_in_tray_state() -> np.ndarray:
    """A real reset state of seed 3, the cube moved to rest upright and released in the tray's middle."""
    from vlaflow.sim.tasks import make_env

    env = make_env("pick_place")
    try:
        obs, _ = env.reset(seed=3)
        s = obs["obs.state"].astype(np.float64)
        s[11:14] = [s[18], s[19], env.unwrapped.tray_floor_z + env.unwrapped.cfg.cube_half]
        s[14:18] = [0.0, 0.0, 0.0, 1.0]
        return s
    finally:
        env.close()


def test_pick_place_pays_one_at_the_success_that_ends_its_episode_and_nothing_before():
    from vlaflow.sim.rollout import REWARD_TASKS, SubprocChunkEnv

    assert "pick_place" in REWARD_TASKS
    still = np.zeros((2, 4, 4))
    still[..., 3] = -1.0  # gripper open, arm holding its pose
    with SubprocChunkEnv("pick_place", 2, ["obs.state"], 2) as venv:
        assert venv.max_steps == 120
        venv.reset([3, 3], states=[_resting_in_tray_state(), None])  # env 1: the cube on the table
        obs, reward, done, success = venv.step(still)
        assert success.tolist() == [True, False] and done.tolist() == [True, False]
        assert reward.tolist() == [1.0, 0.0]  # one success step (it ends the chunk), none on the table
        assert obs["obs.state"].shape == (2, 2, 21)
        assert venv.env_steps == 1 + 4


def test_stored_pick_place_rewards_follow_the_success_flag_and_rl100_copies_them(tmp_path):
    from vlaflow.data.store import EpisodeStore, KeySpec
    from vlaflow.errors import VlaflowError
    from vlaflow.sim.rollout import stored_step_rewards
    from vlaflow.train.rl100 import REWARD_KEY, copy_store

    ep = {"obs.state": np.zeros((5, 21), np.float32), "action": np.zeros((5, 4), np.float32)}
    assert stored_step_rewards("pick_place", ep, True).tolist() == [0, 0, 0, 0, 1]
    assert stored_step_rewards("pick_place", ep, False).tolist() == [0] * 5
    with pytest.raises(VlaflowError, match="success is unknown.*eval --record"):
        stored_step_rewards("pick_place", ep, None)
    # RL-100's copy of a store: each episode's reward from its own flag (a failure pays nothing)
    keys = {"obs.state": KeySpec("float32", (21,)), "action": KeySpec("float32", (4,))}
    src = EpisodeStore.create(tmp_path / "src.zarr", keys=keys, fps=10)
    for n, ok in ((3, True), (4, False), (2, True)):
        src.append_episode({k: np.zeros((n, *s.shape), np.float32) for k, s in keys.items()}, success=ok)
    src.close()
    copy_store(tmp_path / "src.zarr", tmp_path / "copy.zarr", set(keys), lambda e, ok: stored_step_rewards(
        "pick_place", e, ok))  # fmt: skip
    out = EpisodeStore.open(tmp_path / "copy.zarr")
    got = [out.get_episode(i, [REWARD_KEY])[REWARD_KEY].ravel().tolist() for i in range(3)]
    out.close()
    assert got == [[0, 0, 1], [0, 0, 0, 0], [0, 1]]


def test_refine_dsrl_on_pick_place_writes_a_steered_policy_evaluated_on_the_chosen_seeds(tmp_path):
    from vlaflow.policies import load_checkpoint, save_checkpoint

    ckpt = save_checkpoint(tmp_path / "tiny", tiny_pusht_policy(shape=(21,), action_dim=4))
    run = tmp_path / "dsrl"
    args = [
        "refine", "--policy", str(ckpt), "--task", "pick_place", "--algo", "dsrl", "--out", str(run),
        "iterations=2", "dsrl.n_envs=2", "dsrl.n_decisions=3", "dsrl.updates_per_round=2",
        "dsrl.batch_size=4", "dsrl.width=32", "eval_every=0", "eval_episodes=0", "final_episodes=1",
        "env_workers=1", "progress=false", "eval_seed_start=90000",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vlaflow.cli", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "run_config.json").read_text())["refine"]["task"] == "pick_place"
    steered = load_checkpoint(run / "checkpoints" / "last")
    assert steered.config.family == "steered" and steered.base.config.obs_shapes == {"obs.state": (21,)}
    rep = json.loads(next(run.rglob("report.json")).read_text())
    assert rep["task"] == "pick_place" and rep["aggregate"]["n_episodes"] == 1
    assert [e["seed"] for e in rep["episodes"]] == [90000]  # validation seeds, not the held-out 100000..
