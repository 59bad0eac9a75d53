"""RL-100's offline policy-evaluation gate backed by the diffusion world model (``rl100.gate_model=wm``).

The adapter (:class:`vlaflow.world_models.gate.WorldModelDynamics`) on a tiny random world model: shapes of
``predict`` for a batch of (flat obs window, normalized chunk), reproducible under its seed with the noise
restarted, a spread over samples, refusals of another task / key / action dim. Then the gate of a real
RL-100 run (test_rl100's scripted PushT demo store, its BC policy and the run's own IQL critic) with a small
world model trained on that store: a policy against itself scores exactly equal (so it passes only with a
negative margin), a scrambled candidate is rejected and the trained policy accepted over it. 1 thread.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("gym_pusht")

from rl_fixtures import scramble_, tiny_pusht_policy  # noqa: E402
from test_rl100 import bc_policy, make_demo, tiny_args  # noqa: E402
from test_rl_refine import cli, env, tiny_policy  # noqa: E402

from vlaflow.errors import ConfigError, VlaflowError  # noqa: E402

torch.set_num_threads(1)


def small_wm_config(**kw):
    from vlaflow.policies.base_config import MLPConfig, NetConfig
    from vlaflow.world_models.config import PRESETS

    net = NetConfig(kind="mlp", mlp=MLPConfig(width=64, n_blocks=2, step_embed_dim=16))
    return PRESETS["pusht_lowdim"].replace(net=net, **kw)


def random_wm(tmp_path: Path, **kw) -> Path:
    """An untrained PushT-shaped world model (statistics of random states) saved as a checkpoint."""
    from vlaflow.world_models.checkpoint import save_world_model
    from vlaflow.world_models.data import fit_normalizer
    from vlaflow.world_models.model import DiffusionWorldModel

    cfg = small_wm_config(**kw)
    rng = np.random.default_rng(0)
    lo, hi = [20, 20, 100, 100, 0], [490, 490, 400, 400, 6.28]
    obs = rng.uniform(lo, hi, (200, cfg.n_obs_steps, cfg.obs_dim)).astype(np.float32)
    win = {
        "obs": obs,
        "act": rng.uniform(50, 450, (200, cfg.n_future, cfg.action_dim)).astype(np.float32),
        "next": obs[:, -1:] + rng.normal(0, 3, (200, cfg.n_future, cfg.obs_dim)).astype(np.float32),
    }
    torch.manual_seed(0)
    return save_world_model(tmp_path / "wm", DiffusionWorldModel(cfg, fit_normalizer(cfg, win)))


def test_wm_gate_model_predicts_sampled_next_windows_and_rewards_reproducibly(tmp_path):
    from vlaflow.world_models.gate import world_model_gate
    from vlaflow.world_models.reward import pusht_reward

    wm_dir = random_wm(tmp_path)
    pol = tiny_policy()  # obs.state, To = 2, H = 8, Ta = 4, Da = 2
    make = world_model_gate(str(wm_dir), task="pusht", n_samples=3, seed=7)
    dyn = make(pol)
    b, rng = 6, np.random.default_rng(1)
    st = rng.uniform([20, 20, 150, 150, 0], [490, 490, 350, 350, 6.28], (b, 2, 5)).astype(np.float32)
    s = torch.from_numpy(st.reshape(b, 10))  # (B, To x Do)
    a = torch.from_numpy(rng.uniform(-1, 1, (b, 16)).astype(np.float32))  # normalized (B, H x Da)
    nxt, r = dyn.predict(s, a)
    assert nxt.shape == (3, b, 10) and r.shape == (3, b) and len(dyn.models) == 3
    assert dyn(s, a).shape == (3, b, 11)  # standardized (s' - s, r) of the same samples
    assert dyn.model_rows == 3 * b * 4  # Ta / Tf = 4 calls, E x B rows each
    assert torch.isfinite(nxt).all() and (r >= 0).all() and (r <= 4).all()  # 4 steps of reward in [0, 1]
    assert (nxt.std(0) > 0).any()  # the samples differ: the disagreement signal
    # the reward is the task's coverage of the predicted states: recompute it from a Ta-step rollout
    dyn.reset_noise()
    win = torch.from_numpy(st).repeat(3, 1, 1)
    chunk = pol.unnormalize_action(a.view(b, 8, 2)[:, :4]).repeat(3, 1, 1)
    states = dyn.model.rollout(win, chunk, generator=dyn._gen)  # (E x B, Ta, Do)
    want = pusht_reward(states.reshape(-1, 5).numpy())[0].reshape(3 * b, 4).sum(1)
    np.testing.assert_allclose(r.reshape(-1).numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nxt.reshape(3 * b, 2, 5).numpy(), states[:, -2:].numpy(), rtol=1e-6)
    # same seed, noise restarted: identical; another seed: different samples
    dyn.reset_noise()
    again = dyn.predict(s, a)
    assert torch.equal(again[0], nxt) and torch.equal(again[1], r)
    other = make(pol, seed=8).predict(s, a)[0]
    assert not torch.allclose(other, nxt)


def keypoint_policy():
    """A PushT policy reading the keypoints and the agent position (our PushT presets' inputs), with the
    same action statistics as :func:`tiny_policy`."""
    from vlaflow.policies import DiffusionConfig, build_policy

    pol = tiny_policy()
    c = pol.config
    stats = {
        "action": pol.normalizer.stats["action"],
        "obs.keypoint": {"min": np.zeros((9, 2), np.float32), "max": np.full((9, 2), 512.0, np.float32)},
        "obs.agent_pos": {"min": np.zeros(2, np.float32), "max": np.full(2, 512.0, np.float32)},
    }
    for k in ("obs.keypoint", "obs.agent_pos"):
        v = stats[k]
        v["mean"], v["std"] = (v["min"] + v["max"]) / 2, (v["max"] - v["min"]) / 4
    shapes = {"obs.keypoint": (9, 2), "obs.agent_pos": (2,)}
    cfg = DiffusionConfig(obs_shapes=shapes, action_dim=2, horizon=c.horizon, n_action_steps=c.n_action_steps,
                          net=c.net, fps=c.fps)  # fmt: skip
    return build_policy(cfg, stats)


def test_wm_gate_judges_a_keypoint_policy_through_the_state_recovered_from_its_keypoints(tmp_path):
    """A policy reading PushT's keypoints + agent position (not the model's obs.state): its flat windows map
    to states by a rigid fit of the keypoints, the model steps the states, the predictions map back. The
    same states seen as keypoints give the same next windows (as keypoints) and the same rewards as seen as
    states, on the same model noise."""
    from vlaflow.sim.imagined import _pusht_derived, state_codec
    from vlaflow.world_models.gate import world_model_gate

    wm_dir = random_wm(tmp_path)
    make = world_model_gate(str(wm_dir), task="pusht", n_samples=2, seed=3, codec_for=state_codec)
    kp_pol, st_pol = keypoint_policy(), tiny_policy()
    b, rng = 5, np.random.default_rng(2)
    st = rng.uniform([20, 20, 150, 150, 0], [490, 490, 350, 350, 6.28], (b, 2, 5)).astype(np.float32)
    obs = _pusht_derived(st.reshape(-1, 5))
    s_kp = torch.cat(
        [torch.from_numpy(obs[k]).reshape(b, -1) for k in ("obs.keypoint", "obs.agent_pos")], 1
    )  # (B, To x 18 + To x 2): the policy's keys in order, each key's To steps together
    a = torch.from_numpy(rng.uniform(-1, 1, (b, 16)).astype(np.float32))
    dyn_kp, dyn_st = make(kp_pol), make(st_pol)
    assert dyn_kp.codec is not None and dyn_st.codec is None and dyn_kp.ds == 40
    nxt_kp, r_kp = dyn_kp.predict(s_kp, a)
    nxt_st, r_st = dyn_st.predict(torch.from_numpy(st.reshape(b, 10)), a)
    assert nxt_kp.shape == (2, b, 40) and dyn_kp(s_kp, a).shape == (2, b, 41)
    np.testing.assert_allclose(r_kp.numpy(), r_st.numpy(), rtol=1e-4, atol=1e-4)
    want = _pusht_derived(nxt_st.reshape(-1, 5).numpy())  # (E x B x To, ...)
    got_kp = nxt_kp[..., :36].reshape(-1, 9, 2).numpy()
    got_ag = nxt_kp[..., 36:].reshape(-1, 2).numpy()
    np.testing.assert_allclose(got_kp, want["obs.keypoint"], atol=2e-2)
    np.testing.assert_allclose(got_ag, want["obs.agent_pos"], atol=1e-4)
    # a key the state cannot be recovered from, or a derived key of another shape: refused by name
    with pytest.raises(VlaflowError, match=r"judges policies reading 'obs.state' alone or all of the keys"):
        make(tiny_pusht_policy(obs_key="obs.keypoint", shape=(9, 2)))
    with pytest.raises(VlaflowError, match=r"reads 'obs.keypoint' \(18,\); computed from the state it is"):
        make(tiny_pusht_policy(obs_key="obs.keypoint", shape=(18,)))


def unit_stats(dims: dict[str, int]) -> dict:
    out = {}
    for k, d in dims.items():
        lo, hi = np.zeros(d, np.float32), np.ones(d, np.float32)
        out[k] = {"min": lo, "max": hi, "mean": (lo + hi) / 2, "std": (hi - lo) / 4}
    return out


def test_wm_gate_model_refuses_another_task_key_or_action_dim_naming_what_it_has(tmp_path):
    from vlaflow.policies import DiffusionConfig, NetConfig, UNetConfig, build_policy
    from vlaflow.world_models.gate import world_model_gate

    net = NetConfig(
        kind="unet", unet=UNetConfig(down_dims=(8, 16), kernel_size=3, n_groups=4, step_embed_dim=8)
    )
    wm_dir = random_wm(tmp_path)
    pol = tiny_policy()
    with pytest.raises(VlaflowError, match="was trained on task 'pusht', not 'toy'"):
        world_model_gate(str(wm_dir), task="toy")
    keypoint = build_policy(
        DiffusionConfig(
            obs_shapes={"obs.keypoint": (18,)}, action_dim=2, horizon=8, n_action_steps=4, net=net
        ),
        unit_stats({"obs.keypoint": 18, "action": 2}),
    )
    make = world_model_gate(str(wm_dir), task="pusht")
    with pytest.raises(VlaflowError, match=r"reads \('obs.keypoint',\); the world model .* predicts only"):
        make(keypoint)
    state3 = build_policy(
        DiffusionConfig(obs_shapes={"obs.state": (5,)}, action_dim=3, horizon=8, n_action_steps=4, net=net),
        unit_stats({"obs.state": 5, "action": 3}),
    )
    with pytest.raises(VlaflowError, match="has 'obs.state' \\(5,\\) and action dim 2; the policy has"):
        make(state3)
    with pytest.raises(VlaflowError, match="predicts 3 steps per call; the policy executes Ta=4"):
        world_model_gate(str(random_wm(tmp_path / "tf3", n_future=3)), task="pusht")(pol)
    assert make(pol).n_samples == 5


# ------------------------------------------------------------------------ the gate of an RL-100 run
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "demo.zarr")


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory) -> Path:
    return bc_policy(demo, tmp_path_factory.mktemp("pol") / "bc")


@pytest.fixture(scope="module")
def demo_wm(demo, tmp_path_factory) -> Path:
    """A small world model trained on the demo store's PushT transitions (a few CPU seconds)."""
    from vlaflow.world_models.checkpoint import save_world_model
    from vlaflow.world_models.data import episodes_from_store, train_world_model, transition_windows

    cfg = small_wm_config()
    win = transition_windows(episodes_from_store(demo, "obs.state", "action"), 2, 1)
    wm, _ = train_world_model(cfg, win, steps=400, batch_size=128, lr=2e-3, max_seconds=20)
    return save_world_model(tmp_path_factory.mktemp("wm") / "wm", wm)


