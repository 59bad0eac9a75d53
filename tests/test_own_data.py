"""Training on your own data without a task preset (``vlaflow train --family F --data STORE``): the config
comes from the store's schema, held-out episodes are scored instead of sim rollouts, the checkpoint and
run_config.json carry the store's fps and keys; bad stores say what they hold.

The SO-101 case is the real LeRobot recording in ../shared/data ingested with --skip-missing-video.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from conftest import shared  # noqa: E402

from vlaflow.errors import ConfigError  # noqa: E402

QUIET = ["train.progress=false", "train.num_threads=1", "train.num_workers=0"]
TINY_NET = ["policy.net.unet.down_dims=[16,32]", "policy.net.unet.step_embed_dim=16"]


def cli(*args: str) -> int:
    from vlaflow.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def so101(tmp_path_factory) -> Path:
    src = shared("so101_record_test")
    dest = tmp_path_factory.mktemp("so101") / "so101.zarr"
    assert cli("ingest", str(src), str(dest), "--skip-missing-video") == 0
    return dest


def make_store(path: Path, keys: dict, fps: float | None = 10, n_eps: int = 4, length: int = 24) -> Path:
    from vlaflow.data.store import EpisodeStore, KeySpec

    st = EpisodeStore.create(path, keys={k: KeySpec(*v) for k, v in keys.items()}, fps=fps)
    rng = np.random.default_rng(0)
    for _ in range(n_eps):
        ep = {}
        for k, (dtype, shape) in keys.items():
            if np.dtype(dtype) == np.uint8:
                ep[k] = rng.integers(0, 255, size=(length, *shape), dtype=np.uint8)
            else:
                ep[k] = np.cumsum(rng.normal(size=(length, *shape)), 0).astype(dtype)
        st.append_episode(ep, task="move", source="syn", success=True)
    st.close()
    return path


def test_so101_trains_end_to_end_with_held_out_metrics_and_a_plot(so101, tmp_path, capsys):
    from vlaflow.data.store import EpisodeStore
    from vlaflow.policies.runtime import load_policy

    run = tmp_path / "run"
    rc = cli(
        "train", "--family", "diffusion", "--data", str(so101), "--out", str(run),
        "train.steps=12", "train.batch_size=16", "train.eval_every=6", "train.log_every=3",
        "eval.val_windows=48", *QUIET,
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out validation (1 episodes, 48 windows)" in out
    store = EpisodeStore.open(so101)
    assert store.fps == 30
    rows = list(csv.DictReader(open(run / "log.csv", newline="")))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [int(r["step"]) for r in evals] == [6, 12]
    for r in evals:
        for k in ("val_loss", "action_mae_norm", "action_mae", "action_mae_first", "hold_state_mae"):
            assert math.isfinite(float(r[k])) and float(r[k]) > 0, (k, r)
        assert float(r["score"]) == pytest.approx(-float(r["action_mae_norm"]), rel=1e-4)
    rep = json.loads((run / "eval" / "step_0000012" / "validation.json").read_text())
    assert rep["n_windows"] == 48 and len(rep["action_mae_per_dim"]) == 6
    assert rep["action_names"][0] == "shoulder_pan.pos"
    assert (run / "eval" / "step_0000012" / "actions.png").stat().st_size > 10_000
    assert (run / "curves.png").stat().st_size > 10_000
    # the checkpoint and run_config.json agree with the store: keys, shapes, action dim, fps
    ckpt = json.loads((run / "checkpoints" / "last" / "config.json").read_text())["config"]
    saved = json.loads((run / "run_config.json").read_text())
    for pol in (ckpt, saved["policy"]):
        assert pol["fps"] == 30.0
        assert pol["obs_shapes"] == {"obs.state": [6]}
        assert pol["action_dim"] == 6
    assert saved["data"]["obs_keys"] == ["obs.state"] and saved["eval"]["task"] == ""
    policy = load_policy(str(run / "checkpoints" / "best"))
    assert policy.config.fps == 30.0 and list(policy.config.obs_keys) == ["obs.state"]


def test_run_config_json_carries_the_store_fps_a_preset_run_trains_with(tmp_path):
    from vlaflow.train.config import apply_overrides
    from vlaflow.train.presets import get_preset
    from vlaflow.train.trainer import train

    store = make_store(tmp_path / "s.zarr", {"action": ("float32", (3,)), "obs.state": ("float32", (5,))}, 25)
    cfg = apply_overrides(
        get_preset("pick_place_lowdim_diffusion"),  # fps 10, obs.state (21,), Da 4 in the preset
        [*TINY_NET, "data.horizon=8", "data.n_action_steps=4", "train.steps=4", "train.batch_size=4",
         "train.ckpt_every=2", "eval.task=", *QUIET],
    )  # fmt: skip
    assert cfg.policy.fps == 10.0
    train(cfg, store, tmp_path / "run")
    ckpt = json.loads((tmp_path / "run" / "checkpoints" / "last" / "config.json").read_text())["config"]
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())["policy"]
    assert ckpt["fps"] == saved["fps"] == 25.0  # run_config.json used to say 10.0 here
    assert ckpt["obs_shapes"] == saved["obs_shapes"] == {"obs.state": [5]}
    assert ckpt["action_dim"] == saved["action_dim"] == 3
    # a run saved before this fix (the preset's fps/shapes in its resume state) still resumes
    state_path = tmp_path / "run" / "checkpoints" / "last" / "train_state.json"
    state = json.loads(state_path.read_text())
    state["run_config"]["policy"].update(fps=10.0, obs_shapes={"obs.state": [21]}, action_dim=4)
    state_path.write_text(json.dumps(state))
    res = train(apply_overrides(cfg, ["train.steps=6"]), store, tmp_path / "run", resume=True)
    assert res.step == 6


@pytest.mark.parametrize("family", ["flow", "ebt"])
def test_flow_and_ebt_families_train_on_an_inferred_config(family, tmp_path, capsys):
    store = make_store(tmp_path / "s.zarr", {"action": ("float32", (2,)), "obs.pos": ("float32", (3, 2))})
    net = TINY_NET if family == "flow" else ["policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2"]
    run = tmp_path / "run"
    rc = cli(
        "train", "--family", family, "--data", str(store), "--out", str(run), "train.steps=4",
        "train.batch_size=4", "eval.val_windows=8", "data.horizon=8", "data.n_action_steps=4", *net, *QUIET,
    )  # fmt: skip
    assert rc == 0
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["family"] == family and saved["name"] == f"own_data_{family}"
    assert saved["policy"]["obs_shapes"] == {"obs.pos": [3, 2]} and saved["policy"]["fps"] == 10.0
    rep = json.loads((run / "eval" / "step_0000004" / "validation.json").read_text())
    assert math.isfinite(rep["action_mae"]) and rep["n_episodes"] == 1


def test_inferred_config_takes_state_and_camera_keys_and_overrides_win(tmp_path):
    from vlaflow.cli.train import resolve_run_config

    keys = {
        "action": ("float32", (4,)),
        "obs.state": ("float32", (7,)),
        "obs.image.wrist": ("uint8", (40, 48, 3)),
        "obs.flag": ("bool", (1,)),
    }
    store = make_store(tmp_path / "s.zarr", keys, fps=15, n_eps=2)
    cfg = resolve_run_config(None, [], None, False, family="diffusion", data=str(store))
    assert cfg.data.obs_keys == ("obs.flag", "obs.state", "obs.image.wrist")
    assert cfg.policy.obs_shapes["obs.image.wrist"] == (40, 48, 3)
    assert tuple(cfg.policy.encoder.crop_shape) == (36, 43)
    assert cfg.policy.fps == 15.0 and cfg.policy.action_dim == 4 and cfg.eval.task == ""
    cfg = resolve_run_config(None, ["data.obs_keys=[obs.state]", "data.horizon=32"], None, False,
                             family="diffusion", data=str(store))  # fmt: skip
    assert cfg.data.obs_keys == ("obs.state",) and cfg.policy.horizon == 32
    with pytest.raises(ConfigError, match="--family flow but the preset 'pusht_lowdim_diffusion'"):
        resolve_run_config("pusht_lowdim_diffusion", [], None, False, family="flow", data=str(store))


def test_a_store_without_an_action_key_says_what_it_found(tmp_path, capsys):
    store = make_store(tmp_path / "s.zarr", {"obs.state": ("float32", (5,)), "obs.cmd": ("float32", (2,))})
    rc = cli("train", "--family", "diffusion", "--data", str(store), "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert rc != 0
    assert "no 'action' key" in err and "obs.cmd float32 (2,)" in err and "--key-map" in err
    assert not (tmp_path / "run").exists()


def test_keys_the_family_cannot_encode_are_named_with_the_reason(tmp_path, capsys):
    from vlaflow.train.config import apply_overrides
    from vlaflow.train.presets import get_preset
    from vlaflow.train.trainer import train

    keys = {
        "action": ("float32", (2,)),
        "obs.image.depth": ("uint8", (40, 40, 1)),  # a one-channel camera
        "obs.image.tiny": ("uint8", (8, 8, 3)),
        "obs.cloud": ("float32", (600, 3)),
    }
    store = make_store(tmp_path / "s.zarr", keys, n_eps=2, length=6)
    rc = cli("train", "--family", "ebt", "--data", str(store), "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert rc != 0 and "no observation key the ebt policy can encode" in err
    assert "obs.image.depth: a camera key must be uint8 (h, w, 3); it is uint8 (40, 40, 1)" in err
    assert "obs.image.tiny: images of 8x8 px are too small" in err
    assert "obs.cloud: 1800 values per step (600, 3) is too many" in err
    # a preset run that names such a key by override is refused the same way, before any training
    cfg = apply_overrides(get_preset("pusht_lowdim_diffusion"), ["data.obs_keys=[obs.cloud]", "eval.task="])
    with pytest.raises(ConfigError, match=r"diffusion policy cannot encode obs\.cloud: 1800 values"):
        train(cfg, store, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()  # refused before the run directory is made


def test_a_sim_preset_on_the_so101_store_points_to_family_and_leaves_nothing(so101, tmp_path, capsys):
    pytest.importorskip("pybullet", reason="the pick_place task's env checks the policy against it")
    run = tmp_path / "run"
    rc = cli("train", "--preset", "pick_place_lowdim_diffusion", "--data", str(so101), "--out", str(run),
             "train.steps=2", *QUIET)  # fmt: skip
    err = capsys.readouterr().err
    assert rc != 0 and "obs.state: policy expects (6,), task gives (21,)" in err
    assert "--family diffusion infers the keys from the store" in err
    assert not run.exists()  # refused before the run directory is made
