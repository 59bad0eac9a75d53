"""The two-cube instruction-following probe (pick_place_two): same scenes for both instructions, the
instruction per episode in collected stores, experts, probe metrics through the multi-task evaluation."""

from __future__ import annotations

import numpy as np

from vlaflow.data.store import EpisodeStore
from vlaflow.errors import VlaflowError
from vlaflow.sim.collect import collect, rollout_expert
from vlaflow.sim.evaluate import evaluate
from vlaflow.sim.experts import make_expert
from vlaflow.sim.tasks import make_env


def test_two_cube_probe_scenes_instructions_and_experts(tmp_path):
    red, blue = make_env("pick_place_two_red"), make_env("pick_place_two_blue")
    try:
        (o_red, i_red), (o_blue, i_blue) = red.reset(seed=7), blue.reset(seed=7)
        assert np.array_equal(o_red["obs.state"], o_blue["obs.state"]) and o_red["obs.state"].shape == (20,)
        assert i_red["instruction"] == "put the red cube in the tray"
        assert i_blue["instruction"] == "put the blue cube in the tray"
        for env in (red, blue):
            ro = rollout_expert(env, make_expert(env.task_spec.name, env), 7, env.task_spec.max_steps)
            m = env.episode_metrics()
            assert ro.success and m["followed"] == m["target_lifted"] == 1.0
            assert m["wrong_cube_reached"] == m["wrong_cube_lifted"] == 0.0
    finally:
        red.close(), blue.close()
    collect("pick_place_two", 4, str(tmp_path / "s"), progress=False)
    store = EpisodeStore.open(tmp_path / "s")
    assert {store.episode_meta(i)["task"] for i in range(4)} == {
        "put the red cube in the tray",
        "put the blue cube in the tray",
    }
    rep = evaluate("random", task="probe:two_cubes", seeds=[1, 2], max_steps=5, workers=0, progress=False)
    assert set(rep["per_task"]) == {"pick_place_two_red", "pick_place_two_blue"}
    assert "followed" in rep["per_task"]["pick_place_two_red"]["metrics"]
    assert set(rep["aggregate"]["metrics"]) == {
        "followed",
        "target_lifted",
        "wrong_cube_lifted",
        "wrong_cube_reached",
    }


def test_moving_the_other_cube_is_not_following_the_instruction():
    from vlaflow.sim.experts import PickPlaceExpert, to_unit_delta

    class OtherCubeExpert(PickPlaceExpert):
        """The pick-and-place script aimed at the cube the instruction does not name."""

        def act(self, obs=None):
            st = self.env.privileged_state()
            other = self.env._pose(self.env.distractor)[0]
            err, close = self.machine.step(st["ee_pos"], other, st["tray_pos"])
            return np.array([*to_unit_delta(err, self.env.cfg.max_delta), 1.0 if close else -1.0], np.float32)

    env = make_env("pick_place_two_red")
    try:
        ro = rollout_expert(env, OtherCubeExpert(env), 3, env.task_spec.max_steps)
        assert not ro.success and env.unwrapped._in_tray("blue")  # the blue cube is in, yet no success
        assert env.episode_metrics() == {
            "followed": 0.0,
            "wrong_cube_reached": 1.0,
            "target_lifted": 0.0,
            "wrong_cube_lifted": 1.0,
        }
    finally:
        env.close()
    try:
        make_env("pick_place_two", target="green")
    except VlaflowError as e:
        assert "target must be one of" in str(e)
    else:
        raise AssertionError("an unknown target colour was accepted")