def test_rl100_gate_with_the_world_model_rejects_a_corrupted_policy_and_ties_a_policy_with_itself(
    trained, demo, demo_wm, tmp_path
):
    from vlaflow.policies import load_checkpoint, save_checkpoint
    from vlaflow.sim.rollout import stored_step_rewards
    from vlaflow.train.refine import RefineConfig, apply_overrides
    from vlaflow.train.rl100 import RL100Run
    from vlaflow.world_models.gate import world_model_gate

    over = {
        "rl100.gate_model": "wm",
        "rl100.critic_steps": 150,
        "rl100.gate_models": 3,
        "rl100.gate_starts": 32,
        "rl100.gate_margin": -1e-6,
    }
    cfg = apply_overrides(RefineConfig(algo="rl100", world_model=str(demo_wm)), tiny_args(**over))
    with pytest.raises(ConfigError, match="needs the world model's gate model"):
        RL100Run(
            cfg, str(trained), str(demo), tmp_path / "x", venv=None, reward_fn=lambda ep, ok: None,
            record_keys={"obs.state"},
        )  # fmt: skip
    run = RL100Run(
        cfg, str(trained), str(demo), tmp_path / "run", venv=None,
        reward_fn=lambda ep, ok: stored_step_rewards("pusht", ep, ok), record_keys={"obs.state"},
        gate_dynamics=world_model_gate(str(demo_wm), task="pusht", n_samples=3, seed=cfg.seed),
    )  # fmt: skip
    run._critic(0)
    same = run.gate_estimates(0, str(trained), str(trained))
    assert same["gate_model"] == "wm" and np.isfinite(same["dynamics_loss"])
    assert same["candidate"] == same["current"], same  # the same noise for both: an exact tie
    # margin -1e-6 <= 0: an unchanged policy passes a negative margin, and (strict >) not a zero one
    assert same["accept"] and not same["candidate"] > same["current"] + 0.0
    bad = scramble_(load_checkpoint(trained))  # shuffled entries plus noise of the weights' own scale
    corrupted = str(save_checkpoint(tmp_path / "corrupted", bad))
    rejected = run.gate_estimates(0, corrupted, str(trained))
    assert not rejected["accept"] and rejected["candidate"] < rejected["current"], rejected
    accepted = run.gate_estimates(0, str(trained), corrupted)
    assert accepted["accept"] and accepted["candidate"] > accepted["current"], accepted
    assert accepted["candidate"] == pytest.approx(rejected["current"])  # one estimate per policy
    assert accepted["current"] == pytest.approx(rejected["candidate"])


