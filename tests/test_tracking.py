"""Experiment tracking: TensorBoard keeps every scalar across a resume (read back with tensorboard's own
EventAccumulator), and the wandb / mlflow trackers log the same scalars, the config and the curves offline.

Tiny synthetic store, tiny U-Net, 1 torch thread: each run is a few seconds.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from vlaflow.train.config import apply_overrides  # noqa: E402

TINY = [
    "policy.net.unet.down_dims=[16,32]",
    "policy.net.unet.step_embed_dim=16",
    "data.obs_keys=[obs.state]",
    "data.horizon=8",
    "data.n_action_steps=4",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.ckpt_every=5",
    "train.log_every=5",
    "train.num_threads=1",
    "train.num_workers=0",
    "train.progress=false",
    "eval.task=",
]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    from vlaflow.data.store import EpisodeStore, KeySpec

    path = tmp_path_factory.mktemp("data") / "tiny.zarr"
    st = EpisodeStore.create(
        path, keys={"action": KeySpec("float32", (3,)), "obs.state": KeySpec("float32", (5,))}, fps=10
    )
    rng = np.random.default_rng(0)
    for i in range(4):
        s = np.cumsum(rng.normal(size=(20 + 3 * i, 5)), 0).astype(np.float32)
        st.append_episode({"action": s[:, :3] * 0.5, "obs.state": s}, task="move", source="syn", success=True)
    return path


def tiny_cfg(*extra: str):
    from vlaflow.train.presets import get_preset

    return apply_overrides(get_preset("pick_place_lowdim_diffusion"), [*TINY, *extra])


def _csv_losses(run: Path) -> dict[int, float]:
    with open(run / "log.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["kind"] == "train"}


def _tb_scalars(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_resumed_run_keeps_every_tensorboard_scalar_of_both_segments(store_path, tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from vlaflow.train.trainer import train

    run = tmp_path / "run"
    train(tiny_cfg("train.steps=10"), store_path, run)
    first = _tb_scalars(run, "train/loss")
    assert sorted(first) == [5, 10]
    # what a run killed after its step-10 checkpoint would have logged before dying: purged on resume
    w = SummaryWriter(str(run / "tb"))
    w.add_scalar("train/loss", 999.0, 12)
    w.close()
    train(tiny_cfg("train.steps=20"), store_path, run, resume=True)
    got = _tb_scalars(run, "train/loss")
    assert sorted(got) == [5, 10, 15, 20], got  # step 10 (the resume step) kept, the orphan 12 purged
    csv_losses = _csv_losses(run)
    assert sorted(csv_losses) == [5, 10, 15, 20]
    for s in (5, 10):  # the first segment's values, unchanged
        assert got[s] == pytest.approx(first[s], rel=1e-6)
    for s, v in csv_losses.items():
        assert got[s] == pytest.approx(v, rel=1e-4)
    assert sorted(_tb_scalars(run, "train/lr")) == [5, 10, 15, 20]


def test_unknown_logger_lists_the_trackers():
    from vlaflow.errors import ConfigError

    with pytest.raises(ConfigError, match="tensorboard, wandb, mlflow, none"):
        tiny_cfg("train.logger=neptune")


def test_wandb_logger_offline_writes_scalars_config_and_curves(store_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="optional extra vlaflow[wandb] not installed")
    from vlaflow.train.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    run = tmp_path / "run"
    train(tiny_cfg("train.steps=10", "train.logger=wandb"), store_path, run)
    assert not (run / "tb").exists()  # only the tracker asked for (log.csv is always written)
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    run_id = (run / "wandb_run_id").read_text().strip()
    assert offline[0].name.endswith(run_id)
    # run.finish() returns before wandb's service has written the offline log to its end: wait for the
    # run's exit record (bounded)
    deadline = time.monotonic() + 20
    records = _wandb_records(offline[0])
    while "exit" not in records["kinds"] and time.monotonic() < deadline:
        time.sleep(0.2)
        records = _wandb_records(offline[0])
    assert records["history_steps"] == [5, 10], records["kinds"]
    assert records["history_keys"] >= {"train/loss", "train/lr", "train/grad_norm"}
    assert records["config"]["train"]["steps"] == 10  # the run config, as wandb holds it
    assert any(k.startswith("curves") for k in records["images"]), records["images"]
    assert list(offline[0].glob("files/media/images/curves_10_*.png"))  # the PNG logged at the last step
    # resume continues the same wandb run
    train(tiny_cfg("train.steps=15", "train.logger=wandb"), store_path, run, resume=True)
    assert (run / "wandb_run_id").read_text().strip() == run_id


def _wandb_records(offline_dir: Path) -> dict:
    """History steps/keys, config and logged image names from an offline run's .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    steps, keys, images, config, kinds = [], set(), set(), {}, {}
    for data in _wandb_log_records(next(offline_dir.glob("*.wandb"))):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            if any(k.startswith("train/") for k in items):
                steps.append(int(rec.history.step.num))
                keys |= set(items)
            images |= {k for k, v in items.items() if "image-file" in v}
        elif kind in ("config", "run"):  # the config arrives with the run record (and later updates)
            for i in (rec.config if kind == "config" else rec.run.config).update:
                config[i.key] = json.loads(i.value_json)
    return {"history_steps": steps, "history_keys": keys, "images": images, "config": config, "kinds": kinds}


def test_mlflow_logger_offline_file_store_holds_scalars_config_and_curves(store_path, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="optional extra vlaflow[mlflow] not installed")
    from mlflow.tracking import MlflowClient

    from vlaflow.train.trainer import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets for its default store
    run = tmp_path / "run"
    train(tiny_cfg("train.steps=10", "train.logger=tensorboard,mlflow"), store_path, run)
    assert (run / "tb").exists()  # both trackers
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    run_id = (run / "mlflow_run_id").read_text().strip()
    hist = client.get_metric_history(run_id, "train.loss")
    assert sorted(m.step for m in hist) == [5, 10]
    losses = _csv_losses(run)
    assert {m.step: m.value for m in hist} == pytest.approx(losses, rel=1e-4)
    info = client.get_run(run_id)
    assert info.data.params["train.steps"] == "10"
    assert info.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"curves.png", "run_config.json"} <= arts
    train(tiny_cfg("train.steps=15", "train.logger=tensorboard,mlflow"), store_path, run, resume=True)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train.loss")) == [5, 10, 15]


def _wandb_log_records(path: Path):
    """The records of a .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log
    style 32 KiB blocks of chunks (crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST)."""
    import struct

    buf = path.read_bytes()
    assert buf[:4] == b":W&B", buf[:7]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:  # a block tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = buf[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            yield parts + chunk
