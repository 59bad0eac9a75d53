"""The corruption corpus (issue 12): every kind of damage and interruption the store can meet, on real
files and real SIGKILLed processes, and what each command does with it -- ``validate``, ``info``,
``ingest`` (a copy of the store), ``train`` (one step) and, last, ``repair``. The rule: every outcome is
clear (an exit status and a message naming what is wrong), and none loses data (the damaged store is byte
for byte unchanged by every command but ``repair`` of a crash tail, which saves what it trims).

The measured outcomes must equal :data:`EXPECTED`, and README.md's corpus table must say the same
(:func:`test_readme_table_is_the_measured_one`), so the documentation cannot drift from the behaviour.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_overwrite_kills import env, run_and_kill_at, vlaflow_cmd
from test_store_damage import digest, set_entry

from vlaflow.cli import main
from vlaflow.data.store import EpisodeStore, KeySpec

REPO = Path(__file__).resolve().parents[1]
PAUSE = "VLAFLOW_TEST_PAUSE"

# PushT low-dim keys (so the pusht_lowdim_diffusion preset trains on it), a small camera and an int key
KEYS = {
    "action": KeySpec("float32", (2,)),
    "obs.keypoint": KeySpec("float32", (9, 2)),
    "obs.agent_pos": KeySpec("float32", (2,)),
    "obs.image.top": KeySpec("uint8", (16, 16, 3)),
    "obs.n_contacts": KeySpec("int64", (1,)),
}
N_EPISODES, LENGTH = 30, 40
TRAIN = ["train.steps=1", "train.batch_size=4", "train.num_threads=1", "train.num_workers=0",
         "train.eval_at_end=false", "train.log_every=1"]  # fmt: skip

# case -> command -> outcome: "ok" (exit 0), "tail" (validate exit 1: an unfinished tail), "damage" (validate
# exit 2), "refused" (exit 1 with the reason), "restored" (repair put back a store a kill left aside),
# "trimmed" (repair cut the crash tail, backed up). Every "refused" also leaves the store unchanged.
EXPECTED = {
    "missing chunk": {"validate": "damage", "info": "refused", "ingest": "refused", "train": "refused",
                      "repair": "refused"},
    "truncated float chunk": {"validate": "damage", "info": "refused", "ingest": "refused",
                              "train": "refused", "repair": "refused"},
    "truncated uint8 image chunk": {"validate": "damage", "info": "refused", "ingest": "refused",
                                    "train": "refused", "repair": "refused"},
    "truncated int chunk": {"validate": "damage", "info": "refused", "ingest": "refused", "train": "refused",
                            "repair": "refused"},
    "bad episode_ends entry in the middle": {"validate": "damage", "info": "refused", "ingest": "refused",
                                             "train": "refused", "repair": "refused"},
    "concurrent writer": {"validate": "ok", "info": "ok", "ingest": "ok", "train": "ok", "repair": "refused"},
    "kill during --overwrite": {"validate": "refused", "info": "refused", "ingest": "refused",
                                "train": "refused", "repair": "restored"},
    "kill during collect": {"validate": "tail", "info": "ok", "ingest": "ok", "train": "ok",
                            "repair": "trimmed"},
}  # fmt: skip
# what the outcome's message must name, per case (the file, the key, the holder, the way back)
NAMES = {
    "missing chunk": "data/action/c/0/0",
    "truncated float chunk": "data/action/c/0/0",
    "truncated uint8 image chunk": "data/obs.image.top/c/0/0/0/0",
    "truncated int chunk": "data/obs.n_contacts/c/0/0",
    "bad episode_ends entry in the middle": "episode_ends",
    "concurrent writer": "pid",
    "kill during --overwrite": "vlaflow repair",
    "kill during collect": "unfinished",
}


def make_store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = N_EPISODES * LENGTH
    data = {
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
        "obs.keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
        "obs.agent_pos": rng.uniform(0, 512, (n, 2)).astype(np.float32),
        "obs.image.top": rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
        "obs.n_contacts": rng.integers(0, 5, (n, 1)),
    }
    with EpisodeStore.create(path, KEYS, fps=10) as s:
        s.append_episodes(data, [LENGTH] * N_EPISODES, tasks=["push"] * N_EPISODES)
    return path


def truncate(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


HOLDER = r"""
import sys, time
from vlaflow.data.store import EpisodeStore
s = EpisodeStore.open(sys.argv[1], mode="a")
print("holding", flush=True)
time.sleep(600)
"""


def build(case: str, root: Path) -> tuple[Path, object]:
    """The store of ``case`` under ``root``; returns (its path, a process to stop afterwards or None)."""
    store = root / "s.zarr"
    if case == "kill during collect":
        marker = root / "marker"
        cmd = vlaflow_cmd("collect", "--task", "pick_place", "--episodes", "6", "--seed", "7", "--out",
                          str(store), "--no-progress")  # fmt: skip
        marker.unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, env={**env(), PAUSE: f"append@4:{marker}"}, stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while not marker.exists():  # paused inside the 4th episode's append: 3 finished, a tail
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() - t0 < 300
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        return store, None
    make_store(store)
    if case == "missing chunk":
        (store / "data/action/c/0/0").unlink()
    elif case == "truncated float chunk":
        truncate(store / "data/action/c/0/0")
    elif case == "truncated uint8 image chunk":
        truncate(store / "data/obs.image.top/c/0/0/0/0")
    elif case == "truncated int chunk":
        truncate(store / "data/obs.n_contacts/c/0/0")
    elif case == "bad episode_ends entry in the middle":
        set_entry(store, 12, 0)
    elif case == "concurrent writer":
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(store)], env=env(), stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "holding"
        return store, proc
    elif case == "kill during --overwrite":
        src = root / "other.zarr"
        make_store(src)
        run_and_kill_at(vlaflow_cmd("ingest", str(src), str(store), "--overwrite", "--no-progress"), "aside",
                        root / "marker")  # fmt: skip
    return store, None


def outcome(command: str, rc: int, text: str, changed: bool) -> str:
    if command == "validate" and rc in (0, 1, 2) and "no such" not in text:
        return {0: "ok", 1: "tail", 2: "damage"}[rc]
    if command == "repair" and rc == 0:
        if "put back" in text:
            return "restored"
        return "trimmed" if "did: " in text else "ok"
    if rc == 0:
        return "ok"
    assert not changed, f"{command} refused but changed the store"
    return "refused"


@pytest.mark.parametrize("case", list(EXPECTED))
def test_corpus(case, tmp_path, capsys):
    if case == "kill during collect":
        pytest.importorskip("pybullet")
    store, holder = build(case, tmp_path)
    target = store if store.exists() else next(tmp_path.glob(".s.zarr.old-*"))
    before = digest(target)
    got, texts = {}, {}
    try:
        for command in ("validate", "info", "ingest", "train", "repair"):
            args = {
                "validate": ["validate", str(store), "--no-progress"],
                "info": ["info", str(store)],
                "ingest": ["ingest", str(store), str(tmp_path / f"copy_{command}.zarr"), "--no-progress"],
                "train": ["train", "--preset", "pick_place_lowdim_diffusion" if "collect" in case
                          else "pusht_lowdim_diffusion", "--data", str(store), "--out", str(tmp_path / "run"),
                          *TRAIN],
                "repair": ["repair", str(store)],
            }[command]  # fmt: skip
            rc = main(args)
            cap = capsys.readouterr()
            texts[command] = cap.out + cap.err
            changed = (digest(target) != before) if target.exists() else True
            got[command] = outcome(command, rc, texts[command], changed)
            if command != "repair":  # nothing but repair may touch the store
                assert not changed, f"{case}: {command} changed the store"
    finally:
        if holder is not None:
            holder.kill()
            holder.communicate(timeout=30)
    assert got == EXPECTED[case], texts
    # every refusal and every damage report names what it is about
    for command, result in got.items():
        if result in ("refused", "damage", "tail") or (case, command) == ("concurrent writer", "validate"):
            assert NAMES[case] in texts[command], (command, texts[command])
    # nothing lost: a damaged store is untouched (repair refused); a crash tail's trim is backed up; a kill
    # during --overwrite gets the old store back; the copies hold exactly the finished episodes
    if got["repair"] == "refused":
        assert digest(target) == before
    if got["repair"] == "trimmed":
        assert list(tmp_path.glob("s.zarr.repair-*.npz"))
        assert EpisodeStore.open(store).n_episodes == 3
    if got["repair"] == "restored":
        assert digest(store) == before
    if got["ingest"] == "ok":
        src, copy = EpisodeStore.open(store), EpisodeStore.open(tmp_path / "copy_ingest.zarr")
        assert copy.n_episodes == src.n_episodes and copy.episode_ends.tolist() == src.episode_ends.tolist()
        for k in src.keys:
            np.testing.assert_array_equal(copy.read(k), src.read(k))


def test_readme_table_is_the_measured_one():
    text = (REPO / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in EXPECTED:
            rows[cells[0]] = dict(
                zip(("validate", "info", "ingest", "train", "repair"), cells[1:], strict=True)
            )
    assert set(rows) == set(EXPECTED), "README.md needs one corpus row per case"
    for case, row in rows.items():
        for command, cell in row.items():
            word = re.split(r"[ (:,]", cell.replace("`", ""), maxsplit=1)[0]
            assert word == EXPECTED[case][command], (case, command, cell)


def test_pause_points_are_off_without_the_variable():
    assert PAUSE not in os.environ
