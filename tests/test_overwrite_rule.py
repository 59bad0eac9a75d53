"""One overwrite rule for every command that writes a directory (issue 12, defect 6): an existing
destination is refused without ``--overwrite``; a destination that is, contains or lies inside one of the
command's own inputs is refused always; ``--help`` says so. Was: ``distill --out`` equal to the teacher
replaced the teacher with the student and exited 0; ``export`` and ``eval --out`` replaced silently, and eval
left another policy's videos beside the new report.
"""

from __future__ import annotations

import json

import pytest
from test_eval_harness import _tiny_checkpoint
from test_overwrite_kills import dp_source
from test_store_damage import digest, make_store

from vlaflow.atomic import OVERWRITE_HELP, check_destination, fresh_directory
from vlaflow.cli import main
from vlaflow.errors import VlaflowError


def files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def ckpt(tmp_path):
    return _tiny_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_distill_never_replaces_its_teacher(ckpt, tmp_path, extra, capsys):
    store = make_store(tmp_path / "s.zarr", n=3)
    before = files(ckpt)
    for out in (ckpt, ckpt / "student", ckpt.parent):  # the teacher itself, inside it, around it
        rc = main(["distill", "--teacher", str(ckpt), "--data", str(store), "--out", str(out), "--steps", "1",
                   "--no-progress", *extra])  # fmt: skip
        assert rc == 1
        assert "never writes into what it reads" in capsys.readouterr().err
    assert files(ckpt) == before
    rc = main(
        ["distill", "--teacher", str(ckpt), "--data", str(store), "--out", str(store), "--steps", "1", *extra]
    )
    assert rc == 1 and "--data" in capsys.readouterr().err


def test_distill_refuses_an_existing_out_without_overwrite(ckpt, tmp_path, capsys):
    store = make_store(tmp_path / "s.zarr", n=3)
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "notes.txt").write_text("mine")
    rc = main(["distill", "--teacher", str(ckpt), "--data", str(store), "--out", str(tmp_path / "student"),
               "--steps", "1", "--no-progress"])  # fmt: skip
    assert rc == 1 and "exists (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "student" / "notes.txt").read_text() == "mine"


def test_export_refuses_its_checkpoint_and_an_existing_out(ckpt, tmp_path, capsys):
    before = files(ckpt)
    for out, extra in ((ckpt, ["--overwrite"]), (ckpt / "onnx", []), (ckpt / "onnx", ["--overwrite"])):
        assert main(["export", str(ckpt), "--out", str(out), *extra]) == 1
        assert "never writes into what it reads" in capsys.readouterr().err
    assert files(ckpt) == before
    (tmp_path / "onnx").mkdir()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "onnx")]) == 1
    assert "exists (pass --overwrite" in capsys.readouterr().err


def test_eval_out_rules_and_overwrite_replaces_the_whole_directory(ckpt, tmp_path, capsys):
    pytest.importorskip("gym_pusht")
    run = ckpt.parent
    # --out containing the policy, or the policy's own directory: refused, with or without --overwrite
    for out in (run, ckpt):
        args = ["eval", "--policy", str(ckpt), "--episodes", "1", "--max-steps", "2", "--out", str(out)]
        assert main([*args, "--overwrite"]) == 1
        assert "never writes into what it reads" in capsys.readouterr().err
    out = tmp_path / "ev"
    base = ["eval", "--policy", "random", "--episodes", "1", "--max-steps", "3", "--workers", "0", "--quiet"]
    assert main([*base, "--out", str(out), "--videos", "1"]) == 0
    assert list((out / "videos").iterdir())
    report = (out / "report.json").read_text()
    assert main([*base, "--out", str(out), "--videos", "0"]) == 1
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert (out / "report.json").read_text() == report  # untouched
    assert main([*base, "--out", str(out), "--videos", "0", "--overwrite"]) == 0
    assert not (out / "videos").exists()  # no videos of the earlier run beside the new report
    assert json.loads((out / "report.json").read_text())["videos"] == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_ingest_export_lerobot_and_train_never_write_into_their_source(tmp_path, capsys):
    src = dp_source(tmp_path / "src.zarr", n_eps=2)
    before = digest(src)
    assert main(["ingest", str(src), str(src), "--overwrite"]) == 1
    assert main(["ingest", str(src), str(src / "inner.zarr")]) == 1
    assert capsys.readouterr().err.count("never writes into what it reads") == 2
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(src), str(store), "--no-progress"]) == 0
    s_before = digest(store)
    assert main(["export-lerobot", str(store), str(store), "--overwrite"]) == 1
    assert (
        main(
            ["train", "--preset", "pusht_lowdim_diffusion", "--data", str(store), "--out", str(store / "run")]
        )
        == 1
    )
    assert capsys.readouterr().err.count("never writes into what it reads") == 2
    assert digest(src) == before and digest(store) == s_before


def test_compose_refuses_a_parent_as_out(ckpt, tmp_path, capsys):
    other = _tiny_checkpoint(tmp_path / "other")
    before = files(ckpt)
    rc = main(
        ["compose", "--parents", str(ckpt), str(other), "--episodes", "1", "--out", str(ckpt), "--overwrite"]
    )
    assert rc == 1 and "never writes into what it reads" in capsys.readouterr().err
    assert files(ckpt) == before


@pytest.mark.parametrize(
    "cmd", ["ingest", "collect", "export-lerobot", "export", "distill", "eval", "compose", "demo", "view"]
)
def test_help_states_the_rule(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(OVERWRITE_HELP.split()) in text


def test_check_destination_and_fresh_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(VlaflowError, match="contains"):
        check_destination(tmp_path, overwrite=True, sources={"the source": src})
    with pytest.raises(VlaflowError, match="is inside"):
        check_destination(src / "x", overwrite=True, sources={"the source": src})
    (src / "link").symlink_to(src)
    with pytest.raises(VlaflowError, match="is the source"):  # a symlink is resolved
        check_destination(src / "link", overwrite=True, sources={"the source": src})
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), fresh_directory(out, overwrite=True) as d:  # an error: old back
        (d / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert files(out) == {"old.txt": b"old"}
    with fresh_directory(out, overwrite=True) as d:
        (d / "new.txt").write_text("new")
    assert files(out) == {"new.txt": b"new"}
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}  # no aside copy left


def test_train_out_that_is_some_other_non_empty_directory_is_refused(tmp_path, capsys):
    store = make_store(tmp_path / "s.zarr", n=3)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"\xff\xd8")
    args = ["train", "--preset", "pusht_lowdim_diffusion", "--data", str(store), "--out", str(other)]
    assert main([*args, "train.steps=1"]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert files(other) == {"a.jpg": b"\xff\xd8"}
