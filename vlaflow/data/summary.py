"""What ``vlaflow info`` reports about an episode store, as plain data (validate: vlaflow.data.validate).

The CLI (:mod:`vlaflow.cli.data`) only prints these; a notebook or a CI check can call them directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlaflow.data.siblings import sibling_notes
from vlaflow.data.store import EpisodeStore


def store_summary(store: EpisodeStore, with_stats: bool = True) -> dict[str, Any]:
    """Schema, episode counts and lengths, tasks, success flags, problems and (optionally) per-key
    min/max/mean/std of every non-image key. JSON-safe."""
    lengths = store.episode_lengths
    tasks = store.tasks
    task_idx = store.episode_task_indices()
    task_counts = {t: int((task_idx == i).sum()) for i, t in enumerate(tasks)}
    successes = (
        [store.episode_meta(i)["success"] for i in range(store.n_episodes)] if not store.legacy else []
    )
    summary = {
        "path": store.path,
        "format": "diffusion_policy (v2, read-only)" if store.legacy else "vlaflow.episode_store",
        "n_episodes": store.n_episodes,
        "n_steps": store.n_steps,
        "fps": store.fps,
        "keys": {
            k: {"shape": list(s.shape), "dtype": s.dtype, "role": s.role} for k, s in store.keys.items()
        },
        "episode_length": {
            "min": int(lengths.min()) if lengths.size else 0,
            "median": float(np.median(lengths)) if lengths.size else 0,
            "max": int(lengths.max()) if lengths.size else 0,
        },
        "tasks": task_counts,
        "success": {
            "true": sum(s is True for s in successes),
            "false": sum(s is False for s in successes),
            "unknown": sum(s is None for s in successes),
        },
        "problems": store.problems(),
        "leftovers": sibling_notes(store.path),  # hidden temp / old siblings of killed writers
    }
    if with_stats and store.n_steps:
        stats = {}
        for k, spec in store.keys.items():
            if len(spec.shape) == 3 and spec.dtype == "uint8":
                continue
            x = store.read(k).reshape(store.n_steps, -1).astype(np.float64)
            stats[k] = {
                "min": x.min(0).round(4).tolist(),
                "max": x.max(0).round(4).tolist(),
                "mean": x.mean(0).round(4).tolist(),
                "std": x.std(0).round(4).tolist(),
            }
        summary["stats"] = stats
    return summary
