"""RL-100's offline loop (issue 13): recorded PushT rollouts, the gate on a real policy, one full iteration
of `vlaflow refine --algo rl100` on a copy of a demo store, and --resume after a real SIGKILL.

Fixture: a demo store of scripted PushT episodes recorded through the vectorized env (record=True), and a
tiny diffusion policy (U-Net 8/16, H=8, Ta=4) behaviour-cloned on it for a few hundred steps. 1 thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("gym_pusht")

from rl_fixtures import scramble_  # noqa: E402
from test_rl_refine import cli, env, tiny_policy  # noqa: E402

torch.set_num_threads(1)
MAX_STEPS = 40  # step cap of the scripted demos and of the collection
N_DEMO = 6  # episodes per scripted demonstrator


def near_goal_states(n: int, rng) -> np.ndarray:
    """PushT states with the block almost on the goal (coverage ~0.8-0.95) and the agent 150 px away."""
    ang = rng.uniform(0, 2 * np.pi, n)
    block = np.stack(
        [256 + rng.uniform(-8, 8, n), 256 + rng.uniform(-8, 8, n), np.pi / 4 + rng.uniform(-0.08, 0.08, n)], 1
    )
    agent = block[:, :2] + 150 * np.stack([np.cos(ang), np.sin(ang)], 1)
    return np.concatenate([np.clip(agent, 20, 492), block], 1)


def hold_chunks(obs: dict, rng) -> np.ndarray:
    """The good demonstrator: hold the agent where it is (the block stays on the goal)."""
    agent = obs["obs.state"][:, -1, :2]
    return np.repeat(agent[:, None], 4, 1) + rng.normal(0, 2, (len(agent), 4, 2))


def push_chunks(obs: dict, rng) -> np.ndarray:
    """The bad demonstrator: drive the agent through the block (knocking it off the goal)."""
    st = obs["obs.state"][:, -1]
    agent, block = st[:, :2], st[:, 2:4]
    aim = block + 0.5 * (block - agent) + rng.normal(0, 20, agent.shape)
    frac = np.linspace(0.2, 0.8, 4)[None, :, None]
    return np.clip(agent[:, None] + frac * (aim - agent)[:, None], 0, 512)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "demo.zarr")


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory) -> Path:
    return bc_policy(demo, tmp_path_factory.mktemp("pol") / "bc")


def make_demo(path: Path) -> Path:
    """6 scripted episodes from near-goal states (3 holding still, 3 knocking the block away), recorded by
    SubprocChunkEnv(record=True) and written as a demo store."""
    from vlaflow.data.store import EpisodeStore, KeySpec
    from vlaflow.sim.rollout import SubprocChunkEnv

    rng = np.random.default_rng(0)
    eps = []
    with SubprocChunkEnv(
        "pusht", N_DEMO, ["obs.state"], 2, workers=1, max_steps=MAX_STEPS, record=True
    ) as venv:
        for r, demonstrator in enumerate((hold_chunks, push_chunks)):
            starts = near_goal_states(N_DEMO, rng)
            obs = venv.reset([10 + N_DEMO * r + j for j in range(N_DEMO)], starts)
            first = obs["obs.state"][:, -1].copy()
            np.testing.assert_allclose(first, starts, atol=1e-3)
            rewards = []
            for _ in range(MAX_STEPS // 4):
                obs, rew, done, _ = venv.step(demonstrator(obs, rng))
                rewards.append(rew)
            got = venv.take_episodes()
            assert len(got) == N_DEMO and all(len(e["action"]) == MAX_STEPS for e in got)
            for j, e in enumerate(got):  # obs[t] is what action[t] was chosen from; rewards as stepped
                assert np.array_equal(e["obs"]["obs.state"][0], first[j])
                assert set(e["obs"]) == {"obs.state", "obs.keypoint", "obs.agent_pos", "obs.n_contacts"}
                per_chunk = e["reward"].reshape(-1, 4).sum(1)
                np.testing.assert_allclose(per_chunk, [float(x[j]) for x in rewards], rtol=1e-5)
            eps += got
    keys = {k: KeySpec("float32", v.shape[1:]) for k, v in eps[0]["obs"].items()}
    st = EpisodeStore.create(path, keys={**keys, "action": KeySpec("float32", (2,))}, fps=10)
    for e in eps:
        st.append_episode({**e["obs"], "action": e["action"]}, task="push", source="scripted", success=None)
    assert sum(e["reward"].sum() for e in eps[:N_DEMO]) > 1.5 * sum(e["reward"].sum() for e in eps[N_DEMO:])
    st.close()
    return path


def bc_policy(demo: Path, dest: Path, steps: int = 300) -> Path:
    """The tiny policy behaviour-cloned on the demo store's holding episodes (``steps`` Adam steps)."""
    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler
    from vlaflow.policies import save_checkpoint
    from vlaflow.train.objectives.bc import make_batch

    pol = tiny_policy()
    store = EpisodeStore.open(demo)
    ws = WindowSampler(store, ["obs.state"], 2, 8, episodes=list(range(N_DEMO)))
    opt = torch.optim.Adam(pol.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        loss, _ = pol.compute_loss(make_batch(ws, rng.integers(0, len(ws), 64)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    store.close()
    return save_checkpoint(dest, pol.eval())


def tiny_args(**over) -> list[str]:
    vals = {
        "rl100.iterations": 1, "rl100.critic_steps": 40, "rl100.critic_width": 32, "rl100.ppo_rounds": 2,
        "rl100.ppo_windows": 16, "rl100.update_epochs": 1, "rl100.n_minibatches": 2, "rl100.gate_steps": 40,
        "rl100.gate_models": 2, "rl100.gate_width": 32, "rl100.gate_starts": 16, "rl100.n_envs": 2,
        "rl100.collect_episodes": 2, "rl100.max_steps": MAX_STEPS, "rl100.bc_steps": 4, "rl100.bc_batch": 16,
        "rl100.reward": "task", "eval_episodes": 0, "final_episodes": 0, "env_workers": 1,
        "progress": "false",
    }  # fmt: skip
    vals.update(over)
    return [f"{k}={v}" for k, v in vals.items()]


# ---------------------------------------------------------------------------------------------- the gate
def test_the_gate_rejects_a_corrupted_policy_and_accepts_the_unchanged_one_over_it(trained, demo, tmp_path):
    """Dynamics ensemble + IQL value fit on the demo store's chunk transitions (the run's own critic stage):
    the trained policy with its weights scrambled is rejected against the trained one, and the trained one
    is accepted against the scrambled one."""
    from vlaflow.policies import load_checkpoint, save_checkpoint
    from vlaflow.sim.rollout import stored_step_rewards
    from vlaflow.train.refine import RefineConfig, apply_overrides
    from vlaflow.train.rl100 import RL100Run

    over = {
        "rl100.gate_steps": 300,
        "rl100.critic_steps": 150,
        "rl100.gate_models": 4,
        "rl100.gate_starts": 64,
    }
    cfg = apply_overrides(RefineConfig(algo="rl100"), tiny_args(**over))
    run = RL100Run(
        cfg, str(trained), str(demo), tmp_path / "run", venv=None,
        reward_fn=lambda ep, ok: stored_step_rewards("pusht", ep, ok), record_keys={"obs.state"},
    )  # fmt: skip
    run._critic(0)
    bad = scramble_(load_checkpoint(trained))  # shuffled entries plus noise of the weights' own scale
    corrupted = str(save_checkpoint(tmp_path / "corrupted", bad))
    rejected = run.gate_estimates(0, corrupted, str(trained))
    assert not rejected["accept"] and rejected["candidate"] < rejected["current"], rejected
    accepted = run.gate_estimates(0, str(trained), corrupted)
    assert accepted["accept"] and accepted["candidate"] > accepted["current"], accepted
    assert accepted["candidate"] == pytest.approx(rejected["current"])  # one estimate per policy


# ------------------------------------------------------------------------------------------- end to end
def test_one_rl100_iteration_end_to_end_writes_a_store_copy_with_marked_policy_episodes(
    trained, demo, tmp_path
):
    from vlaflow.data.store import EpisodeStore
    from vlaflow.policies import load_checkpoint

    before = sorted((p.relative_to(demo), p.stat().st_mtime_ns) for p in demo.rglob("*") if p.is_file())
    run = tmp_path / "run"
    args = ["refine", "--algo", "rl100", "--policy", str(trained), "--data", str(demo), "--out", str(run)]
    out = subprocess.run(cli(*args, *tiny_args()), env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("{") :])
    assert summary["iterations"] == 1 and summary["env_steps"] == 2 * MAX_STEPS
    # the user's store is untouched; the run's copy holds the demos + the policy's episodes, marked
    after = sorted((p.relative_to(demo), p.stat().st_mtime_ns) for p in demo.rglob("*") if p.is_file())
    assert after == before
    st = EpisodeStore.open(run / "store.zarr")
    metas = [st.episode_meta(i) for i in range(st.n_episodes)]
    assert [m["source"] for m in metas] == ["scripted"] * 2 * N_DEMO + ["policy:rl100:iter0"] * 2
    assert all(m["success"] is None for m in metas[:-2]) and all(
        isinstance(m["success"], bool) for m in metas[-2:]
    )
    assert "reward" in st.keys and st.get_episode(st.n_episodes - 1)["obs.state"].shape == (MAX_STEPS, 5)
    st.close()
    state = json.loads((run / "rl100_state.json").read_text())
    assert state["stage"] == "done" and state["iteration"] == 1
    rows = [json.loads(x) for x in (run / "rl100_log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and isinstance(rows[0]["accepted"], bool)
    assert np.isfinite([rows[0]["gate_candidate"], rows[0]["gate_current"]]).all()
    assert rows[0]["collected"]["episodes"] == 2
    assert all(20_000 <= s < 100_000 for s in rows[0]["collected"]["seeds"])  # training seeds only
    assert type(load_checkpoint(run / "final")).__name__ == "DiffusionPolicy"  # a normal checkpoint
    # refusals, before any work: an existing --out without --resume; a deterministic chain, naming the
    # stochastic options (the CLI calls this preflight before it starts a sim process)
    from vlaflow.errors import VlaflowError
    from vlaflow.train.refine import RefineConfig, apply_overrides
    from vlaflow.train.rl100 import preflight

    cfg = apply_overrides(RefineConfig(algo="rl100"), tiny_args())
    pol = load_checkpoint(trained)
    with pytest.raises(VlaflowError, match="pass --resume"):
        preflight(cfg, pol, run, str(demo), resume=False)
    det = apply_overrides(cfg, ["rl100.chain.eta=0", "rl100.chain.min_std=0"])
    with pytest.raises(VlaflowError, match=r"deterministic.*sampler=ddpm"):
        preflight(det, pol, tmp_path / "det", str(demo), resume=False)
    with pytest.raises(VlaflowError, match="nothing to resume"):
        preflight(cfg, pol, tmp_path / "det", str(demo), resume=True)
    assert not (tmp_path / "det").exists()


def test_rl100_resume_after_sigkill_continues_at_the_saved_stage(trained, demo, tmp_path):
    run = tmp_path / "run"
    over = {"rl100.ppo_rounds": 6}
    args = ["refine", "--algo", "rl100", "--policy", str(trained), "--data", str(demo), "--out", str(run)]
    proc = subprocess.Popen(
        cli(*args, *tiny_args(**over)), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    state_file, ppo_last = run / "rl100_state.json", run / "iter_000" / "ppo" / "checkpoints" / "last"
    killed, deadline = None, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            st = json.loads(state_file.read_text())
        except (OSError, ValueError):
            st = {}
        if st.get("stage") in ("gate", "collect", "bc") or (st.get("stage") == "ppo" and ppo_last.exists()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = st
            break
        time.sleep(0.02)
    if killed is None:
        proc.kill()
        pytest.fail(f"the run ended (rc {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}")
    assert proc.returncode == -signal.SIGKILL and killed["iteration"] == 0
    critic = run / "iter_000" / "critic" / "checkpoints" / "last" / "train_state.safetensors"
    critic_mtime = critic.stat().st_mtime_ns
    out = subprocess.run(
        cli("refine", "--out", str(run), "--resume"), env=env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert critic.stat().st_mtime_ns == critic_mtime  # the finished critic stage was not run again
    if killed["stage"] == "ppo":  # killed inside the PPO stage: its loop continued from its checkpoint
        runs = json.loads((run / "iter_000" / "ppo" / "provenance.json").read_text())["invocations"]
        assert runs[0]["resumed_from_step"] is None and runs[-1]["resumed_from_step"] >= 2
    state = json.loads(state_file.read_text())
    assert state["stage"] == "done" and state["iteration"] == 1
    rows = [json.loads(x) for x in (run / "rl100_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0]  # the iteration logged once
    from vlaflow.data.store import EpisodeStore

    st = EpisodeStore.open(run / "store.zarr")
    sources = [st.episode_meta(i)["source"] for i in range(st.n_episodes)]
    st.close()
    assert sources == ["scripted"] * 2 * N_DEMO + ["policy:rl100:iter0"] * 2  # collected once