def test_refine_rl100_gates_with_the_world_model_end_to_end_and_records_it(trained, demo, demo_wm, tmp_path):
    import json

    out = tmp_path / "run"
    args = ["refine", "--algo", "rl100", "--policy", str(trained), "--data", str(demo), "--out", str(out)]
    args += ["--world-model", str(demo_wm)]
    res = subprocess.run(
        cli(*args, *tiny_args(**{"rl100.gate_model": "wm"})), env=env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((out / "run_config.json").read_text())
    assert rec["refine"]["rl100"]["gate_model"] == "wm" and rec["refine"]["world_model"] == str(demo_wm)
    (row,) = [json.loads(line) for line in (out / "rl100_log.jsonl").read_text().splitlines()]
    assert row["gate_model"] == "wm" and np.isfinite(row["dynamics_loss"])
    assert np.isfinite(row["gate_candidate"]) and np.isfinite(row["gate_current"])
    assert json.loads((out / "rl100_state.json").read_text())["stage"] == "done"


def test_refine_rl100_with_a_world_model_of_another_task_is_refused_before_any_work(trained, demo, tmp_path):
    wm_dir = random_wm(tmp_path)
    meta = wm_dir / "config.json"  # the same model recorded as trained on another task
    meta.write_text(meta.read_text().replace('"task": "pusht"', '"task": "toy"'))
    out = tmp_path / "run"
    base = ["refine", "--algo", "rl100", "--policy", str(trained), "--data", str(demo), "--out", str(out)]
    res = subprocess.run(
        cli(*base, *tiny_args(**{"rl100.gate_model": "wm"})), env=env(), capture_output=True, text=True
    )
    assert res.returncode != 0 and "rl100.gate_model=wm needs world_model=WM_CKPT" in res.stderr, res.stderr
    res = subprocess.run(
        cli(*base, "--world-model", str(wm_dir), *tiny_args(**{"rl100.gate_model": "wm"})),
        env=env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0, res.stdout[-2000:]
    assert f"world model {wm_dir} was trained on task 'toy', not 'pusht'" in res.stderr, res.stderr[-2000:]
    assert not (out / "store.zarr").exists()  # refused before the store copy
