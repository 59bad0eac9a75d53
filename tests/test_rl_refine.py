"""RL refinement end to end (issue 13): vectorized PushT rollouts in worker processes, DPPO on the one
training loop (ratio 1 at the first update, NaN stop keeping the last good checkpoint), `vlaflow refine`
with a real SIGKILL and --resume, refusals (task without reward, deterministic sampler), DSRL on a toy.

A tiny untrained diffusion policy on PushT's obs.state (U-Net 8/16, H=8, Ta=4), 1 torch thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("gym_pusht")

from rl_fixtures import tiny_pusht_policy  # noqa: E402

from vlaflow.errors import VlaflowError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def tiny_policy(family: str = "diffusion"):
    return tiny_pusht_policy(family)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from vlaflow.policies import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("pol") / "tiny", tiny_policy())


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return e


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlaflow.cli", *args]


# ----------------------------------------------------------------------------------------------- rollouts
def test_vectorized_envs_sum_the_task_reward_over_each_chunk_like_a_plain_env():
    from vlaflow.rl.rollout import EVAL_SEEDS, TRAIN_SEEDS, train_seeds
    from vlaflow.sim.rollout import SubprocChunkEnv
    from vlaflow.sim.tasks import make_env

    seeds = train_seeds(3, 3, offset=99_995)
    assert seeds == [4, 5, 6] and all(TRAIN_SEEDS[0] <= s < TRAIN_SEEDS[1] < EVAL_SEEDS[0] + 1 for s in seeds)
    rng = np.random.default_rng(0)
    chunks = rng.uniform(100, 400, size=(5, 3, 4, 2))  # 5 decisions, 3 envs, Ta = 4
    with SubprocChunkEnv("pusht", 3, ["obs.state"], 2, workers=2) as venv:
        obs = venv.reset(seeds)
        assert obs["obs.state"].shape == (3, 2, 5)
        assert np.array_equal(obs["obs.state"][:, 0], obs["obs.state"][:, 1])  # padded with the first obs
        got = [venv.step(c) for c in chunks]
        assert venv.env_steps == 5 * 3 * 4
    ref = make_env("pusht")
    for j, seed in enumerate(seeds):
        ref.reset(seed=seed)
        for d in range(5):
            total = sum(ref.step(a)[1] for a in chunks[d, j])
            assert got[d][1][j] == pytest.approx(total, abs=1e-9)
        assert np.allclose(got[-1][0]["obs.state"][j, -1], ref.get_state().astype(np.float32))
    ref.close()


def test_a_task_without_reward_is_refused_listing_those_with_one():
    from vlaflow.sim.rollout import SubprocChunkEnv

    with pytest.raises(VlaflowError, match=r"'lift' has no reward/success signal.*pusht \(clip.*pick_place"):
        SubprocChunkEnv("lift", 2, ["obs.state"], 2)


def test_collect_batches_inference_across_envs_and_records_the_chain():
    from vlaflow.rl.chain import ChainConfig, resolve_chain
    from vlaflow.rl.rollout import collect
    from vlaflow.sim.rollout import SubprocChunkEnv

    pol = tiny_policy().eval()
    calls = []
    real = pol.encode
    pol.encode = lambda ob: calls.append(len(ob["obs.state"])) or real(ob)
    chain = resolve_chain(pol, ChainConfig(finetune_last=4))
    with SubprocChunkEnv("pusht", 4, ["obs.state"], 2, workers=2) as venv:
        b = collect(pol, pol, chain, venv, [0, 1, 2, 3], 3, 4, torch.Generator().manual_seed(0))
    assert calls == [4, 4, 4]  # one batched encode of all 4 envs per decision
    assert b["x_t"].shape == (3, 4, 4, 8, 2) and b["logp"].shape == (3, 4, 4)
    assert b["obs.state"].shape == (3, 4, 2, 5) and torch.isfinite(b["logp"]).all()
    assert b["reward"].shape == (3, 4) and (b["reward"] >= 0).all() and b["alive"][0].all()


# ---------------------------------------------------------------------------------------- DPPO on the loop
def _dppo_run(out, venv, steps_iters=2, resume=False, family="diffusion", chain=None, bc_batch=None, **over):
    import dataclasses

    from vlaflow.rl.chain import ChainConfig
    from vlaflow.train.loop import LoopConfig, RunMeta, TrainingLoop
    from vlaflow.train.objectives.dppo import DPPO, DPPOConfig

    chain = chain or ChainConfig(finetune_last=3)
    cfg = DPPOConfig(n_envs=2, n_decisions=3, update_epochs=1, n_minibatches=2, chain=chain)
    cfg = dataclasses.replace(cfg, **over)
    lc = LoopConfig(steps=steps_iters * cfg.steps_per_iteration, lr=1e-4, schedule="constant", grad_clip=1.0)
    lc = dataclasses.replace(
        lc, log_every=1, ckpt_every=cfg.steps_per_iteration, num_threads=1, progress=False
    )
    loop = TrainingLoop(dataclasses.replace(lc, device="cpu"), out, resume=resume)
    obj = DPPO(tiny_policy(family), venv, cfg, seed=0, bc_batch=bc_batch)
    return loop.run(obj, meta=RunMeta(config={"dppo": dataclasses.asdict(cfg)})), obj


def test_dppo_first_update_has_ratio_one_and_nan_stops_keeping_the_last_checkpoint(tmp_path):
    import csv

    from vlaflow.policies import load_checkpoint
    from vlaflow.sim.rollout import SubprocChunkEnv
    from vlaflow.train.objectives.dppo import NonFiniteRL, ValueNet

    with SubprocChunkEnv("pusht", 2, ["obs.state"], 2, workers=1) as venv:
        res, obj = _dppo_run(tmp_path / "ok", venv)
        assert res.step == 4 and obj.iteration == 1 and obj.env_steps == 2 * 2 * 3 * 4
        rows = list(csv.DictReader(open(tmp_path / "ok" / "log.csv")))
        first = rows[0]
        assert abs(float(first["ratio"]) - 1) < 1e-5 and abs(float(first["approx_kl"])) < 1e-8
        assert float(first["clipfrac"]) == 0.0
        pol = load_checkpoint(res.last_ckpt)  # the deployed actor is a plain policy checkpoint
        assert type(pol).__name__ == "DiffusionPolicy"

        # values turn NaN after the first iteration: the second rollout's advantages are NaN
        orig = ValueNet.forward
        calls = {"n": 0}

        def poisoned(self, cond):
            calls["n"] += 1
            v = orig(self, cond)
            return v * float("nan") if calls["n"] > 6 else v  # 4 calls per rollout, 2 updates

        ValueNet.forward = poisoned
        try:
            with pytest.raises(NonFiniteRL, match=r"advantages of rollout iteration 1 hold NaN.*last good"):
                _dppo_run(tmp_path / "nan", venv)
        finally:
            ValueNet.forward = orig
        state = json.loads((tmp_path / "nan" / "checkpoints" / "last" / "train_state.json").read_text())
        assert state["step"] == 2  # the checkpoint of the first (good) iteration is kept
        w = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last").state_dict()
        assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_dppo_refines_a_flow_policy_with_a_learned_noise_scale(tmp_path):
    """ReinFlow on the same objective: Euler + injected noise, its per-dim scale trained with the actor."""
    import csv

    from vlaflow.rl.chain import ChainConfig
    from vlaflow.sim.rollout import SubprocChunkEnv

    chain = ChainConfig(noise_std=0.2, learn_noise_std=True, finetune_last=4)
    with SubprocChunkEnv("pusht", 2, ["obs.state"], 2, workers=1) as venv:
        res, obj = _dppo_run(tmp_path / "flow", venv, family="flow", chain=chain)
    assert res.step == 4 and obj.chain.flow and obj.chain.finetune_last == 4
    log_std = obj.module["noise"].log_std.detach()
    assert not torch.allclose(log_std, torch.full_like(log_std, float(np.log(0.2))))  # it was trained
    first = next(csv.DictReader(open(tmp_path / "flow" / "log.csv")))
    assert abs(float(first["ratio"]) - 1) < 1e-5
    from vlaflow.policies import load_checkpoint

    assert type(load_checkpoint(res.last_ckpt)).__name__ == "FlowPolicy"


def test_dppo_with_the_behaviour_cloning_regularizer_on_demo_windows(tmp_path):
    import csv

    from vlaflow.cli.refine import _bc_source
    from vlaflow.data.store import EpisodeStore, KeySpec
    from vlaflow.errors import ConfigError
    from vlaflow.sim.rollout import SubprocChunkEnv
    from vlaflow.train.refine import RefineConfig, apply_overrides

    st = EpisodeStore.create(
        tmp_path / "demo.zarr",
        keys={"action": KeySpec("float32", (2,)), "obs.state": KeySpec("float32", (5,))},
        fps=10,
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        s = rng.uniform(50, 450, (30, 5)).astype(np.float32)
        st.append_episode(
            {"action": s[:, :2].copy(), "obs.state": s}, task="push", source="syn", success=True
        )
    cfg = apply_overrides(RefineConfig(), ["dppo.bc_coef=0.5", "dppo.n_minibatches=2"])
    bc = _bc_source(tiny_policy(), str(tmp_path / "demo.zarr"), cfg)
    assert bc(0)["action"].shape == (128, 8, 2)
    with pytest.raises(ConfigError, match="needs --data"):
        _bc_source(tiny_policy(), "", cfg)
    with SubprocChunkEnv("pusht", 2, ["obs.state"], 2, workers=1) as venv:
        res, _ = _dppo_run(tmp_path / "bc", venv, steps_iters=1, bc_batch=bc, bc_coef=0.5)
    rows = list(csv.DictReader(open(tmp_path / "bc" / "log.csv")))
    assert res.step == 2 and all(float(r["bc_loss"]) > 0 for r in rows if r["kind"] == "train")


# ------------------------------------------------------------------------------------------ vlaflow refine
TINY_RUN = [
    "iterations=4",
    "dppo.n_envs=2",
    "dppo.n_decisions=4",
    "dppo.update_epochs=1",
    "dppo.n_minibatches=2",
    "dppo.chain.finetune_last=5",
    "eval_every=2",
    "eval_episodes=1",
    "final_episodes=2",
    "eval_workers=1",
    "env_workers=1",
    "progress=false",
]


def test_refine_cli_resumes_after_sigkill_and_its_result_loads_in_eval(ckpt, tmp_path):
    run = tmp_path / "run"
    args = [
        "refine",
        "--policy",
        str(ckpt),
        "--task",
        "pusht",
        "--algo",
        "dppo",
        "--out",
        str(run),
        *TINY_RUN,
    ]
    proc = subprocess.Popen(cli(*args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = run / "checkpoints" / "last" / "train_state.json"
    killed_at, deadline = None, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state_file.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 2:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = step
            break
        time.sleep(0.05)
    if killed_at is None:
        proc.kill()
        pytest.fail(f"the run ended (rc {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}")
    assert proc.returncode == -signal.SIGKILL
    saved = json.loads(state_file.read_text())["step"]
    assert 2 <= saved < 8
    out = subprocess.run(
        cli("refine", "--out", str(run), "--resume"), env=env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("{") :])
    assert summary["steps"] == 8 and summary["stopped"] == "done"
    runs = json.loads((run / "provenance.json").read_text())["invocations"]
    assert [r["resumed_from_step"] for r in runs] == [None, saved]  # continued, not restarted
    assert summary["final"]["success_rate"] is not None
    steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
    train_steps = [
        s
        for s, r in zip(steps, (run / "log.csv").read_text().splitlines()[1:], strict=True)
        if ",train," in r
    ]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 8
    last = json.loads(state_file.read_text())
    assert last["step"] == 8 and (run / "rl_curves.png").stat().st_size > 1000
    assert [e["step"] for e in last["evals"]][-1] == 8 and (run / "checkpoints" / "best").is_dir()
    # the result is a normal checkpoint: `vlaflow eval` loads and runs it
    ev = subprocess.run(
        cli(
            "eval",
            "--task",
            "pusht",
            "--policy",
            str(run / "checkpoints" / "best"),
            "--episodes",
            "1",
            "--workers",
            "0",
            "--max-steps",
            "20",
            "--out",
            str(tmp_path / "ev"),
            "--quiet",
        ),
        env=env(),
        capture_output=True,
        text=True,
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["aggregate"]["n_episodes"] == 1


def test_refine_refuses_a_task_without_reward_and_a_deterministic_chain(ckpt, tmp_path):
    out = subprocess.run(
        cli("refine", "--policy", str(ckpt), "--task", "lift", "--out", str(tmp_path / "a")),
        env=env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "has no reward/success signal" in out.stderr and "pusht" in out.stderr
    out = subprocess.run(
        cli(
            "refine",
            "--policy",
            str(ckpt),
            "--out",
            str(tmp_path / "b"),
            "dppo.chain.eta=0",
            "dppo.chain.min_std=0",
            "iterations=1",
            "env_workers=1",
        ),
        env=env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "deterministic" in out.stderr and "sampler=ddpm" in out.stderr, out.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()
    out = subprocess.run(
        cli("refine", "--policy", str(ckpt), "--out", str(tmp_path / "c"), "dppo.clp=0.1"),
        env=env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "did you mean 'clip'" in out.stderr


# ------------------------------------------------------------------------------------------------- DSRL
def test_dsrl_sac_actor_finds_the_known_best_noise_region():
    """A frozen 'denoiser' maps noise w to an action; reward is 1 inside a small box around w* (and a weak
    shaping term outside). From zero-mean noise, SAC's actor moves its deterministic noise into the box."""
    import copy

    from vlaflow.rl.dsrl import SAC, ReplayBuffer, polyak

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    w_star = torch.tensor([0.9, -0.7])
    frozen = torch.nn.Linear(2, 2)  # the frozen denoiser: fixed, invertible map noise -> action
    with torch.no_grad():
        frozen.weight.copy_(torch.tensor([[1.0, 0.3], [-0.2, 0.8]]))
        frozen.bias.zero_()
    a_star = frozen(w_star).detach()

    def reward(w):
        a = frozen(w).detach()
        d = (a - a_star).abs().max(-1).values
        return (d < 0.2).float() - 0.1 * (a - a_star).norm(dim=-1)

    sac = SAC(obs_dim=3, noise_dim=2, bound=1.5, width=64, init_alpha=0.05)
    target = copy.deepcopy(sac.q).requires_grad_(False)
    opt = torch.optim.Adam(sac.parameters(), lr=3e-3)
    buf = ReplayBuffer(20000)
    obs = lambda n: torch.randn(n, 3, generator=g)  # noqa: E731  (observations the reward ignores)
    w0 = sac.actor(obs(64), deterministic=True)[0].detach()
    assert float(w0.abs().max()) == 0.0  # starts at plain sampling (zero noise)
    for _ in range(60):
        o = obs(64)
        with torch.no_grad():
            w, _ = sac.actor(o, generator=g)
        buf.add(obs=o, w=w, reward=reward(w), next_obs=o, done=torch.ones(64, dtype=torch.bool))
        for _ in range(20):
            b = buf.sample(128, g)
            loss, _ = sac.losses(target, b["obs"], b["w"], b["reward"], b["next_obs"], b["done"], 0.0, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            polyak(target, sac.q, 0.01)
    w_det = sac.actor(obs(256), deterministic=True)[0].detach()
    hit = float((reward(w_det) > 0.5).float().mean())
    assert hit > 0.9, (hit, w_det.mean(0))
    assert float(w_det.abs().max()) <= 1.5  # the bound holds


class ScriptedVec:
    """A ChunkVecEnv whose env i pays 0.5 per executed step and succeeds (ending) at decision ``at[i]``."""

    max_steps = 12

    def __init__(self, at):
        self.at, self.n, self.env_steps = list(at), len(at), 0

    def _obs(self):
        return {"obs.state": np.zeros((self.n, 2, 5), np.float32)}

    def reset(self, seeds):
        self.t, self.done = 0, np.zeros(self.n, bool)
        return self._obs()

    def step(self, chunks):
        self.t += 1
        alive = ~self.done
        success = np.array([self.t >= a for a in self.at]) & alive
        reward = np.where(alive, 0.5 * len(chunks[0]), 0.0)
        self.env_steps += int(alive.sum()) * len(chunks[0])
        self.done = self.done | success | (self.t * 4 >= self.max_steps)
        return self._obs(), reward, self.done.copy(), success

    def close(self):
        pass


@pytest.mark.parametrize("reward", ["task", "success"])
def test_dsrl_success_reward_pays_one_at_the_first_success_only(reward):
    """PushT ends an episode at success, so a summed task reward pays near-misses that keep pushing more than
    an early success; ``dsrl.reward=success`` stores 1 at the succeeding decision and 0 elsewhere."""
    from vlaflow.train.objectives.dsrl import DSRLConfig, DSRLObjective

    pol = tiny_policy()
    obj = DSRLObjective(pol, ScriptedVec([1, 99]), DSRLConfig(n_envs=2, width=16, reward=reward), seed=0)
    obj._collect()
    r = obj.replay.data["reward"][: obj.replay.n]
    # decisions stored (alive): env0 at decision 0 only (it succeeds there), env1 at decisions 0, 1, 2
    if reward == "success":
        assert r.tolist() == [1.0, 0.0, 0.0, 0.0]
    else:
        assert r.tolist() == [2.0, 2.0, 2.0, 2.0]
    assert obj.last_stats["rollout_success"] == 0.5 and obj.last_stats["rollout_return"] == 4.0


def test_refine_dsrl_runs_end_to_end_with_the_steered_policy_evaluated(ckpt, tmp_path):
    run = tmp_path / "dsrl"
    args = [
        "refine", "--policy", str(ckpt), "--algo", "dsrl", "--out", str(run), "iterations=2",
        "dsrl.n_envs=2", "dsrl.n_decisions=3", "dsrl.updates_per_round=3", "dsrl.batch_size=8",
        "dsrl.width=32", "eval_every=1", "eval_episodes=1", "final_episodes=1", "env_workers=1",
        "progress=false",
    ]  # fmt: skip
    out = subprocess.run(cli(*args), env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("{") :])
    assert summary["steps"] == 6 and len(summary["evals"]) == 2
    from safetensors.torch import load_file

    state = load_file(str(run / "checkpoints" / "last" / "train_state.safetensors"))
    assert any(k.startswith("model/sac.actor.") for k in state) and "objective/replay_meta" in state
    assert int(state["objective/replay_meta"][0]) == 2 * 2 * 3  # 2 rounds x 2 envs x 3 decisions (alive)

    # the written checkpoint is the steered policy: load_policy / eval run actor noise -> frozen denoiser
    import vlaflow
    from vlaflow.policies import load_checkpoint
    from vlaflow.policies.runtime import PolicyRuntime
    from vlaflow.train.objectives.dsrl import SteeredRuntime

    base = load_checkpoint(ckpt)
    steered = load_checkpoint(run / "checkpoints" / "last")
    assert steered.config.family == "steered" and steered.base.config == base.config
    for k, v in steered.actor.state_dict().items():  # the policy files hold the trained actor
        assert torch.equal(v, state[f"model/sac.actor.{k}"]), k
    assert float(steered.actor.body[-1].weight.detach().abs().max()) > 0  # moved off its zero init
    reference = SteeredRuntime(base, steered.actor)
    pol = vlaflow.load_policy(run / "checkpoints" / "last", seed=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        obs = {"obs.state": rng.uniform(0, 512, (2, 5)).astype(np.float32)}
        got = pol.infer(obs).actions
        np.testing.assert_allclose(got, reference.infer(obs).actions, atol=1e-5, rtol=1e-5)
        assert not np.allclose(got, PolicyRuntime(base, seed=0).infer(obs).actions)  # base: random noise
        with torch.no_grad():
            cond = base.encode({"obs.state": torch.from_numpy(obs["obs.state"])[None]})
            at_zero = base.unnormalize_target(base.denoise(cond, noise=torch.zeros(1, 8, 2)).x0)[0].numpy()
        assert not np.allclose(got, at_zero, atol=1e-6, rtol=0)  # base at the actor's initial w = 0
    best = str(run / "checkpoints" / "best")
    ev = subprocess.run(
        cli("eval", "--policy", best, "--episodes", "1", "--out", str(tmp_path / "ev")),
        env=env(), capture_output=True, text=True,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    ex = subprocess.run(
        cli("export", best, "--out", str(tmp_path / "onnx")), env=env(), capture_output=True, text=True
    )
    assert ex.returncode == 0, ex.stderr[-2000:]  # the refined policy exports (tests/test_steered_export.py)
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["family"] == "steered" and (tmp_path / "onnx" / "noise_actor.onnx").exists()
