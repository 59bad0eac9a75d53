"""Meta-World in the sim layer: the env interface of every task, seeds and splits, experts, multi-task
collection and evaluation (worker-count invariance, instruction override, unseen tasks)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("metaworld")

from vlaflow.cli import main  # noqa: E402
from vlaflow.data.store import EpisodeStore  # noqa: E402
from vlaflow.errors import VlaflowError  # noqa: E402
from vlaflow.interfaces import InferResult, RuntimeSpec  # noqa: E402
from vlaflow.sim import metaworld_catalog as catalog  # noqa: E402
from vlaflow.sim.collect import collect, rollout_expert  # noqa: E402
from vlaflow.sim.evaluate import evaluate  # noqa: E402
from vlaflow.sim.experts import make_expert  # noqa: E402
from vlaflow.sim.tasks import TASK_SETS, TASKS, expand_tasks, make_env  # noqa: E402

MW_TASKS = [t for t in TASKS if t.startswith("mw:")]


# ---------------------------------------------------------------------------------------------- test policy
class OracleLanguagePolicy:
    """A language-conditioned RuntimePolicy: the instruction it is told picks Meta-World's scripted expert
    for that task, run on obs.state. It does what it is told, so the instruction path is observable."""

    def __init__(self):
        self.config = RuntimeSpec(1, 2, 1, {"obs.state": (39,)}, 4, 80.0, task="reach the goal")

    def reset(self, seed=None):
        pass

    def infer(self, obs, *, shift=None, delay=None):
        from metaworld.policies import ENV_POLICY_MAP

        task = catalog.task_of_instruction(obs["task"])
        expert = ENV_POLICY_MAP[catalog.env_name(task)]()
        with _quiet():
            a = np.clip(expert.get_action(np.asarray(obs["obs.state"][-1], dtype=np.float64)), -1, 1)
        return InferResult(np.stack([a, a]).astype(np.float32), nfe=0)


def make_oracle():
    """Picklable zero-argument factory: spawned workers build their own oracle."""
    return OracleLanguagePolicy()


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


class Trained:
    """An object that looks like a vlaflow runtime trained on ``tasks`` (its config's instructions)."""

    class _Cfg:
        def __init__(self, tasks):
            self.tasks = tasks

    class _Inner:
        pass

    def __init__(self, tasks):
        self.config = RuntimeSpec(1, 1, 1, {}, 4, 80.0)
        self.policy = self._Inner()
        self.policy.config = self._Cfg(tuple(tasks))

    def reset(self, seed=None):
        pass

    def infer(self, obs, *, shift=None, delay=None):
        return InferResult(np.zeros((1, 4), np.float32))


# ---------------------------------------------------------------------------------------------- catalog
def test_catalog_matches_metaworld():
    from metaworld import env_dict
    from metaworld.policies import ENV_POLICY_MAP

    assert [catalog.env_name(t) for t in MW_TASKS] == list(env_dict.ALL_V3_ENVIRONMENTS)
    assert set(ENV_POLICY_MAP) == set(env_dict.ALL_V3_ENVIRONMENTS)  # an expert for every task
    assert [catalog.env_name(t) for t in TASK_SETS["mw:mt10"]] == list(env_dict.MT10_V3)
    for split in ("train", "test"):
        for ours, theirs in (("ml10", env_dict.ML10_V3), ("ml45", env_dict.ML45_V3)):
            assert {catalog.env_name(t) for t in TASK_SETS[f"mw:{ours}-{split}"]} == set(theirs[split])
    assert not set(TASK_SETS["mw:ml45-train"]) & set(TASK_SETS["mw:ml45-test"])
    # every sentence names exactly one task; canonical instruction first
    texts = [s for v in catalog.INSTRUCTIONS.values() for s in v]
    assert len(set(texts)) == len(texts) == 150
    assert catalog.task_of_instruction(" Open the drawer. ") == "mw:drawer-open"
    assert catalog.task_of_instruction("slide the drawer out") == "mw:drawer-open"


def test_unknown_names_suggest_and_sets_are_not_envs():
    with pytest.raises(VlaflowError, match="Did you mean 'mw:drawer-open'") as e:
        make_env("mw:drawer-opn")
    assert "mw:window-close" in str(e.value) and "mw:mt10" in str(e.value)  # the lists
    with pytest.raises(VlaflowError, match="task set"):
        make_env("mw:mt10")
    with pytest.raises(VlaflowError, match="Did you mean 'mw:mt10'"):
        expand_tasks("mw:mt1")


# ---------------------------------------------------------------------------------------------- env
def _run(env, seed, actions):
    """Reset with ``seed`` and apply ``actions``: (first state, states after each action, last step)."""
    first, info = env.reset(seed=seed)
    assert info["goal_split"] == "train"
    steps = [env.step(a) for a in actions]
    return first["obs.state"], np.stack([s[0]["obs.state"] for s in steps]), steps[-1]


def test_env_interface_holds_for_every_task():
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(5, 4))
    for task in MW_TASKS:
        env = make_env(task)
        try:
            spec = env.task_spec
            assert spec.name == task and spec.action_dim == 4 and spec.fps == 80.0 and spec.max_steps == 500
            assert spec.obs_shapes == {"obs.state": (39,)} and len(spec.extra["state_names"]) == 39
            assert spec.instruction == spec.extra["instructions"][0] and len(spec.extra["instructions"]) == 3
            obs, info = env.reset(seed=catalog.TEST_SEED_START)
            assert set(obs) == {"obs.state"} and obs["obs.state"].dtype == np.float32
            assert obs["obs.state"].shape == (39,) and info == {"success": False, "goal_split": "test"}
            goal = env.unwrapped.privileged_state()["goal_pos"]
            assert np.any(goal != 0) and np.allclose(
                obs["obs.state"][-3:], goal, atol=1e-6
            )  # goal observable

            a_first, a_traj, (_, reward, term, trunc, step_info) = _run(env, 3, actions)
            b_first, b_traj, _ = _run(env, 3, actions)
            c_first, _, _ = _run(env, 4, actions)
            assert np.array_equal(a_first, b_first) and np.array_equal(a_traj, b_traj), task
            assert not np.array_equal(a_first, c_first), f"{task}: seeds 3 and 4 gave the same scene"
            assert isinstance(step_info["success"], bool) and reward == float(step_info["success"])
            assert term == step_info["success"] and trunc is False
        finally:
            env.close()


