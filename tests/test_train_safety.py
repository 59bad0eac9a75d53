"""Issue 12, training half: checks before work, one To/H/Ta, nested typo hints, ``--config FILE``, run
provenance (resume without --data, a changed store refused), Ctrl-C saves a resumable checkpoint, resume
falls back to the newest intact step checkpoint and cleans a killed save's temp dirs, shareable
checkpoints (permissions, no optimizer state outside ``last``).

A tiny synthetic store and a tiny U-Net with 1 torch thread, as in test_train.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from vlaflow.errors import ConfigError, VlaflowError  # noqa: E402
from vlaflow.train.config import RunConfig, apply_overrides, upgrade_run_config_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = "pick_place_lowdim_diffusion"
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


def make_store(path: Path, n_episodes: int = 6):
    from vlaflow.data.store import EpisodeStore, KeySpec

    st = EpisodeStore.create(
        path, keys={"action": KeySpec("float32", (3,)), "obs.state": KeySpec("float32", (5,))}, fps=10
    )
    rng = np.random.default_rng(0)
    for i in range(n_episodes):
        n = 20 + 3 * i
        s = np.cumsum(rng.normal(size=(n, 5)), 0).astype(np.float32)
        st.append_episode(
            {"action": (s[:, :3] * 0.5).astype(np.float32), "obs.state": s}, task="move", source="syn"
        )
    return st


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.zarr"
    make_store(path)
    return path


def tiny_cfg(*extra: str) -> RunConfig:
    from vlaflow.train.presets import get_preset

    return apply_overrides(get_preset(PRESET), [*TINY, *extra])


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return e


# ------------------------------------------------------------------------------------ checks before work
def test_a_policy_that_cannot_run_on_the_eval_task_is_refused_before_the_first_step(store_path, tmp_path):
    pytest.importorskip("pybullet")
    from vlaflow.cli.train import rollout_evaluator
    from vlaflow.train.trainer import train

    # the tiny store's obs.state is (5,) and its actions (3,); pick_place gives obs.state (21,), Da 4
    cfg = tiny_cfg("eval.task=pick_place", "train.steps=50")
    with pytest.raises(
        ConfigError, match=r"(?s)eval\.task='pick_place'.*does not fit.*obs\.state.*action dim"
    ):
        train(cfg, store_path, tmp_path / "r", evaluate=rollout_evaluator(cfg))
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "log.csv").exists()


def test_an_unknown_eval_task_is_refused_with_a_suggestion():
    from vlaflow.cli.train import rollout_evaluator

    with pytest.raises(ConfigError, match=r"eval\.task.*Did you mean 'pusht'"):
        rollout_evaluator(tiny_cfg("eval.task=pushtt"))


def test_a_store_missing_the_policy_keys_is_refused_before_work(store_path, tmp_path):
    from vlaflow.train.trainer import train

    with pytest.raises(ConfigError, match=r"obs\.keypoint.*the dataset has"):
        train(tiny_cfg("data.obs_keys=[obs.keypoint]"), store_path, tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_smoke_run_does_not_start_the_full_final_evaluation(store_path, tmp_path, capsys):
    from vlaflow.train.trainer import SMOKE_FINAL_EPISODES, final_episodes, train

    calls = []

    def evaluate(policy, *, n_episodes, out_dir, video, ckpt):
        calls.append(n_episodes)
        return {"score": 0.5, "success_rate": 0.5}

    cfg = tiny_cfg("train.steps=12", "eval.task=pusht", "train.eval_episodes=50")
    assert final_episodes(cfg)[0] == SMOKE_FINAL_EPISODES < 50
    train(cfg, store_path, tmp_path / "r", evaluate=evaluate)
    assert calls == [SMOKE_FINAL_EPISODES]
    assert "smoke run" in capsys.readouterr().out  # the rule is said, with how to get all of them
    # asked for explicitly, or a long run: the full number
    assert final_episodes(apply_overrides(cfg, ["eval.final_episodes=50"]))[0] == 50
    assert final_episodes(apply_overrides(cfg, ["train.steps=5000"]))[0] == 50


# ------------------------------------------------------------------------------------ one To / H / Ta
def test_policy_horizon_override_is_the_horizon_trained_with(store_path, tmp_path):
    from vlaflow.policies import load_checkpoint
    from vlaflow.train.objectives.bc import make_batch
    from vlaflow.train.presets import get_preset
    from vlaflow.train.trainer import open_training_data, train

    base = [o for o in TINY if not o.startswith(("data.horizon", "data.n_action_steps"))]
    cfg = apply_overrides(get_preset(PRESET), [*base, "policy.horizon=16", "policy.n_action_steps=6"])
    cfg = apply_overrides(cfg, ["train.steps=2"])
    assert (cfg.data.horizon, cfg.data.n_action_steps) == (16, 6)  # before: the data copy (8, 4) won
    _, ws, _ = open_training_data(cfg, store_path)
    assert make_batch(ws, np.arange(2))["action"].shape[1] == 16  # the windows trained on
    res = train(cfg, store_path, tmp_path / "r")
    pol = load_checkpoint(res.last_ckpt)
    assert (pol.config.horizon, pol.config.n_action_steps) == (16, 6)
    assert pol.sample({"obs.state": torch.zeros(1, 2, 5)}).shape == (1, 16, 3)


def test_conflicting_window_overrides_and_configs_are_errors():
    with pytest.raises(ConfigError, match=r"data\.horizon=8 and policy\.horizon=16 disagree"):
        tiny_cfg("policy.horizon=16")  # TINY says data.horizon=8: one value, given twice differently
    assert tiny_cfg("policy.horizon=8").policy.horizon == 8  # the same value twice is fine
    d = tiny_cfg().to_dict()
    d["policy"]["horizon"] = 16  # an edited config with two values for H
    with pytest.raises(ConfigError, match=r"policy\.horizon=16 but data\.horizon=8"):
        RunConfig.from_dict(d)
    # a run saved before the two were one value trained with the data copy: that is what resume reads
    assert RunConfig.from_dict(upgrade_run_config_dict(d)).policy.horizon == 8


def test_unknown_override_suggests_a_nested_field():
    with pytest.raises(ConfigError, match=r"Did you mean 'policy\.net\.unet\.down_dims'"):
        tiny_cfg("policy.down_dims=[8,16]")
    with pytest.raises(ConfigError, match=r"Did you mean 'policy\.net\.unet\.kernel_size'"):
        tiny_cfg("policy.kernel_sise=3")
    with pytest.raises(ConfigError, match=r"Did you mean 'train\.steps'"):
        tiny_cfg("train.stpes=3")


def test_train_accepts_an_edited_print_config_file(store_path, tmp_path, capsys):
    from vlaflow.cli import main

    assert main(["train", "--preset", PRESET, "--print-config", *TINY]) == 0
    doc = json.loads(capsys.readouterr().out)
    doc["train"]["steps"] = 7
    doc["policy"]["net"]["unet"]["kernel_size"] = 3
    f = tmp_path / "run.json"
    f.write_text(json.dumps(doc, indent=1))
    out = tmp_path / "r"
    rc = main(
        ["train", "--config", str(f), "--data", str(store_path), "--out", str(out), "train.log_every=7"]
    )
    assert rc == 0
    assert "trained 7 steps" in capsys.readouterr().out
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["policy"]["net"]["unet"]["kernel_size"] == 3 and saved["train"]["log_every"] == 7
    f.write_text("{not json")
    assert main(["train", "--config", str(f), "--print-config"]) == 1
    assert f"--config {f}: not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ provenance
def test_provenance_is_recorded_and_resume_needs_no_data(store_path, tmp_path, capsys):
    from vlaflow.cli import main

    out = tmp_path / "r"
    assert main(["train", "--preset", PRESET, "--data", str(store_path), "--out", str(out), *TINY,
                 "train.steps=5"]) == 0  # fmt: skip
    runs = json.loads((out / "provenance.json").read_text())["invocations"]
    assert len(runs) == 1 and runs[0]["data"] == str(store_path.resolve())
    assert runs[0]["argv"] and runs[0]["versions"]["torch"] == torch.__version__ and "commit" in runs[0]
    state = json.loads((out / "checkpoints" / "last" / "train_state.json").read_text())
    assert len(state["data"]["fingerprint"]) == 16 and state["provenance"]["data"] == runs[0]["data"]
    # --resume without --data: the recorded store (and its fingerprint is checked)
    assert main(["train", "--out", str(out), "--resume", "train.steps=10"]) == 0
    assert "trained 10 steps" in capsys.readouterr().out
    runs = json.loads((out / "provenance.json").read_text())["invocations"]
    assert [r["resumed_from_step"] for r in runs] == [None, 5]


def test_resume_refuses_a_store_that_changed(store_path, tmp_path, capsys):
    from vlaflow.cli import main
    from vlaflow.data.store import EpisodeStore

    data = tmp_path / "copy.zarr"
    shutil.copytree(store_path, data)
    out = tmp_path / "r"
    assert main(["train", "--preset", PRESET, "--data", str(data), "--out", str(out), *TINY,
                 "train.steps=5"]) == 0  # fmt: skip
    st = EpisodeStore.open(data, mode="a")
    ep = st.get_episode(0)
    st.append_episode(ep, task="move", source="syn")
    st.close()
    assert main(["train", "--out", str(out), "--resume", "train.steps=10"]) == 1
    err = capsys.readouterr().err
    assert "the dataset changed since the run started" in err and str(data.resolve()) in err


# ------------------------------------------------------------------------------------ interruption
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_resumable_checkpoint(store_path, tmp_path, sig):
    """A real subprocess gets SIGINT (Ctrl-C) or SIGTERM mid-run: it saves checkpoints/last, exits 130,
    and resumes."""
    from vlaflow.train.trainer import train

    run = tmp_path / "r"
    args = ["--preset", PRESET, "--data", str(store_path), "--out", str(run), *TINY]
    cmd = [sys.executable, "-m", "vlaflow.cli", "train", *args, "train.steps=100000", "train.ckpt_every=0"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "log.csv"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:  # header + steps 5 and 10
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert not (run / "checkpoints" / "last").exists()  # ckpt_every=0: only the interrupt saves
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    state = json.loads((run / "checkpoints" / "last" / "train_state.json").read_text())
    assert 10 <= state["step"] < 100000
    assert f"checkpoint saved at step {state['step']}" in stdout and "--resume" in stdout
    res = train(tiny_cfg(f"train.steps={state['step'] + 5}", "train.ckpt_every=0"), None, run, resume=True)
    assert res.step == state["step"] + 5 and res.stopped == "done"


def test_resume_falls_back_to_the_newest_intact_step_and_cleans_temp_dirs(store_path, tmp_path, capsys):
    from vlaflow.train.trainer import train

    run = tmp_path / "r"
    train(tiny_cfg("train.steps=10"), store_path, run)
    ck = run / "checkpoints"
    (ck / "last" / "train_state.safetensors").write_bytes(b"\x00" * 100)  # damaged resume state
    # what a kill inside a save leaves behind
    for name in (".last.tmp-abc123", ".step_0000015.tmp-def456", ".best.old-1-aaaaaa"):
        (ck / name).mkdir()
        (ck / name / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    res = train(tiny_cfg("train.steps=15"), store_path, run, resume=True)
    printed = capsys.readouterr().out
    assert res.step == 15
    assert "resuming from step_0000010, not last" in printed and "fresh AdamW moments" in printed
    assert not [p.name for p in ck.iterdir() if p.name.startswith(".")]
    state = json.loads((ck / "last" / "train_state.json").read_text())
    assert state["step"] == 15 and (ck / "last" / "train_state.safetensors").is_file()
    # nothing intact at all: a clear error listing each checkpoint and why
    for p in ck.iterdir():
        (p / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(VlaflowError, match=r"nothing to resume.*last:.*step_0000015:"):
        train(tiny_cfg("train.steps=20"), store_path, run, resume=True)


# ------------------------------------------------------------------------------------ shareable
def test_checkpoints_are_shareable(store_path, tmp_path):
    import vlaflow
    from vlaflow.train.trainer import train

    def evaluate(policy, *, n_episodes, out_dir, video, ckpt):
        return {"score": 1.0, "success_rate": 1.0}

    old = os.umask(0o022)
    try:
        res = train(
            tiny_cfg("train.steps=10", "eval.task=pusht"), store_path, tmp_path / "r", evaluate=evaluate
        )
    finally:
        os.umask(old)
    ck = tmp_path / "r" / "checkpoints"
    for d in (ck / "last", ck / "best", ck / "step_0000005"):
        mode = stat.S_IMODE(d.stat().st_mode)
        assert mode & 0o055 == 0o055, f"{d} has mode {oct(mode)}: others cannot read it"
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f
    assert (ck / "last" / "train_state.safetensors").is_file()  # only last carries the resume state
    for d in (ck / "best", ck / "step_0000005", ck / "step_0000010"):
        assert not (d / "train_state.safetensors").exists(), d
        assert json.loads((d / "train_state.json").read_text())["resume_state"] is False
        chunk = vlaflow.load_policy(d).infer({"obs.state": np.zeros((2, 5), np.float32)}).actions
        assert chunk.shape == (8, 3) and np.isfinite(chunk).all()
    assert res.best_ckpt == ck / "best"


def test_a_run_saved_with_two_window_values_still_resumes(store_path, tmp_path, capsys):
    """Before To/H/Ta were one value, the data copy won: such a run resumes with that value."""
    from vlaflow.cli import main

    out = tmp_path / "r"
    assert main(["train", "--preset", PRESET, "--data", str(store_path), "--out", str(out), *TINY,
                 "train.steps=5"]) == 0  # fmt: skip
    for f in (out / "run_config.json", out / "checkpoints" / "last" / "train_state.json"):
        doc = json.loads(f.read_text())
        cfg = doc.get("run_config", doc)
        cfg["policy"]["horizon"] = 16  # what an old run recorded: the preset's policy copy, unused
        f.write_text(json.dumps(doc))
    assert main(["train", "--out", str(out), "--resume", "train.steps=8"]) == 0
    assert "trained 8 steps" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["policy"]["horizon"] == 8
