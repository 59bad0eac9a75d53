"""Training windows: To observations and H actions around a current step, edge-padded at episode borders.

Alignment (see vlaflow/policies/interface.py): for current step t of an episode [s, e)::

    observations  t-To+1 .. t      rows before s repeat row s      (edge padding: the robot was at rest)
    actions       t .. t+H-1       rows at or past e repeat row e-1, flagged in ``action_is_pad``

Which t start a window: t >= s + (To-1) - pad_before and t + H-1 <= e-1 + pad_after. The defaults
(pad_before = To-1, pad_after = H-1) let every step start a window, so the end of every demonstration,
where the policy must learn to hold still, is seen as often as the middle.

Arrays are loaded into RAM once (uint8 images stay uint8), and a batch is a handful of vectorized fancy
indexing operations, so data loading is never what limits training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

import vlaflow.keys as K
from vlaflow.errors import StoreError


def split_episodes(n_episodes: int, val_ratio: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random split by episode (never by step: neighbouring steps of one episode are near-duplicates)."""
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    if n_episodes < 1:
        raise ValueError(f"need at least one episode, got {n_episodes}")
    perm = np.random.default_rng(seed).permutation(n_episodes)
    n_val = int(round(n_episodes * val_ratio))
    if val_ratio > 0 and n_episodes > 1:
        n_val = max(1, n_val)
    n_val = min(n_val, n_episodes - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class WindowSampler:
    """Random-access windows over selected episodes of an :class:`~vlaflow.data.store.EpisodeStore`."""

    def __init__(
        self,
        store,
        obs_keys: Sequence[str],
        n_obs_steps: int,
        horizon: int,
        action_key: str = K.ACTION,
        episodes: Sequence[int] | np.ndarray | None = None,
        pad_before: int | None = None,
        pad_after: int | None = None,
    ):
        if n_obs_steps < 1 or horizon < 1:
            raise ValueError(f"need n_obs_steps >= 1 and horizon >= 1, got {n_obs_steps}, {horizon}")
        wanted = list(dict.fromkeys([*obs_keys, action_key]))
        missing = [k for k in wanted if k not in store.keys]
        if missing:
            raise StoreError(
                f"{store.path}: the policy needs keys {missing} that the store does not have; "
                f"the store has {sorted(store.keys)}"
            )
        self.obs_keys = list(obs_keys)
        self.action_key = action_key
        self.n_obs_steps, self.horizon = int(n_obs_steps), int(horizon)
        self.pad_before = self.n_obs_steps - 1 if pad_before is None else int(pad_before)
        self.pad_after = self.horizon - 1 if pad_after is None else int(pad_after)
        ends = store.episode_ends
        episodes = np.arange(len(ends)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        if episodes.size and (episodes.min() < 0 or episodes.max() >= len(ends)):
            raise StoreError(f"{store.path}: episode indices out of range 0..{len(ends) - 1}")
        starts_all = np.concatenate([[0], ends[:-1]])
        task_idx = store.episode_task_indices()
        self.tasks = store.tasks

        # Load only the selected episodes' rows, and re-base their indices into that compact copy.
        rows, t_list, s_list, e_list, task_list = [], [], [], [], []
        offset = 0
        for ep in episodes:
            s, e = int(starts_all[ep]), int(ends[ep])
            n = e - s
            lo = (self.n_obs_steps - 1) - self.pad_before
            hi = n - 1 + self.pad_after - (self.horizon - 1)
            ts = np.arange(max(lo, 0), min(hi, n - 1) + 1)
            rows.append((s, e))
            t_list.append(ts + offset)
            s_list.append(np.full(ts.shape, offset))
            e_list.append(np.full(ts.shape, offset + n))
            task_list.append(np.full(ts.shape, task_idx[ep] if ep < len(task_idx) else -1))
            offset += n
        self._t = np.concatenate(t_list) if t_list else np.zeros(0, np.int64)
        self._s = np.concatenate(s_list) if s_list else np.zeros(0, np.int64)
        self._e = np.concatenate(e_list) if e_list else np.zeros(0, np.int64)
        self._task = np.concatenate(task_list).astype(np.int64) if task_list else np.zeros(0, np.int64)
        self.rows = rows  # (start, end) store rows of each loaded episode, in the order of self.data
        self.data = {k: self._load_rows(store, k, rows) for k in wanted}
        self.n_episodes = len(episodes)

    @staticmethod
    def _load_rows(store, key: str, rows: list[tuple[int, int]]) -> np.ndarray:
        arr = store.array(key)
        if not rows:
            return np.zeros((0, *arr.shape[1:]), arr.dtype)
        # contiguous runs of episodes are read in one slice (the common case: all training episodes)
        out, run_s, run_e = [], rows[0][0], rows[0][1]
        for s, e in rows[1:]:
            if s == run_e:
                run_e = e
            else:
                out.append(store._read(key, slice(run_s, run_e)))
                run_s, run_e = s, e
        # the store's reader names an undecodable chunk by file (not a raw blosc traceback)
        out.append(store._read(key, slice(run_s, run_e)))
        rows_arr = np.concatenate(out) if len(out) > 1 else out[0]
        # models train in float32; stores may keep float64 sources bit-exact (robosuite states, actions)
        return rows_arr.astype(np.float32) if rows_arr.dtype == np.float64 else rows_arr

    def __len__(self) -> int:
        return int(self._t.shape[0])

    def start_windows(self, n_steps: int) -> np.ndarray:
        """Indices of the windows whose current step is among their episode's first ``n_steps``."""
        return np.flatnonzero(self._t - self._s < int(n_steps))

    def get_batch(self, idx: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"window index out of range 0..{len(self) - 1}")
        t, s, e = self._t[idx, None], self._s[idx, None], self._e[idx, None]
        obs_rows = np.clip(t + np.arange(-self.n_obs_steps + 1, 1), s, e - 1)  # (B, To)
        act_raw = t + np.arange(self.horizon)  # (B, H)
        act_rows = np.minimum(act_raw, e - 1)
        batch = {k: self.data[k][obs_rows] for k in self.obs_keys}  # (B, To, ...)
        batch[self.action_key] = self.data[self.action_key][act_rows]  # (B, H, Da)
        batch[K.ACTION_IS_PAD] = act_raw > e - 1
        batch[K.TASK_INDEX] = self._task[idx]
        return batch

    def torch_loader(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        epochs: int | None = None,
    ) -> Iterator[dict]:
        """Batches of torch tensors, epoch after epoch (forever when ``epochs`` is None)."""
        import torch

        if len(self) == 0:
            raise StoreError("no training windows: the selected episodes are shorter than the window")
        epoch = 0
        while epochs is None or epoch < epochs:
            order = (
                np.random.default_rng([seed, epoch]).permutation(len(self))
                if shuffle
                else np.arange(len(self))
            )
            stop = len(order) - (len(order) % batch_size if drop_last else 0)
            for i in range(0, stop, batch_size):
                b = self.get_batch(order[i : i + batch_size])
                yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}
            epoch += 1
