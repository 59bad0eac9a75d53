"""``vlaflow import-lerobot``: a LeRobot 0.4.4 DiffusionPolicy directory -> a vlaflow checkpoint whose action
chunks equal LeRobot's ``predict_action_chunk`` for the same observations and initial noise.

The fixture (tests/data/lerobot_policy_diffusion) was written by LeRobot 0.4.4 itself in its own venv:
``benchmarks/lerobot_policy_fixture.py small tests/data/lerobot_policy_diffusion`` (see fixture_info.json);
``expected.safetensors`` holds LeRobot's chunks (DDPM-100 with seeded per-step noise, DDIM-10).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlaflow.errors import VlaflowError
from vlaflow.policies.checkpoint import load_checkpoint
from vlaflow.policies.lerobot_import import LeRobotImportError, import_lerobot_policy
from vlaflow.policies.runtime import load_policy

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "lerobot_policy_diffusion"
TO, TA = 2, 8


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def imported():
    torch.set_num_threads(1)
    policy, provenance = import_lerobot_policy(FIXTURE, fps=10.0)
    return policy, provenance


def _obs(e):
    return {"obs.state": e["state"], "obs.environment_state": e["env"]}


def _cli(*args, cwd=ROOT):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "vlaflow.cli", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_fixture_was_written_by_lerobot_and_is_small():
    info = json.loads((FIXTURE / "fixture_info.json").read_text())
    assert info["versions"]["lerobot"] == "0.4.4"
    total = sum(p.stat().st_size for p in FIXTURE.iterdir())
    assert total < 2_000_000, total
    for name in ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"):
        assert (FIXTURE / name).is_file()


def test_imported_config_matches_lerobot(imported):
    policy, prov = imported
    cfg = policy.config
    assert (cfg.family, cfg.sampler, cfg.num_inference_steps, cfg.num_train_steps) == (
        "diffusion",
        "ddpm",
        100,
        100,
    )
    assert (cfg.n_obs_steps, cfg.horizon, cfg.n_action_steps, cfg.action_offset) == (2, 16, 8, 1)
    assert cfg.clip_sample and cfg.clip_sample_range == 1.0 and cfg.net.unet.down_dims == (32, 64)
    assert list(cfg.obs_shapes) == ["obs.state", "obs.environment_state"]
    assert policy.normalizer.modes == {
        "action": "meanstd",
        "obs.state": "minmax",
        "obs.environment_state": "minmax",
    }
    assert policy.spec.horizon == 15  # the chunk starts at the current step: LeRobot's H - (To - 1)
    assert policy.num_parameters() == json.loads((FIXTURE / "fixture_info.json").read_text())["parameters"]
    assert prov["statistics_from"] == "processors" and prov["lerobot_type"] == "diffusion"


def test_chunk_equals_lerobot_predict_action_chunk(imported, expected):
    """Same observations, same initial noise: DDIM-10 (deterministic) and DDPM-100 (per-step noise from a
    generator seeded like LeRobot's global one) give LeRobot's chunk; LeRobot's Ta rows are our first Ta."""
    policy, _ = imported
    e = expected
    with torch.inference_mode():
        ddim = policy.sample(_obs(e), noise=e["noise"], sampler="ddim", num_steps=10)
        g = torch.Generator().manual_seed(int(e["ddpm_seed"][0]))
        ddpm = policy.sample(_obs(e), noise=e["noise"], generator=g)  # the imported default: DDPM-100
    assert ddim.shape == ddpm.shape == (3, 15, 2)
    std = torch.as_tensor(policy.normalizer.stats["action"]["std"])  # errors in normalised units
    d_ddim = float(((ddim[:, :TA] - e["chunk_ddim"]) / std).abs().max())
    d_ddpm = float(((ddpm[:, :TA] - e["chunk_ddpm"]) / std).abs().max())
    assert d_ddim < 2e-5, d_ddim  # measured 2.0e-6 (float32 over 10 steps)
    assert d_ddpm < 5e-5, d_ddpm  # measured 5.1e-6 (float32 over 100 steps)
    # and it is not trivially close: another noise gives another chunk
    with torch.inference_mode():
        other = policy.sample(_obs(e), noise=torch.randn_like(e["noise"]), sampler="ddim", num_steps=10)
    assert float((other[:, :TA] - e["chunk_ddim"]).abs().max()) > 1.0


def test_cli_checkpoint_and_runtime_with_lerobot_key_names(tmp_path, expected):
    out = tmp_path / "ckpt"
    p = _cli("import-lerobot", str(FIXTURE), "--out", str(out), "--fps", "10")
    assert p.returncode == 0, p.stderr
    assert "chunk 15 from the current step" in p.stdout and "ddpm x 100" in p.stdout
    meta = json.loads((out / "config.json").read_text())
    assert meta["extra"]["lerobot_import"]["lerobot_type"] == "diffusion"
    policy = load_checkpoint(out)
    e = expected
    with torch.inference_mode():
        chunk = policy.sample(_obs(e), noise=e["noise"], sampler="ddim", num_steps=10)
    assert float((chunk[:, :TA] - e["chunk_ddim"]).abs().max()) < 1e-3
    # the runtime takes LeRobot's names for the observation keys (one window, no batch dim)
    rt = load_policy(out, sampler="ddim", num_steps=10, seed=0)
    a = rt.infer(
        {"observation.state": e["state"][0].numpy(), "observation.environment_state": e["env"][0].numpy()}
    )
    rt.reset()  # the same noise again
    b = rt.infer({"obs.state": e["state"][0].numpy(), "obs.environment_state": e["env"][0].numpy()})
    assert a.actions.shape == (15, 2) and np.allclose(a.actions, b.actions)
    # a LeRobot directory loads directly too (converted in memory)
    rt2 = load_policy(FIXTURE, fps=10.0, sampler="ddim", num_steps=10, seed=0)
    c = rt2.infer(
        {"observation.state": e["state"][0].numpy(), "observation.environment_state": e["env"][0].numpy()}
    )
    assert np.allclose(a.actions, c.actions)
    # the overwrite rule: an existing --out is refused, --overwrite replaces it, DIR itself never
    again = _cli("import-lerobot", str(FIXTURE), "--out", str(out), "--fps", "10")
    assert again.returncode == 1 and "exists" in again.stderr and "--overwrite" in again.stderr
    assert (
        _cli("import-lerobot", str(FIXTURE), "--out", str(out), "--fps", "10", "--overwrite").returncode == 0
    )
    into = _cli("import-lerobot", str(FIXTURE), "--out", str(FIXTURE / "x"), "--fps", "10", "--overwrite")
    assert into.returncode == 1 and "never writes into what it reads" in into.stderr
    assert not (FIXTURE / "x").exists()


def test_onnx_export_of_imported_policy_matches_lerobot(imported, expected, tmp_path):
    from vlaflow.deploy.export import ExportOptions, export_policy
    from vlaflow.deploy.onnx_runtime import OnnxPolicy

    policy, _ = imported
    report = export_policy(
        policy,
        tmp_path / "onnx",
        ExportOptions(exporter="torchscript", n_parity_obs=2, samplers=(("ddim", 10), ("ddpm", 100))),
    )
    assert report["passed"], report["failures"]
    assert json.loads((tmp_path / "onnx" / "parity.json").read_text())["passed"]
    ort = OnnxPolicy(tmp_path / "onnx")
    assert ort.config.horizon == 15 and ort.action_offset == 1
    e = expected
    for i in range(e["state"].shape[0]):
        obs = {
            "observation.state": e["state"][i].numpy(),
            "observation.environment_state": e["env"][i].numpy(),
        }
        cond = ort.encode(obs)
        x0 = ort.denoise(cond, e["noise"][i : i + 1].numpy(), "ddim", 10)
        chunk = ort.unnormalize_action(x0[0])[ort.action_offset :]
        assert np.abs(chunk[:TA] - e["chunk_ddim"][i].numpy()).max() < 1e-3
    assert ort.infer(obs).actions.shape == (15, 2)


def _copy_fixture(tmp_path) -> Path:
    d = tmp_path / "lr"
    shutil.copytree(FIXTURE, d)
    return d


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unsupported_type_lists_supported(tmp_path):
    d = _copy_fixture(tmp_path)
    _edit_config(d, type="act")
    with pytest.raises(LeRobotImportError, match=r"type 'act' is not supported; supported: diffusion"):
        import_lerobot_policy(d, fps=10)
    p = _cli("import-lerobot", str(d), "--out", str(tmp_path / "o"), "--fps", "10")
    assert p.returncode == 1 and "supported: diffusion" in p.stderr and not (tmp_path / "o").exists()


def test_missing_files_are_named(tmp_path):
    d = _copy_fixture(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(LeRobotImportError, match=r"missing model\.safetensors"):
        import_lerobot_policy(d, fps=10)
    d = _copy_fixture(tmp_path / "b")
    (d / "policy_preprocessor_step_3_normalizer_processor.safetensors").unlink()
    with pytest.raises(LeRobotImportError, match=r"missing policy_preprocessor_step_3_normalizer_processor"):
        import_lerobot_policy(d, fps=10)
    d = _copy_fixture(tmp_path / "c")
    (d / "policy_preprocessor.json").unlink()
    (d / "policy_postprocessor.json").unlink()
    with pytest.raises(
        LeRobotImportError, match=r"missing policy_preprocessor\.json and policy_postprocessor"
    ):
        import_lerobot_policy(d, fps=10)
    with pytest.raises(LeRobotImportError, match=r"not a directory"):
        import_lerobot_policy(tmp_path / "nope", fps=10)
    with pytest.raises(LeRobotImportError, match=r"--fps"):
        import_lerobot_policy(FIXTURE)


def test_key_and_shape_mismatch_name_keys_on_both_sides(tmp_path):
    d = _copy_fixture(tmp_path)
    state = load_file(str(d / "model.safetensors"))
    w = state.pop("diffusion.unet.mid_modules.0.conv1.block.0.weight")
    state["diffusion.unet.mid_modules.0.convX.weight"] = w
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(LeRobotImportError) as ei:
        import_lerobot_policy(d, fps=10)
    msg = str(ei.value)
    assert "diffusion.unet.mid_modules.0.convX.weight" in msg  # LeRobot side
    assert "head.mid.0.blocks.0.block.0.weight" in msg  # vlaflow side
    d = _copy_fixture(tmp_path / "b")
    _edit_config(d, down_dims=[32, 128])  # the weights are (32, 64): shapes no longer agree
    with pytest.raises(
        LeRobotImportError,
        match=r"shape mismatch.*LeRobot diffusion\.unet\.\S+ \(64,\) vs vlaflow head\.\S+ \(128,\)",
    ):
        import_lerobot_policy(d, fps=10)


def test_unsupported_features_and_modes_say_what(tmp_path):
    d = _copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["input_features"]["observation.images.top"] = {"type": "VISUAL", "shape": [3, 96, 96]}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        LeRobotImportError, match=r"vlaflow keys with no LeRobot source \['obs_encoder\.cameras"
    ):
        import_lerobot_policy(d, fps=10)  # a camera in the config, none of its encoder's weights
    cfg["resize_shape"] = [64, 64]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LeRobotImportError, match=r"resize_shape is not supported"):
        import_lerobot_policy(d, fps=10)
    d = _copy_fixture(tmp_path / "b")
    _edit_config(d, prediction_type="sample")
    with pytest.raises(LeRobotImportError, match=r"prediction_type='sample' is not supported"):
        import_lerobot_policy(d, fps=10)
    d = _copy_fixture(tmp_path / "c")
    _edit_config(d, normalization_mapping={"STATE": "QUANTILE10", "ENV": "MIN_MAX", "ACTION": "MEAN_STD"})
    with pytest.raises(LeRobotImportError, match=r"'QUANTILE10' is not supported"):
        import_lerobot_policy(d, fps=10)