def test_fresh_env_and_history_do_not_change_an_episode():
    def episode(env, seed):
        expert = make_expert("mw:push", env)
        return rollout_expert(env, expert, seed, 500).data["obs.state"]

    a, b = make_env("mw:push"), make_env("mw:push")
    try:
        episode(a, 11)  # a's history: another episode first
        x, y = episode(a, 12), episode(b, 12)
        assert x.shape == y.shape and np.array_equal(x, y)
        with pytest.raises(VlaflowError, match="replays from a recorded obs.state are not supported"):
            a.reset(seed=0, options={"reset_to_state": x[0]})
    finally:
        a.close(), b.close()


def test_image_mode_renders_cameras_at_the_requested_size():
    env = make_env("mw:drawer-open", obs_mode="image", render_size=32, cameras=["corner", "topview"])
    try:
        assert env.task_spec.obs_shapes == {
            "obs.state": (4,),
            "obs.image.corner": (32, 32, 3),
            "obs.image.topview": (32, 32, 3),
        }
        obs, _ = env.reset(seed=0)
        obs2, *_ = env.step(np.array([0.0, 0.0, -1.0, 0.0]))
        for k in ("obs.image.corner", "obs.image.topview"):
            assert obs[k].dtype == np.uint8 and obs[k].shape == (32, 32, 3) and obs[k].std() > 5
        assert np.array_equal(obs["obs.state"], env.reset(seed=0)[0]["obs.state"])
        assert env.render().shape == (256, 256, 3)
    finally:
        env.close()
    with pytest.raises(VlaflowError, match="cameras must be"):
        make_env("mw:reach", obs_mode="image", cameras=["nope"])


# ---------------------------------------------------------------------------------------------- collect
def test_collect_a_task_set_stores_the_instruction_per_episode(tmp_path):
    tasks = TASK_SETS["mw:ml10-test"]
    res = collect("mw:ml10-test", 1, str(tmp_path / "s"), progress=False)
    store = EpisodeStore.open(tmp_path / "s")
    assert res.n_episodes == store.n_episodes == len(tasks)
    metas = [store.episode_meta(i) for i in range(store.n_episodes)]
    assert [m["task"] for m in metas] == [catalog.INSTRUCTIONS[t.removeprefix("mw:")][0] for t in tasks]
    assert [m["source"] for m in metas] == [f"sim:{t}:expert" for t in tasks]
    attrs = store.attrs
    assert attrs["task_set"]["tasks"] == list(tasks) and set(attrs["collect"]["per_task"]) == set(tasks)
    # paraphrases: one of the task's own sentences per episode, drawn by seed
    collect("mw:reach", 4, str(tmp_path / "p"), progress=False, paraphrase=True)
    store = EpisodeStore.open(tmp_path / "p")
    texts = {store.episode_meta(i)["task"] for i in range(store.n_episodes)}
    assert texts <= set(catalog.INSTRUCTIONS["reach"]) and len(texts) > 1
    # the held-out positions never become demonstrations
    with pytest.raises(VlaflowError, match="held-out split"):
        collect("mw:reach", 1, str(tmp_path / "h"), seed=catalog.TEST_SEED_START, progress=False)
    assert not (tmp_path / "h").exists()


