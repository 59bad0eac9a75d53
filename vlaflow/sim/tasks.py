"""Simulated tasks behind one interface (gymnasium API, observations keyed like the episode store).

Every task env is a ``gymnasium.Env`` whose observations are dicts keyed as in the store
(``obs.state``, ``obs.image.<camera>``, ...), and which carries a :class:`TaskSpec` as ``env.task_spec``.
``info["success"]`` is the task's success test at every step. Tasks are listed once in :data:`TASKS`.
"""

from __future__ import annotations

import difflib
import importlib

from vlaflow.errors import VlaflowError

# name -> "module:factory", where
# factory(obs_mode: str = "lowdim", render_size: int | None = None, **kw) -> gymnasium.Env
TASKS: dict[str, str] = {
    "pusht": "vlaflow.sim.pusht:make_pusht",
    "pick_place": "vlaflow.sim.pybullet_tasks:make_pick_place",
    "lift": "vlaflow.sim.robosuite_tasks:make_lift",
    "can": "vlaflow.sim.robosuite_tasks:make_can",
}


def make_env(name: str, **kwargs):
    """Build the task env ``name`` (see :data:`TASKS`); an unknown name lists the tasks + a suggestion."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise VlaflowError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(TASKS))}")
    module_name, factory = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), factory)(**kwargs)
