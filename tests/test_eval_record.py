"""``vlaflow eval --record``: evaluated episodes into an episode store (filtered imitation, DAgger, RL-100's
merge): the stored actions replay the episode exactly, success flags and seeds match the report, appends
keep what is there, and wrong destinations are refused before any rollout."""

from __future__ import annotations

import pytest
from test_eval_harness import Factory

from vlaflow.cli import main
from vlaflow.data.store import EpisodeStore
from vlaflow.errors import VlaflowError
from vlaflow.sim.evaluate import evaluate

SEEDS = [20000, 20001, 20002]


def test_recorded_episodes_replay_exactly_and_match_the_report(tmp_path):
    store = tmp_path / "rec.zarr"
    # two spawned workers: episodes arrive in completion order and are appended as they end
    report = evaluate(
        Factory(), seeds=SEEDS, max_steps=40, workers=2, out_dir=tmp_path / "ev", progress=False, record=store
    )
    rec = report["recorded"]
    assert sorted(rec["seeds"]) == SEEDS and rec["left_out"] == 0 and not rec["only_success"]
    by_seed = {e["seed"]: e for e in report["episodes"]}
    assert all("trace" not in e for e in report["episodes"])  # the arrays went to the store, not the report
    st = EpisodeStore.open(store)
    try:
        assert st.n_episodes == 3
        assert set(st.keys) == {"obs.state", "obs.keypoint", "obs.agent_pos", "obs.n_contacts", "action"}
        for i, seed in enumerate(rec["seeds"]):  # store order = the recorded seed order
            meta = st.episode_meta(i)
            assert meta["success"] is by_seed[seed]["success"]
            assert meta["source"].startswith("policy:eval:")
            act = st.get_episode(i, ["action"])["action"]
            assert len(act) == by_seed[seed]["length"] == 40
            assert act.min() >= 0 and act.max() <= 512  # clipped to the task's bounds, as executed
        assert st.attrs["eval_record"][0]["seeds"] == rec["seeds"]
    finally:
        st.close()
    # open-loop replay of the stored actions from the stored first state: the same episode, step for step
    replay = evaluate(f"replay:{store}", task="pusht", workers=0, progress=False)
    for e in replay["episodes"]:
        orig = by_seed[rec["seeds"][e["episode"]]]
        assert e["max_drift_px"] < 1e-3
        assert e["max_reward"] == pytest.approx(orig["max_reward"], abs=1e-6)
        assert e["final_reward"] == pytest.approx(orig["final_reward"], abs=1e-6)


def test_only_success_and_append_keep_the_existing_episodes(tmp_path):
    store = tmp_path / "rec.zarr"
    evaluate(Factory(), seeds=SEEDS[:2], max_steps=20, workers=0, progress=False, record=store)
    # random-noise PushT never succeeds: every episode is left out, the two stored ones stay
    report = evaluate(
        Factory(),
        seeds=SEEDS,
        max_steps=20,
        workers=0,
        progress=False,
        record=store,
        record_only_success=True,
        record_append=True,
    )
    assert not any(e["success"] for e in report["episodes"])
    assert report["recorded"]["seeds"] == [] and report["recorded"]["left_out"] == 3
    st = EpisodeStore.open(store)
    try:
        assert st.n_episodes == 2
        assert [r["left_out"] for r in st.attrs["eval_record"]] == [0, 3]
    finally:
        st.close()


def test_bad_record_destinations_are_refused_before_any_rollout(tmp_path, capsys):
    store = tmp_path / "rec.zarr"
    evaluate(Factory(), seeds=SEEDS[:1], max_steps=5, workers=0, progress=False, record=store)
    base = ["eval", "--policy", "random", "--episodes", "1", "--max-steps", "5", "--workers", "0", "--quiet"]
    cases = [
        (["--out", str(tmp_path / "a"), "--record", str(store)], "pass --record-append"),
        (["--out", str(tmp_path / "b"), "--record", str(tmp_path / "b" / "r")], "must lie outside --out"),
        (["--out", str(tmp_path / "c"), "--record-only-success"], "need --record STORE"),
        (["--out", str(tmp_path / "d"), "--record", str(tmp_path / "ev"), "--record-append"], "not an ep"),
    ]
    (tmp_path / "ev").mkdir()
    for extra, message in cases:
        assert main([*base, *extra]) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / extra[1] / "report.json").exists()
    # a store of another schema (a 2-key store) is not appended to
    other = tmp_path / "other.zarr"
    from vlaflow.data.store import KeySpec

    EpisodeStore.create(other, keys={"action": KeySpec("float32", (2,))}, fps=10).close()
    with pytest.raises(VlaflowError, match="has keys"):
        evaluate("random", seeds=SEEDS[:1], max_steps=5, workers=0, progress=False, record=other,
                 record_append=True)  # fmt: skip
    st = EpisodeStore.open(other)
    assert st.n_episodes == 0
    st.close()
    # and a replay is never recorded
    with pytest.raises(VlaflowError, match="replay is not recorded"):
        evaluate(f"replay:{store}", workers=0, progress=False, record=tmp_path / "again.zarr")
