"""Training windows and the normalizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlaflow.data.normalize import Normalizer, compute_stats
from vlaflow.data.store import EpisodeStore, KeySpec
from vlaflow.data.windows import WindowSampler, split_episodes
from vlaflow.errors import StoreError


@pytest.fixture
def store(tmp_path):
    s = EpisodeStore.create(
        tmp_path / "s.zarr",
        {"action": KeySpec("float32", (1,)), "obs.state": KeySpec("float32", (2,))},
        fps=10,
    )
    for i, n in enumerate([3, 5]):
        t = np.arange(n, dtype=np.float32)[:, None] + 100 * (i + 1)
        s.append_episode({"action": t, "obs.state": np.concatenate([t, -t], 1)}, task=f"task{i}")
    return s


def test_windows_pad_at_both_borders(store):
    ws = WindowSampler(store, ["obs.state"], n_obs_steps=2, horizon=4)
    assert len(ws) == 8  # every step of every episode starts a window
    b = ws.get_batch(np.arange(8))
    # episode 0 = [100, 101, 102]; first window repeats the first obs, last windows repeat the last action
    np.testing.assert_array_equal(b["obs.state"][0, :, 0], [100, 100])
    np.testing.assert_array_equal(b["action"][0, :, 0], [100, 101, 102, 102])
    np.testing.assert_array_equal(b["action_is_pad"][0], [False, False, False, True])
    np.testing.assert_array_equal(b["action"][2, :, 0], [102, 102, 102, 102])
    # never crosses into the next episode
    np.testing.assert_array_equal(b["obs.state"][3, :, 0], [200, 200])
    np.testing.assert_array_equal(b["action"][7, :, 0], [204, 204, 204, 204])
    assert b["task_index"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] and ws.tasks == ["task0", "task1"]
    assert b["obs.state"].shape == (8, 2, 2) and b["action"].shape == (8, 4, 1)


def test_pad_limits_and_episode_selection(store):
    ws = WindowSampler(store, ["obs.state"], 2, 4, pad_before=0, pad_after=0, episodes=[1])
    b = ws.get_batch(np.arange(len(ws)))
    assert len(ws) == 1 and not b["action_is_pad"].any()
    np.testing.assert_array_equal(b["obs.state"][0, :, 0], [200, 201])
    np.testing.assert_array_equal(b["action"][0, :, 0], [201, 202, 203, 204])


def test_missing_key_lists_what_the_store_has(store):
    with pytest.raises(StoreError, match=r"needs keys \['obs.image.top'\].*has \['action', 'obs.state'\]"):
        WindowSampler(store, ["obs.image.top"], 2, 4)


def test_torch_loader_is_seeded(store):
    ws = WindowSampler(store, ["obs.state"], 2, 4)
    a = next(iter(ws.torch_loader(4, seed=3)))
    b = next(iter(ws.torch_loader(4, seed=3)))
    assert isinstance(a["action"], torch.Tensor) and torch.equal(a["action"], b["action"])


def test_split_by_episode():
    tr, va = split_episodes(20, 0.1, seed=0)
    assert len(va) == 2 and len(tr) == 18 and not set(tr) & set(va)
    assert split_episodes(1, 0.1)[1].size == 0


@pytest.mark.parametrize("mode, lo, hi", [("minmax", -1.0, 1.0), ("quantile", -1.1, 1.1)])
def test_normalizer_round_trip(store, mode, lo, hi):
    stats = compute_stats(store, ["action", "obs.state"])
    norm = Normalizer(stats, {"action": mode, "obs.state": "meanstd"})
    x = store.read("action")
    y = norm.normalize("action", x)
    assert y.min() >= lo - 1e-6 and y.max() <= hi + 1e-6
    np.testing.assert_allclose(norm.unnormalize("action", y), x, rtol=1e-5)
    s = norm.normalize("obs.state", store.read("obs.state"))
    np.testing.assert_allclose(s.mean(0), 0, atol=1e-5)
    back = Normalizer.from_dict(norm.to_dict())
    t = torch.as_tensor(x)
    torch.testing.assert_close(back.normalize("action", t), torch.as_tensor(y))


def test_normalizer_constant_dim_and_missing_key():
    stats = {"action": {s: np.array([2.0, 0.0], np.float32) for s in ("min", "max", "q01", "q99", "mean")}}
    stats["action"]["max"] = np.array([2.0, 4.0], np.float32)
    stats["action"]["std"] = np.array([0.0, 1.0], np.float32)
    n = Normalizer(stats, {"action": "minmax"})
    y = n.normalize("action", np.array([[2.0, 4.0]], np.float32))
    np.testing.assert_allclose(y, [[0.0, 1.0]])
    np.testing.assert_allclose(n.unnormalize("action", y), [[2.0, 4.0]])
    with pytest.raises(KeyError, match="no normalizer statistics for key 'obs.state'"):
        Normalizer(stats, {"obs.state": "minmax"})


def test_start_fraction_batches_draw_episode_starts(store):
    """data.start_fraction: that share of every batch comes from the episodes' first start_steps steps, the
    same batch for the same (seed, step) (resumable), the rest is the uniform epoch schedule."""
    from vlaflow.train.config import DataConfig
    from vlaflow.train.objectives.bc import BehaviourCloning

    ws = WindowSampler(store, ["obs.state"], n_obs_steps=2, horizon=4)
    start = ws.start_windows(2)
    assert start.tolist() == [0, 1, 3, 4]  # episode 0 = windows 0..2, episode 1 = windows 3..7
    kw = dict(batch_size=20, seed=3, rank=0, world=1)
    mixed = BehaviourCloning(None, ws, start_fraction=0.5, start_steps=2, **kw)
    plain = BehaviourCloning(None, ws, **kw)
    for step in (0, 7):
        b = mixed.batch(step)
        first = b["obs.state"][:10, -1, 0].numpy()  # current obs = 100 * (episode + 1) + step in episode
        assert np.all(first % 100 < 2), first
        torch.testing.assert_close(b["obs.state"], mixed.batch(step)["obs.state"])
        torch.testing.assert_close(b["obs.state"][10:], plain.batch(step)["obs.state"][10:])
    assert (plain.batch(0)["obs.state"][:, -1, 0].numpy() % 100 >= 2).any()
    with pytest.raises(Exception, match="start_fraction"):
        DataConfig(start_fraction=1.0)
    with pytest.raises(Exception, match="start_steps"):
        DataConfig(start_steps=0)
