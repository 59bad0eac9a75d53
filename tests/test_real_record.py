"""``vlaflow record`` between real processes over loopback DDS: a leader arm (this test) drives the simulated
follower (``vlaflow sim-arm`` on the joint-trajectory contract); episodes land in the store live, the
store survives a SIGKILL mid-episode, ``vlaflow info`` reads it, and each episode's MCAP bag ingests
(``vlaflow ingest --format rosbag2``) to identical arrays.
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

pytest.importorskip("cyclonedds")

from vlaflow.data.store import EpisodeStore  # noqa: E402
from vlaflow.real import msgs  # noqa: E402
from vlaflow.real.contract import JOINT_STATE, JOINT_TRAJECTORY, STRING, QosSpec, load_contract  # noqa: E402
from vlaflow.real.dds import DdsTransport, loopback_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LEADER = [f"panda_joint{i}" for i in range(1, 8)] + ["panda_finger_joint1"]
HOME = np.array([0.0, -0.35, 0.0, -2.4, 0.0, 2.05, 0.785, 0.04])


def _wait_for(pred, timeout, what):
    t_end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_record_from_topics_survives_sigkill_and_its_mcap_ingests_identically(tmp_path):
    domain = 100 + (os.getpid() % 120)
    os.environ["CYCLONEDDS_URI"] = loopback_config()
    env = dict(os.environ, PYTHONPATH=str(ROOT), CYCLONEDDS_URI=loopback_config(), OMP_NUM_THREADS="1")
    store, bags = tmp_path / "teleop.zarr", tmp_path / "bags"
    cli = [sys.executable, "-m", "vlaflow.cli"]
    d = ["--domain", str(domain), "--duration", "90"]
    arm = subprocess.Popen(
        [*cli, "sim-arm", "--robot", "panda_joints", *d], env=env, stderr=subprocess.DEVNULL
    )
    log = open(tmp_path / "record.log", "w")  # noqa: SIM115
    rec = subprocess.Popen(
        [
            *cli,
            "record",
            "--robot",
            "panda_joints",
            "--out",
            str(store),
            "--bags",
            str(bags),
            *d,
            "--task",
            "wave the arm",
        ],
        env=env,
        stderr=log,
    )
    c = load_contract("panda_joints")
    t = DdsTransport(domain)
    leader = t.publisher(c.streams["leader"].topic, JOINT_STATE, QosSpec("sensor", 1))
    follow = t.publisher(c.command.topic, JOINT_TRAJECTORY, c.command.qos)
    control = t.publisher(c.topics.record, STRING, QosSpec("reliable", 10))
    seen = []
    t.subscribe(
        c.streams["joints"].topic, JOINT_STATE, QosSpec("sensor", 1), lambda r: seen.append(r.recv_ns)
    )
    try:
        _wait_for(lambda: len(seen) > 20, 60, "the simulated arm's joint states")
        time.sleep(3.0)  # the recorder subscribes (zarr + DDS start-up)
        k = 0

        def drive(seconds):  # the leader moves, the follower gets the same targets as trajectories
            nonlocal k
            for _ in range(int(seconds * 10)):
                q = HOME + np.r_[0.3 * np.sin(0.2 * k), 0.1 * np.sin(0.1 * k), np.zeros(5), 0.0]
                now = time.time_ns()
                leader.publish(msgs.joint_state(now, LEADER, q))
                follow.publish(msgs.joint_trajectory(now, LEADER, [(q, np.zeros(8), 100_000_000)]))
                k += 1
                time.sleep(0.1)

        for seconds in (2.0, 1.5):
            control.publish(msgs.string_msg("start"))
            drive(seconds)
            control.publish(msgs.string_msg("save"))
            drive(0.3)
        _wait_for(lambda: store.exists() and len(list(bags.glob("episode_*"))) == 2, 20, "two saved episodes")
        control.publish(msgs.string_msg("start"))
        drive(1.0)
        rec.send_signal(signal.SIGKILL)  # mid-episode
        rec.wait(10)
    finally:
        for p in (rec, arm):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(20)
        t.close()
        log.close()

    info = subprocess.run(
        [*cli, "info", str(store), "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["n_episodes"] == 2, summary
    s = EpisodeStore.open(store)
    assert s.n_episodes == 2 and s.tasks == ["wave the arm"]
    assert set(s.keys) == {"obs.state", "obs.image.front", "action"}
    lengths = s.episode_lengths
    assert 15 <= lengths[0] <= 21 and 10 <= lengths[1] <= 16, lengths
    ep0 = s.get_episode(0)
    assert ep0["obs.state"].shape[1] == 9 and ep0["action"].shape[1] == 8
    assert np.ptp(ep0["action"][:, 0]) > 0.2  # the leader moved joint 1
    assert np.ptp(ep0["obs.state"][:, 0]) > 0.1  # ... and the follower followed
    for i in range(2):
        out = tmp_path / f"ingested_{i}.zarr"
        r = subprocess.run(
            [
                *cli,
                "ingest",
                str(bags / f"episode_{i:06d}"),
                str(out),
                "--format",
                "rosbag2",
                "--no-progress",
                "--joint-topic",
                "/joint_states",
                "--action-topic",
                "/leader/joint_states",
                "--image-topic",
                "/camera/front/image_raw:front",
                "--rate",
                "10",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        got, want = EpisodeStore.open(out).get_episode(0), s.get_episode(i)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"episode {i} {key}")