# ---------------------------------------------------------------------------------------------- eval
def test_multitask_eval_gives_the_same_episodes_for_any_worker_count(tmp_path):
    kw = dict(task="mw:ml10-test", n_episodes=2, progress=False)
    local = evaluate(OracleLanguagePolicy(), workers=0, out_dir=tmp_path / "w0", **kw)
    two = evaluate(make_oracle, workers=2, out_dir=tmp_path / "w2", **kw)
    three = evaluate(make_oracle, workers=3, **kw)
    assert two["episodes"] == local["episodes"] == three["episodes"]
    tasks = TASK_SETS["mw:ml10-test"]
    assert [e["task"] for e in local["episodes"]] == [t for t in tasks for _ in range(2)]
    assert {e["goal_split"] for e in local["episodes"]} == {"test"}
    assert len({e["length"] for e in local["episodes"]}) > 3  # episodes really differ
    # the instruction each episode was told is its task's own
    assert all(e["instruction"] == catalog.INSTRUCTIONS[e["task"][3:]][0] for e in local["episodes"])
    report = json.loads((tmp_path / "w2" / "report.json").read_text())
    assert report["tasks"] == list(tasks) and report["episodes_per_task"] == 2
    per = report["per_task"]
    assert set(per) == set(tasks) and all(per[t]["n_episodes"] == 2 for t in tasks)
    rates = [per[t]["success_rate"] for t in tasks]
    assert report["aggregate"]["success_rate"] == pytest.approx(np.mean(rates))
    lo, hi = report["aggregate"]["success_ci95"]
    assert lo <= report["aggregate"]["success_rate"] <= hi and report["aggregate"]["n_tasks"] == 5
    summary = (tmp_path / "w2" / "summary.md").read_text()
    assert all(f"| {t} |" in summary for t in tasks) and "**average**" in summary


def test_instruction_override_reaches_the_policy():
    kw = dict(task="mw:drawer-open", seeds=[100000, 100001], workers=0, progress=False)
    own = evaluate(OracleLanguagePolicy(), **kw)
    told = evaluate(OracleLanguagePolicy(), instruction="close the drawer", max_steps=120, **kw)
    assert own["aggregate"]["success_rate"] == 1.0 and told["aggregate"]["success_rate"] == 0.0
    assert told["instruction"] == "close the drawer"
    assert {e["instruction"] for e in told["episodes"]} == {"close the drawer"}
    with pytest.raises(VlaflowError, match="not language-conditioned"):
        evaluate("random", instruction="close the drawer", **kw)


def test_unseen_tasks_are_refused_unless_allowed(tmp_path):
    policy = Trained(["open the drawer", "close the door"])
    with pytest.raises(VlaflowError) as e:
        evaluate(policy, task="mw:ml10-test", seeds=[100000], max_steps=2, progress=False)
    msg = str(e.value)
    assert "trained on:   mw:door-close, mw:drawer-open" in msg
    assert (
        "unseen:       mw:shelf-place, mw:sweep-into, mw:lever-pull" in msg and "--allow-unseen-tasks" in msg
    )
    rep = evaluate(
        policy, task="mw:ml10-test", seeds=[100000], max_steps=2, progress=False, allow_unseen_tasks=True
    )
    assert rep["unseen_tasks"] == ["mw:shelf-place", "mw:sweep-into", "mw:lever-pull"]
    assert rep["aggregate"]["n_episodes"] == 5
    evaluate(policy, task="mw:drawer-open", seeds=[100000], max_steps=2, progress=False)  # seen: runs


def test_cli_collect_and_eval_on_a_task_set(tmp_path, capsys):
    assert main(["collect", "--task", "mw:reach", "--episodes", "1", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0  # fmt: skip
    assert "wrote 1 episodes" in capsys.readouterr().out
    args = ["eval", "--task", "mw:ml10-test", "--policy", "random", "--out", str(tmp_path / "e"), "--quiet"]
    assert main([*args, "--episodes", "1"]) == 1
    assert "--episodes-per-task" in capsys.readouterr().err
    assert main([*args, "--episodes-per-task", "2", "--max-steps", "3", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "| mw:lever-pull | pull the lever up |" in out and "**average**" in out
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    tasks = TASK_SETS["mw:ml10-test"]
    assert len(report["videos"]) == 5 and all("video" in report["per_task"][t] for t in tasks)  # one per task
    assert all((tmp_path / "e" / report["per_task"][t]["video"]).stat().st_size > 0 for t in tasks)
