"""Arm tasks (pybullet pick_place, robosuite lift/can) and their scripted experts.

robosuite env creation costs ~10 s on 2 cores, so each robosuite env is built once per module.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.sim.collect import rollout_expert
from vlaflow.sim.experts import PickPlaceMachine, PickScript, make_expert
from vlaflow.sim.tasks import TASKS, make_env

pytest.importorskip("pybullet")


# ----------------------------------------------------------------------------------------------- pick_place
@pytest.fixture(scope="module")
def pp_env():
    env = make_env("pick_place")
    yield env
    env.close()


def test_pick_place_registered_and_spec(pp_env):
    assert TASKS["pick_place"].endswith(":make_pick_place")
    spec = pp_env.task_spec
    assert spec.name == "pick_place" and spec.fps == 10.0 and spec.action_dim == 4
    assert spec.obs_shapes == {"obs.state": (21,)}
    assert len(spec.extra["state_names"]) == 21
    assert "tray" in spec.instruction
    obs, info = pp_env.reset(seed=0)
    assert (
        set(obs) == {"obs.state"} and obs["obs.state"].dtype == np.float32 and obs["obs.state"].shape == (21,)
    )
    assert info["success"] is False
    assert pp_env.observation_space.contains(obs)


def test_pick_place_seeded_reset_is_deterministic(pp_env):
    def run(seed):
        obs, _ = pp_env.reset(seed=seed)
        traj = [obs["obs.state"]]
        for a in ([1, 0, -1, -1], [0, 1, 0, 1], [-1, -1, 1, -1]):
            traj.append(pp_env.step(np.array(a, np.float32))[0]["obs.state"])
        return np.stack(traj)

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a[0, 11:] - c[0, 11:]).max() > 1e-3  # another seed moves the cube / tray


def test_pick_place_action_moves_end_effector_and_is_clipped(pp_env):
    obs, _ = pp_env.reset(seed=1)
    ee0 = obs["obs.state"][:3].copy()
    obs = pp_env.step(np.array([5.0, 0, 0, -1], np.float32))[0]  # clipped to 1 -> at most max_delta
    dx = obs["obs.state"][0] - ee0[0]
    assert 0.01 < dx <= pp_env.cfg.max_delta + 0.005
    with pytest.raises(ValueError, match="4 values"):
        pp_env.step(np.zeros(3))


def test_pick_place_expert_succeeds(pp_env):
    expert = make_expert("pick_place", pp_env)
    lengths = []
    for seed in range(3):
        ro = rollout_expert(pp_env, expert, seed, pp_env.task_spec.max_steps)
        assert ro.success, f"seed {seed}: expert failed"
        lengths.append(ro.length)
        assert ro.data["action"].shape == (ro.length, 4)
        assert np.abs(ro.data["action"]).max() <= 1.0
    assert 20 < np.mean(lengths) < 100


def test_pick_place_success_requires_release(pp_env):
    """Holding the cube over the tray is not success; it becomes success only after opening."""
    expert = make_expert("pick_place", pp_env)
    pp_env.reset(seed=4)
    expert.reset()
    saw_lower = False
    for _ in range(100):
        a = expert.act()
        _, _, term, _, info = pp_env.step(a)
        if expert.machine.phase.name == "LOWER":
            saw_lower = True
            assert not info["success"], "success while the gripper still holds the cube"
        if term:
            break
    assert saw_lower and info["success"]


def test_pick_place_image_mode():
    env = make_env("pick_place", obs_mode="image", render_size=64, video_size=96)
    try:
        obs, _ = env.reset(seed=0)
        assert set(obs) == {"obs.state", "obs.image.front"}
        im = obs["obs.image.front"]
        assert im.shape == (64, 64, 3) and im.dtype == np.uint8 and im.std() > 5
        assert obs["obs.state"].shape == (11,)
        assert env.render().shape == (96, 96, 3)
        # the camera sees the arm move
        im2 = env.step(np.array([0, 0, -1, -1], np.float32))[0]["obs.image.front"]
        assert np.abs(im2.astype(int) - im.astype(int)).sum() > 0
    finally:
        env.close()


def test_pick_place_bad_config():
    with pytest.raises(ConfigError, match="max_delta"):
        make_env("pick_place", max_delta=0.5)
    with pytest.raises(ConfigError, match="obs_mode"):
        make_env("pick_place", obs_mode="pixels")


def test_state_machine_restarts_after_a_drop():
    m = PickPlaceMachine(PickScript(0.1, 0.0, 0.3, 0.1, close_steps=1, release_steps=1))
    obj, goal = np.array([0.5, 0.0, 0.02]), np.array([0.5, 0.3, 0.0])
    m.step(np.array([0.5, 0.0, 0.12]), obj, goal)  # approach done -> descend
    m.step(np.array([0.5, 0.0, 0.02]), obj, goal)  # descend done -> grasp
    m.step(np.array([0.5, 0.0, 0.02]), obj, goal)  # grasp done -> lift
    assert m.phase.name == "LIFT"
    err, close = m.step(np.array([0.5, 0.0, 0.2]), obj, goal)  # object left behind on the floor
    assert m.phase.name == "APPROACH" and not close


def test_unknown_expert():
    with pytest.raises(VlaflowError, match="no scripted expert"):
        make_expert("pusht", None)


# ----------------------------------------------------------------------------------------------- robosuite
def _robosuite_ok() -> str | None:
    try:
        import robosuite  # noqa: F401
    except Exception as e:  # robosuite import failures vary (missing mujoco, GL)
        return f"robosuite unavailable: {e}"
    return None


@pytest.fixture(scope="module")
def lift_env():
    reason = _robosuite_ok()
    if reason:
        pytest.skip(reason)
    env = make_env("lift", obs_mode="image", render_size=32, video_size=64)
    yield env
    env.close()


def test_lift_image_obs_and_expert(lift_env):
    spec = lift_env.task_spec
    assert spec.fps == 20.0 and spec.action_dim == 7 and spec.max_steps == 200
    assert spec.obs_shapes["obs.image.agentview"] == (32, 32, 3)
    assert spec.obs_shapes["obs.image.wrist"] == (32, 32, 3)
    state = np.random.get_state()[1].copy()
    obs, _ = lift_env.reset(seed=3)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # global RNG left as it was
    assert obs["obs.state"].shape == (9,)
    for cam in ("agentview", "wrist"):
        im = obs[f"obs.image.{cam}"]
        assert im.dtype == np.uint8 and im.shape == (32, 32, 3) and im.std() > 5
    assert lift_env.render().shape == (64, 64, 3)
    ro = rollout_expert(lift_env, make_expert("lift", lift_env), 3, spec.max_steps)
    assert ro.success and ro.length < 100
    assert ro.data["obs.image.agentview"].shape == (ro.length, 32, 32, 3)


def test_lift_seeded_reset_is_deterministic(lift_env):
    def cube(seed):
        lift_env.reset(seed=seed)
        return lift_env.privileged_state()["object_pos"]

    p = [cube(s) for s in (5, 5, 6)]
    np.testing.assert_allclose(p[0], p[1])
    assert np.abs(p[0] - p[2]).max() > 1e-4


@pytest.fixture(scope="module")
def can_env():
    reason = _robosuite_ok()
    if reason:
        pytest.skip(reason)
    env = make_env("can")
    yield env
    env.close()


def test_can_lowdim_expert(can_env):
    spec = can_env.task_spec
    assert spec.obs_shapes == {"obs.state": (23,)} and "bin" in spec.instruction
    obs, info = can_env.reset(seed=0)
    assert obs["obs.state"].dtype == np.float32 and not info["success"]
    ro = rollout_expert(can_env, make_expert("can", can_env), 0, spec.max_steps)
    assert ro.success and 50 < ro.length < spec.max_steps


@pytest.mark.filterwarnings("ignore:.*Box observation space:UserWarning")  # unbounded state is intended
def test_pick_place_passes_gymnasium_env_checker(pp_env):
    from gymnasium.utils.env_checker import check_env

    check_env(pp_env, skip_render_check=True)  # spaces, seeding determinism, step/reset API


def test_pick_place_reset_to_recorded_state_replays(pp_env):
    """Replays (vlaflow eval --policy replay:STORE) restore the recorded state whatever the seed."""
    expert = make_expert("pick_place", pp_env)
    ro = rollout_expert(pp_env, expert, 11, pp_env.task_spec.max_steps)
    assert ro.success
    obs, _ = pp_env.reset(seed=999, options={"reset_to_state": ro.data["obs.state"][0]})
    np.testing.assert_allclose(obs["obs.state"], ro.data["obs.state"][0], atol=1e-4)
    for a in ro.data["action"]:
        obs, _, term, _, info = pp_env.step(a)
    assert info["success"]
    with pytest.raises(ValueError, match="21-dim"):
        pp_env.reset(seed=0, options={"reset_to_state": np.zeros(11)})


def test_robosuite_camera_subset():
    if _robosuite_ok():
        pytest.skip(_robosuite_ok())
    from vlaflow.sim.robosuite_tasks import ROBOSUITE_TASKS, robosuite_spec

    spec = robosuite_spec(ROBOSUITE_TASKS["lift"], "image", 64, 20.0, ("wrist",))
    assert spec.obs_shapes == {"obs.state": (9,), "obs.image.wrist": (64, 64, 3)}
    assert spec.extra["cameras"] == ["wrist"]
    with pytest.raises(ConfigError, match="cameras must be"):
        make_env("lift", obs_mode="image", cameras=["top"])
    with pytest.raises(ConfigError, match="disagree"):
        make_env("lift", obs_mode="image", render_size=64, image_size=32)
