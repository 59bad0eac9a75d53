"""robosuite / robomimic hdf5 ingest: robosuite's own 1.4.1 demo files, a robomimic-style file made here,
bad input, observation regeneration in robosuite 1.5.1, and the CLI."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import shared

from vlaflow.data.ingest import detect_format, robosuite_hdf5
from vlaflow.data.store import EpisodeStore
from vlaflow.errors import IngestError

DEMOS = "robosuite_1.4.1_sample_demos"


@pytest.mark.parametrize(
    "rel, env_name, n_eps, n_steps, da, ds",
    [
        ("lift/demo.hdf5", "Lift", 3, 1384, 7, 32),
        ("handover/panda_panda/demo.hdf5", "TwoArmHandover", 7, 2775, 14, 50),
        ("wipe/panda/demo.hdf5", "Wipe", 1, 174, 6, 15),
    ],
)
def test_robosuite_demo_files_identical(tmp_path, rel, env_name, n_eps, n_steps, da, ds):
    src = shared(DEMOS, *rel.split("/"))
    assert detect_format(src) == "robosuite-hdf5"
    summary = robosuite_hdf5.ingest(src, tmp_path / "s.zarr", progress=False)
    assert (summary["n_episodes"], summary["n_steps"]) == (n_eps, n_steps)
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert (store.n_episodes, store.n_steps) == (n_eps, n_steps)
    assert store.keys["action"].shape == (da,) and store.keys["obs.sim_state"].shape == (ds,)
    meta = store.attrs["robosuite"]
    assert meta["env_name"] == env_name
    with h5py.File(src, "r") as h:
        demos = sorted(h["data"].keys(), key=lambda n: int(n.split("_")[1]))
        assert meta["demos"] == demos
        for i, d in enumerate(demos):
            ep = store.get_episode(i)
            src_a, src_s = h["data"][d]["actions"][()], h["data"][d]["states"][()]
            assert ep["action"].dtype == src_a.dtype and np.array_equal(ep["action"], src_a)
            assert ep["obs.sim_state"].dtype == src_s.dtype and np.array_equal(ep["obs.sim_state"], src_s)
            m = store.episode_meta(i)
            assert m["task"] == robosuite_hdf5.TASK_TEXT[env_name]
            assert m["source"] == f"robosuite:demo.hdf5:{d}"
            xml = h["data"][d].attrs["model_file"]
            if xml.startswith("<"):
                assert robosuite_hdf5.episode_model_xml(store, i) == xml
            else:  # robosuite 1.0: a file name under models/
                assert robosuite_hdf5.episode_model_xml(store, i) == (src.parent / "models" / xml).read_text()
    if env_name == "Lift":
        assert meta["repository_version"] == "1.4.0"
        assert meta["env_info"]["controller_configs"]["type"] == "OSC_POSE"


def test_task_text_fallback():
    assert robosuite_hdf5.task_text("Lift") == "lift the cube"
    assert robosuite_hdf5.task_text("MyNewTaskXYZ") == "my new task xyz"


def _write_robomimic(path, n_demos=2, T=6, nan_at=None, bad_dim_demo=None):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h:
        data = h.create_group("data")
        data.attrs["env_args"] = json.dumps(
            {"env_name": "PickPlaceCan", "type": 1, "env_kwargs": {"control_freq": 10}}
        )
        for i in range(n_demos):
            g = data.create_group(f"demo_{i}")
            da = 8 if bad_dim_demo == i else 7
            act = rng.uniform(-1, 1, (T, da))
            if nan_at is not None and i == nan_at[0]:
                act[nan_at[1], nan_at[2]] = np.nan
            g.create_dataset("actions", data=act)
            g.create_dataset("states", data=rng.normal(size=(T, 10)))
            rew = np.zeros(T)
            rew[-1] = 1.0 if i == 0 else 0.0
            g.create_dataset("rewards", data=rew)
            g.create_dataset("dones", data=(rew > 0).astype(np.int64))
            g.attrs["model_file"] = f"<mujoco model='m{i}'/>"
            o = g.create_group("obs")
            o.create_dataset("robot0_eef_pos", data=rng.normal(size=(T, 3)))
            o.create_dataset("robot0_eef_quat", data=rng.normal(size=(T, 4)))
            o.create_dataset("robot0_gripper_qpos", data=rng.normal(size=(T, 2)))
            o.create_dataset("object", data=rng.normal(size=(T, 14)))
            o.create_dataset("agentview_image", data=rng.integers(0, 255, (T, 8, 8, 3), dtype=np.uint8))
        h.create_dataset("mask/train", data=np.array([b"demo_0"]))


def test_robomimic_obs_rewards_and_images(tmp_path):
    src = tmp_path / "rm.hdf5"
    _write_robomimic(src)
    summary = robosuite_hdf5.ingest(src, tmp_path / "s.zarr", progress=False)
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert store.fps == 10
    assert set(store.keys) == {
        "action", "obs.sim_state", "obs.robot0_eef_pos", "obs.robot0_eef_quat", "obs.robot0_gripper_qpos",
        "obs.object", "obs.image.agentview", "obs.state", "reward", "done",
    }  # fmt: skip
    assert store.keys["obs.state"].names[0] == "robot0_eef_pos[0]"
    assert summary["successes"] == [True, False]
    assert store.attrs["robosuite"]["filter_keys"] == {"train": ["demo_0"]}
    assert [store.episode_meta(i)["success"] for i in range(2)] == [True, False]
    assert store.episode_meta(0)["task"] == "pick the can and place it into its bin"
    with h5py.File(src, "r") as h:
        for i in range(2):
            g, ep = h[f"data/demo_{i}"], store.get_episode(i)
            o = g["obs"]
            np.testing.assert_array_equal(ep["obs.image.agentview"], o["agentview_image"][()])
            want = np.concatenate(
                [o["robot0_eef_pos"][()], o["robot0_eef_quat"][()], o["robot0_gripper_qpos"][()]], 1
            )
            np.testing.assert_array_equal(ep["obs.state"], want.astype(np.float32))
            np.testing.assert_array_equal(ep["obs.object"], o["object"][()])
            np.testing.assert_array_equal(ep["reward"], g["rewards"][()])
            assert robosuite_hdf5.episode_model_xml(store, i) == f"<mujoco model='m{i}'/>"
    # files recorded from raw robosuite renders (bottom row first) can be flipped on import
    robosuite_hdf5.ingest(
        src, tmp_path / "nf.zarr", flip_dataset_images=True, max_steps_per_episode=4, progress=False
    )
    nf = EpisodeStore.open(tmp_path / "nf.zarr")
    assert nf.n_steps == 8
    with h5py.File(src, "r") as h:
        np.testing.assert_array_equal(
            nf.get_episode(1)["obs.image.agentview"], h["data/demo_1/obs/agentview_image"][:4][:, ::-1]
        )


def test_bad_inputs_name_file_key_index(tmp_path):
    src = tmp_path / "nan.hdf5"
    _write_robomimic(src, nan_at=(1, 4, 2))
    with pytest.raises(
        IngestError, match=r"nan\.hdf5: data/demo_1/actions has a non-finite value \(nan\) at step 4"
    ):
        robosuite_hdf5.ingest(src, tmp_path / "a.zarr", progress=False)
    assert not (tmp_path / "a.zarr").exists()

    src = tmp_path / "dims.hdf5"
    _write_robomimic(src, bad_dim_demo=1)
    with pytest.raises(
        IngestError, match=r"dims\.hdf5: data/demo_1: 'action' has per-step shape \(8,\), expected \(7,\)"
    ):
        robosuite_hdf5.ingest(src, tmp_path / "b.zarr", progress=False)
    assert not (tmp_path / "b.zarr").exists() and not list(tmp_path.glob(".b.zarr*"))

    lift = shared(DEMOS, "lift", "demo.hdf5")
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(lift.read_bytes()[: lift.stat().st_size // 2])
    with pytest.raises(IngestError, match=r"cut\.hdf5: .*(truncated or corrupt)"):
        robosuite_hdf5.ingest(cut, tmp_path / "c.zarr", progress=False)
    assert not (tmp_path / "c.zarr").exists()

    with h5py.File(tmp_path / "nodata.hdf5", "w") as h:
        h.create_group("stuff")
    with pytest.raises(IngestError, match=r"nodata\.hdf5: no 'data' group"):
        robosuite_hdf5.ingest(tmp_path / "nodata.hdf5", tmp_path / "d.zarr", progress=False)


def test_regenerate_obs_lift(tmp_path):
    pytest.importorskip("robosuite", reason="robosuite not installed")
    src = shared(DEMOS, "lift", "demo.hdf5")
    summary = robosuite_hdf5.ingest(
        src, tmp_path / "r.zarr", regenerate_obs=True, cameras=("agentview", "robot0_eye_in_hand"),
        image_size=32, max_episodes=2, max_steps_per_episode=3, progress=False,
    )  # fmt: skip
    assert (summary["n_episodes"], summary["n_steps"]) == (2, 6)
    store = EpisodeStore.open(tmp_path / "r.zarr")
    assert store.keys["obs.state"].shape == (9,) and store.keys["obs.object"].shape == (10,)
    assert store.keys["obs.image.agentview"].shape == (32, 32, 3)
    regen = store.attrs["robosuite"]["regenerated"]
    assert regen["model"] in ("model_file", "env_model")
    with h5py.File(src, "r") as h:
        for i, d in enumerate(["demo_1", "demo_2"]):
            ep, states = store.get_episode(i), h["data"][d]["states"][:3]
            assert np.array_equal(ep["obs.sim_state"], states)
            # Lift state = [time, qpos(7 arm, 2 finger, cube free joint 7), qvel]: the env must show them
            np.testing.assert_allclose(ep["obs.state"][:, 7:9], states[:, 8:10], atol=1e-6)
            np.testing.assert_allclose(ep["obs.object"][:, :3], states[:, 10:13], atol=1e-6)
            for cam in ("agentview", "robot0_eye_in_hand"):
                img = ep[f"obs.image.{cam}"]
                assert img.dtype == np.uint8 and img.std() > 5, f"{cam} image looks blank"
    assert [store.episode_meta(i)["success"] for i in range(2)] == [
        False,
        False,
    ]  # first steps: not lifted yet


def test_regenerate_obs_state_size_mismatch_is_explained(tmp_path):
    pytest.importorskip("robosuite", reason="robosuite not installed")
    lift = shared(DEMOS, "lift", "demo.hdf5")
    src = tmp_path / "odd.hdf5"
    with h5py.File(lift, "r") as h, h5py.File(src, "w") as out:
        out.create_group("data")
        for k, v in h["data"].attrs.items():
            out["data"].attrs[k] = v
        g = out.create_group("data/demo_1")
        g.create_dataset("actions", data=h["data/demo_1/actions"][:2])
        g.create_dataset("states", data=h["data/demo_1/states"][:2, :30])  # 30 values, the model has 32
    with pytest.raises(IngestError, match=r"odd\.hdf5: data/demo_1: recorded states have 30 values .* 32"):
        robosuite_hdf5.ingest(src, tmp_path / "x.zarr", regenerate_obs=True, cameras=(), progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_cli_ingest_robosuite(tmp_path, capsys):
    from vlaflow.cli import main

    src = shared(DEMOS, "lift", "demo.hdf5")
    rc = main(["ingest", str(src), str(tmp_path / "s.zarr"), "--format", "robosuite-hdf5", "--no-progress",
               "--task", "raise the red block"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "3 episodes, 1384 steps" in capsys.readouterr().out
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert store.n_steps == 1384 and store.episode_meta(2)["task"] == "raise the red block"
    # a corrupt file: one line naming the file, exit 1, nothing written
    bad = tmp_path / "bad.hdf5"
    shutil.copyfile(src, bad)
    with open(bad, "r+b") as f:
        f.truncate(4096)
    rc = main(["ingest", str(bad), str(tmp_path / "b.zarr"), "--format", "robosuite-hdf5", "--no-progress"])
    assert rc == 1
    assert "bad.hdf5" in capsys.readouterr().err
    assert not (tmp_path / "b.zarr").exists()
