"""Checks before work, and bounds (issue 12): a wrong argument is named with what to pass instead, before
any env, worker or write starts; --workers and the evaluation job list are bounded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_overwrite_kills import dp_source
from test_store_damage import make_store

from vlaflow.cli import main
from vlaflow.sim.evaluate import JobList, cap_workers


def test_ingest_key_map_with_an_unknown_source_key_names_the_arrays(tmp_path, capsys):
    src = dp_source(tmp_path / "src.zarr", n_eps=2)
    assert main(["ingest", str(src), str(tmp_path / "o.zarr"), "--key-map", "stat=obs.state"]) == 1
    err = capsys.readouterr().err
    assert "'stat'" in err and "['action', 'state']" in err
    assert not (tmp_path / "o.zarr").exists()
    # a vlaflow store as the source: copied through the store reader, key-map checked the same way
    store = make_store(tmp_path / "s.zarr", n=3)
    assert main(["ingest", str(store), str(tmp_path / "c.zarr"), "--key-map", "nope=x", "--no-progress"]) == 1
    assert "'nope'" in capsys.readouterr().err
    assert main(["ingest", str(store), str(tmp_path / "c.zarr"), "--key-map", "obs.state=obs.joints",
                 "--no-progress"]) == 0  # fmt: skip
    from vlaflow.data.store import EpisodeStore

    a, b = EpisodeStore.open(store), EpisodeStore.open(tmp_path / "c.zarr")
    np.testing.assert_array_equal(a.read("obs.state"), b.read("obs.joints"))
    assert [a.episode_meta(i) for i in range(3)] == [b.episode_meta(i) for i in range(3)]


def test_info_and_validate_on_a_lerobot_dataset_say_how_to_ingest_it(tmp_path, capsys):
    d = tmp_path / "so101"
    (d / "meta").mkdir(parents=True)
    (d / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v3.0"}))
    for cmd in ("info", "validate"):
        assert main([cmd, str(d)]) == 1
        err = capsys.readouterr().err
        assert (
            "a LeRobot dataset, not a vlaflow episode store" in err and f"vlaflow ingest {d} OUT.zarr" in err
        )


@pytest.mark.parametrize("kind", ["missing", "run", "onnx", "store", "onnx-prefix-on-a-checkpoint"])
def test_eval_policy_that_is_not_a_checkpoint_says_what_to_pass(kind, tmp_path, capsys):
    p = tmp_path / "thing"
    if kind == "run":
        (p / "checkpoints" / "best").mkdir(parents=True)
        (p / "checkpoints" / "last").mkdir()
        (p / "log.csv").write_text("step\n")
    elif kind == "onnx":
        p.mkdir()
        (p / "manifest.json").write_text("{}")
    elif kind == "store":
        make_store(p, n=2)
    elif kind == "onnx-prefix-on-a-checkpoint":
        p.mkdir()
        (p / "config.json").write_text("{}")
    policy = f"onnx:{p}" if kind.startswith("onnx-prefix") else str(p)
    out = tmp_path / "ev"
    assert main(["eval", "--policy", policy, "--episodes", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    want = {
        "missing": "no such path; pass a checkpoint directory",
        "run": f"is a training run directory; pass one of its checkpoints: {p}/checkpoints/best, "
        f"{p}/checkpoints/last",
        "onnx": f"is an ONNX export (manifest.json); pass --policy onnx:{p}",
        "store": f"is an episode store; to replay it pass --policy replay:{p}",
        "onnx-prefix-on-a-checkpoint": "it is a checkpoint: pass it without onnx:",
    }[kind]
    assert want in err
    assert not out.exists()  # refused before anything was written


def test_eval_device_cuda_without_cuda_is_a_clean_error(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from test_eval_harness import _tiny_checkpoint

    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    assert main(["eval", "--policy", str(ckpt), "--device", "cuda", "--out", str(tmp_path / "e")]) == 1
    assert "--device 'cuda' but CUDA is not available here; use --device cpu" in capsys.readouterr().err


def test_workers_are_capped_at_the_cpu_count(capsys):
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cap_workers(n + 7, 100) == n
    assert f"--workers {n + 7} > the {n} CPU(s) here; using {n}" in capsys.readouterr().err
    assert cap_workers(0, 100) == 0 and cap_workers(1, 100) == 1


def test_job_list_is_made_on_demand():
    jobs = JobList(range(100000, 100000 + 10**12), ("a", "b"), (300, 400), videos=2)
    assert len(jobs) == 2 * 10**12  # no list of 2e12 jobs exists
    last = jobs[-1]
    assert (last.index, last.seed, last.task, last.max_steps, last.video) == (
        2 * 10**12 - 1,
        100000 + 10**12 - 1,
        "b",
        400,
        False,
    )
    first_b = jobs[10**12]
    assert (first_b.seed, first_b.task, first_b.video) == (100000, "b", True)
    replay = JobList(range(3), (None,), (10**9,), videos=1, replay=True)
    assert [(j.index, j.replay_episode, j.video) for j in replay] == [
        (0, 0, True),
        (1, 1, False),
        (2, 2, False),
    ]
    from vlaflow.sim.harness import _Pending

    made = []

    def gen():
        for j in range(10**9):
            made.append(j)
            yield j

    pending = _Pending(gen())
    assert pending.popleft() == 0 and pending.popleft() == 1 and len(made) == 3  # one ahead, no more
