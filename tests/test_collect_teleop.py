"""``vlaflow collect`` and ``vlaflow teleop`` on the pybullet pick_place task (fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlaflow.cli import main
from vlaflow.data.store import EpisodeStore
from vlaflow.errors import VlaflowError
from vlaflow.sim.collect import collect
from vlaflow.sim.teleop import ScriptedKeys, arm_action, command_from_keys, teleop

pytest.importorskip("pybullet")


def test_collect_cli_writes_store_that_info_reads(tmp_path, capsys):
    out = tmp_path / "demos"
    rc = main(["collect", "--task", "pick_place", "--episodes", "3", "--out", str(out), "--seed", "10"])
    assert rc == 0
    assert "wrote 3 episodes" in capsys.readouterr().out
    store = EpisodeStore.open(out)
    assert store.n_episodes == 3 and store.fps == 10.0
    assert set(store.keys) == {"obs.state", "action"}
    assert store.keys["obs.state"].shape == (21,) and store.keys["action"].shape == (4,)
    assert store.keys["obs.state"].names[:3] == ["ee_x", "ee_y", "ee_z"]
    for i in range(3):
        meta = store.episode_meta(i)
        assert meta == {
            "task": "pick up the red cube and place it in the tray",
            "source": "sim:pick_place:expert",
            "success": True,
        }
    seeds = store.attrs["collect"]["episode_seeds"]
    assert len(seeds) == 3 and seeds[0] == 10
    assert store.attrs["env"]["task"] == "pick_place"
    # obs[t] -> action[t]: the first stored observation is the reset observation of the first seed
    from vlaflow.sim.tasks import make_env

    env = make_env("pick_place")
    obs0, _ = env.reset(seed=seeds[0])
    env.close()
    np.testing.assert_allclose(store.get_episode(0)["obs.state"][0], obs0["obs.state"], atol=1e-6)
    assert main(["info", str(out)]) == 0
    assert "3 episodes" in capsys.readouterr().out


def test_collect_image_mode(tmp_path):
    out = tmp_path / "img"
    res = collect("pick_place", 1, str(out), obs_mode="image", env_kwargs={"render_size": 32}, progress=False)
    assert res.n_episodes == 1
    store = EpisodeStore.open(out)
    ep = store.get_episode(0)
    assert ep["obs.image.front"].dtype == np.uint8 and ep["obs.image.front"].shape[1:] == (32, 32, 3)
    assert ep["obs.state"].shape[1:] == (11,) and len(ep["action"]) == res.n_steps


def test_collect_gives_up_without_writing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(VlaflowError, match="only 0 of 2 episodes"):
        # 5 steps are too few for the expert: every attempt fails
        collect("pick_place", 2, str(out), max_attempts=3, env_kwargs={"max_steps": 5}, progress=False)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary directory left behind either


def test_collect_bad_input(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["collect", "--task", "pick_plac", "--episodes", "1", "--out", str(out)]) == 1
    assert "Did you mean 'pick_place'" in capsys.readouterr().err
    assert main(["collect", "--task", "pusht", "--episodes", "1", "--out", str(out)]) == 1
    assert "no scripted expert" in capsys.readouterr().err
    out.mkdir()
    assert main(["collect", "--task", "pick_place", "--episodes", "1", "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- teleop
SCRIPT = [
    (0, "return"),  # start recording
    (1, "up"),  # +x
    (2, "up"),
    (3, "r"),  # +z
    (4, "space"),  # close the gripper
    (5, "left"),  # +y, gripper still closed
    (6, "return"),  # stop: save the 6 recorded steps, new scene
    (7, "return"),  # start another recording ...
    (8, "down"),
    (9, "backspace"),  # ... and drop it
    (10, "q"),
]


def test_teleop_scripted_records_one_episode(tmp_path):
    out = tmp_path / "teleop"
    res = teleop("pick_place", str(out), ScriptedKeys(SCRIPT), seed=3, show=False)
    assert (res.saved, res.discarded, res.saved_lengths) == (1, 1, [6])
    store = EpisodeStore.open(out)
    assert store.n_episodes == 1
    assert store.episode_meta(0)["source"] == "sim:pick_place:teleop"
    assert store.attrs["teleop"]["episode_seeds"] == [3]
    ep = store.get_episode(0)
    act = ep["action"]
    np.testing.assert_allclose(act[0], [0, 0, 0, -1])
    np.testing.assert_allclose(act[1], [1, 0, 0, -1])
    np.testing.assert_allclose(act[3], [0, 0, 1, -1])
    np.testing.assert_allclose(act[4], [0, 0, 0, 1])
    np.testing.assert_allclose(act[5], [0, 1, 0, 1])
    s = ep["obs.state"]
    assert s[3, 0] - s[1, 0] > 0.03  # the two +x presses moved the end effector
    assert s[5, 3] < s[4, 3] - 0.01  # fingers closing after the gripper toggle


def test_teleop_cli_script_appends(tmp_path, capsys):
    script = tmp_path / "keys.json"
    script.write_text(json.dumps([[0, "enter"], [1, "f"], [2, "f"], [3, "enter"], [4, "escape"]]))
    out = tmp_path / "t"
    for n in (1, 2):
        assert main(["teleop", "--task", "pick_place", "--out", str(out), "--script", str(script)]) == 0
        assert EpisodeStore.open(out).n_episodes == n
    assert "saved 1 episodes" in capsys.readouterr().out
    store = EpisodeStore.open(out)
    assert store.episode_lengths.tolist() == [3, 3]
    assert store.attrs["teleop"]["episode_seeds"] == [0, 0]  # both sessions started at --seed 0


def test_teleop_bad_input(tmp_path):
    with pytest.raises(VlaflowError, match="unknown key 'jump'"):
        ScriptedKeys([(0, "jump")])
    with pytest.raises(VlaflowError, match="must be \\[step, key\\]"):
        ScriptedKeys([("zero", "up")])
    with pytest.raises(VlaflowError, match="not an arm task"):
        teleop("pusht", str(tmp_path / "p"), ScriptedKeys([]))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(VlaflowError, match="bad.json"):
        ScriptedKeys.from_json(bad)


def test_key_mapping():
    cmd = command_from_keys(["up", "left", "space"])
    np.testing.assert_allclose(cmd.motion, [1, 1, 0])
    assert cmd.events == {"gripper"}
    np.testing.assert_allclose(arm_action(7, cmd.motion, True, 0.5), [0.5, 0.5, 0, 0, 0, 0, 1])


def test_keyboard_source_with_dummy_video_driver(monkeypatch):
    """The pygame keyboard path, windowless: tapped keys become events, frames are shown."""
    pygame = pytest.importorskip("pygame")
    from vlaflow.sim.teleop import KeyboardSource

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    src = KeyboardSource(fps=1000.0, window=64)
    try:
        for key in (pygame.K_SPACE, pygame.K_RETURN):
            pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=key, mod=0, unicode="", scancode=0))
        cmd = src.poll(0)
        assert cmd.events == {"gripper", "start_stop"}
        np.testing.assert_allclose(cmd.motion, 0)
        pygame.event.post(pygame.event.Event(pygame.QUIT))
        assert "quit" in src.poll(1).events
        src.show(np.full((32, 32, 3), 200, np.uint8))
        assert src.screen.get_at((10, 10))[:3] == (200, 200, 200)
    finally:
        src.close()


def test_collect_with_dart_noise(tmp_path):
    clean = collect("pick_place", 1, str(tmp_path / "a"), seed=5, progress=False)
    noisy = collect("pick_place", 1, str(tmp_path / "b"), seed=5, noise=0.3, progress=False)
    a, b = (EpisodeStore.open(r.path) for r in (clean, noisy))
    assert b.attrs["collect"]["noise"] == 0.3 and b.episode_meta(0)["success"]
    sa, sb = a.get_episode(0)["obs.state"], b.get_episode(0)["obs.state"]
    np.testing.assert_allclose(sa[0], sb[0])  # same scene ...
    n = min(len(sa), len(sb))
    assert np.abs(sa[:n, :3] - sb[:n, :3]).max() > 0.005  # ... different (perturbed) path
    # recorded actions are the expert's: saturated motion stays within [-1, 1], gripper exactly +-1
    act = b.get_episode(0)["action"]
    assert np.abs(act).max() <= 1.0 and set(np.unique(act[:, 3])) <= {-1.0, 1.0}
    with pytest.raises(VlaflowError, match="--noise"):
        collect("pick_place", 1, str(tmp_path / "c"), noise=-1.0, progress=False)