def test_ddim_config_maps_to_ddim_sampler(tmp_path, expected):
    d = _copy_fixture(tmp_path)
    _edit_config(d, noise_scheduler_type="DDIM", num_inference_steps=10)
    policy, _ = import_lerobot_policy(d, fps=30)
    assert (policy.config.sampler, policy.config.num_inference_steps, policy.spec.fps) == ("ddim", 10, 30.0)
    with torch.inference_mode():
        chunk = policy.sample(_obs(expected), noise=expected["noise"])  # the config's own sampler
    assert float((chunk[:, :TA] - expected["chunk_ddim"]).abs().max()) < 1e-3


def test_imported_policy_refuses_training_rti_rtc_distill_and_gpc(tmp_path):
    """What does not handle a chunk that starts before the current step yet says so, never mis-times it."""
    from vlaflow.deploy.rtc import RTCRuntime
    from vlaflow.deploy.rti import RTIRuntime
    from vlaflow.policies.checkpoint import load_parents, save_checkpoint
    from vlaflow.train.objectives.distill import student_config

    policy, _ = import_lerobot_policy(FIXTURE, fps=10)
    with pytest.raises(VlaflowError, match=r"action_offset > 0"):
        RTCRuntime(policy)
    with pytest.raises(VlaflowError, match=r"distilling it is not supported"):
        student_config(policy, "ckpt", "onestep", 1)
    save_checkpoint(tmp_path / "ck", policy)
    with pytest.raises(VlaflowError, match=r"composing it with GPC is not supported"):
        load_parents([tmp_path / "ck"])
    with pytest.raises(VlaflowError, match=r"training or fine-tuning it is not supported"):
        policy.compute_loss({"action": torch.zeros(1, 16, 2), "obs.state": torch.zeros(1, 2, 2)})
    with pytest.raises(VlaflowError, match=r"action_offset > 0"):
        RTIRuntime(policy)


def test_lerobot_key_aliases():
    import vlaflow.keys as K
    from vlaflow.interfaces import RuntimeSpec, obs_window

    assert K.from_lerobot("observation.state") == "obs.state"
    assert K.from_lerobot("observation.images.front") == "obs.image.front"
    assert K.from_lerobot("observation.image") == "obs.image.main"
    assert K.from_lerobot("observation.environment_state") == "obs.environment_state"
    assert K.from_lerobot("action") == "action"
    for k in ("obs.state", "obs.image.front", "obs.environment_state", "action"):
        assert K.from_lerobot(K.to_lerobot(k)) == k
    spec = RuntimeSpec(2, 4, 2, {"obs.state": (3,), "obs.image.top": (8, 8, 3)}, 2, 10.0)
    img = np.zeros((2, 8, 8, 3), np.uint8)
    w = obs_window(spec, {"observation.state": np.ones((2, 3)), "observation.image": img})
    assert set(w) == {"obs.state", "obs.image.top"} and w["obs.state"].shape == (2, 3)
    w = obs_window(spec, {"observation.state": np.ones((2, 3)), "observation.images.top": img})
    assert w["obs.image.top"].shape == (2, 8, 8, 3)
    with pytest.raises(VlaflowError, match=r"gives 'obs.state' twice"):
        obs_window(
            spec, {"obs.state": np.ones((2, 3)), "observation.state": np.ones((2, 3)), "obs.image.top": img}
        )
    with pytest.raises(VlaflowError, match=r"missing key\(s\) \['obs.image.top'\].*observation\.\* names"):
        obs_window(spec, {"observation.state": np.ones((2, 3))})
    two = RuntimeSpec(2, 4, 2, {"obs.image.a": (8, 8, 3), "obs.image.b": (8, 8, 3)}, 2, 10.0)
    with pytest.raises(VlaflowError, match=r"missing"):  # one single-camera image cannot stand for two
        obs_window(two, {"observation.image": img})


LEROBOT_PY = Path("/work/venvs/lerobot/bin/python")


@pytest.mark.skipif(not LEROBOT_PY.exists(), reason="needs LeRobot 0.4.4's own venv to build a camera policy")
def test_camera_policy_matches_lerobot(tmp_path):
    """A camera policy (LeRobot's ResNet-18 is 11M parameters, too big to commit) built by LeRobot in its
    own venv: one 96x96 camera (cropped to 84x84) between state and env in LeRobot's condition order,
    pixels normalised by mean/std, the single-image name observation.image."""
    d = tmp_path / "lr"
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    cmd = [str(LEROBOT_PY), str(ROOT / "benchmarks" / "lerobot_policy_fixture.py"), "small_image", str(d)]
    p = subprocess.run([*cmd, "--batch", "2"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    e = load_file(str(d / "expected.safetensors"))
    policy, _ = import_lerobot_policy(d, fps=10)
    enc = policy.config.encoder
    assert enc.image_feature_relu and enc.image_standardize and enc.crop_shape == (84, 84)
    assert list(policy.config.obs_shapes) == ["obs.state", "obs.environment_state", "obs.image.main"]
    obs = {
        "obs.state": e["state"],
        "obs.environment_state": e["env"],
        "obs.image.main": e["observation.image"],
    }
    std = torch.as_tensor(policy.normalizer.stats["action"]["std"])
    with torch.inference_mode():
        ddim = policy.sample(obs, noise=e["noise"], sampler="ddim", num_steps=10)
    assert float(((ddim[:, :TA] - e["chunk_ddim"]) / std).abs().max()) < 2e-5
    # the runtime takes LeRobot's single-camera name for a one-camera policy
    rt = load_policy(d, fps=10.0, sampler="ddim", num_steps=10, seed=0)
    win = {"observation.state": e["state"][0].numpy(), "observation.environment_state": e["env"][0].numpy()}
    assert rt.infer({**win, "observation.image": e["observation.image"][0].numpy()}).actions.shape == (15, 2)


def test_legacy_statistics_inside_model_safetensors(tmp_path, expected):
    """LeRobot < 0.4 kept the statistics as normalize_* buffers in model.safetensors, no processor files."""
    d = _copy_fixture(tmp_path)
    state = load_file(str(d / "model.safetensors"))
    pre = load_file(str(d / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    for key, v in pre.items():
        feature, _, stat = key.rpartition(".")
        group = "unnormalize_outputs" if feature == "action" else "normalize_inputs"
        state[f"{group}.buffer_{feature.replace('.', '_')}.{stat}"] = v
    save_file(state, str(d / "model.safetensors"))
    for f in d.glob("policy_*"):
        f.unlink()
    policy, prov = import_lerobot_policy(d, fps=10)
    assert prov["statistics_from"] == "legacy"
    with torch.inference_mode():
        chunk = policy.sample(_obs(expected), noise=expected["noise"], sampler="ddim", num_steps=10)
    assert float((chunk[:, :TA] - expected["chunk_ddim"]).abs().max()) < 1e-3


def test_load_policy_of_a_lerobot_dir_needs_fps():
    with pytest.raises(LeRobotImportError, match=r"does not record the control rate"):
        load_policy(FIXTURE)
