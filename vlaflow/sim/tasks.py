"""Simulated tasks behind one interface (gymnasium API, observations keyed like the episode store).

Every task env is a ``gymnasium.Env`` whose observations are dicts keyed as in the store
(``obs.state``, ``obs.image.<camera>``, ...), and which carries a :class:`TaskSpec` as ``env.task_spec``.
``info["success"]`` is the task's success test at every step. Tasks are listed once in :data:`TASKS`;
named groups of tasks (Meta-World's benchmarks, the instruction probe) in :data:`TASK_SETS`, which
``vlaflow collect`` and ``vlaflow eval`` run task by task. ``wm:WM_CHECKPOINT`` names the imagined task of
a world-model checkpoint (:mod:`vlaflow.sim.imagined`: its task seen through the frozen model).
"""

from __future__ import annotations

import difflib
import importlib

from vlaflow.errors import VlaflowError
from vlaflow.sim import metaworld_catalog as mw

# name -> "module:factory" or "module:factory:arg", where
# factory([arg,] obs_mode: str = "lowdim", render_size: int | None = None, **kw) -> gymnasium.Env
TASKS: dict[str, str] = {
    "pusht": "vlaflow.sim.pusht:make_pusht",
    "pick_place": "vlaflow.sim.pybullet_tasks:make_pick_place",
    "pick_place_two": "vlaflow.sim.pick_place_two:make_pick_place_two",
    "pick_place_two_red": "vlaflow.sim.pick_place_two:make_pick_place_two:red",
    "pick_place_two_blue": "vlaflow.sim.pick_place_two:make_pick_place_two:blue",
    "lift": "vlaflow.sim.robosuite_tasks:make_lift",
    "can": "vlaflow.sim.robosuite_tasks:make_can",
    **{mw.PREFIX + n: f"vlaflow.sim.metaworld_tasks:make_metaworld:{n}" for n in mw.TASK_NAMES},
}

# set name -> member task names
TASK_SETS: dict[str, tuple[str, ...]] = {
    **mw.TASK_SETS,
    # the instruction-following probe: the same two-cube scenes, told to move the red or the blue cube
    "probe:two_cubes": ("pick_place_two_red", "pick_place_two_blue"),
}


def _unknown(name: str) -> VlaflowError:
    names = list(TASKS) + list(TASK_SETS)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    plain = sorted(n for n in TASKS if not n.startswith(mw.PREFIX))
    return VlaflowError(
        f"unknown task {name!r}.{hint} Known tasks: {', '.join(plain)}; Meta-World: "
        f"{', '.join(mw.PREFIX + n for n in mw.TASK_NAMES)}; task sets: {', '.join(TASK_SETS)}"
    )


WM_PREFIX = "wm:"  # wm:CHECKPOINT, an imagined task (vlaflow.sim.imagined)


def is_task_set(name: str) -> bool:
    return name in TASK_SETS


def expand_tasks(name: str) -> tuple[str, ...]:
    """The tasks ``name`` stands for: a set's members, or the task itself; unknown names list the tasks."""
    if name in TASK_SETS:
        return TASK_SETS[name]
    if name in TASKS or name.startswith(WM_PREFIX):
        return (name,)
    raise _unknown(name)


def make_env(name: str, **kwargs):
    """Build the task env ``name`` (see :data:`TASKS`); an unknown name lists the tasks + a suggestion."""
    if name in TASK_SETS:
        raise VlaflowError(
            f"{name!r} is a task set ({', '.join(TASK_SETS[name])}); build one of its tasks at a time"
        )
    if name.startswith(WM_PREFIX):
        return importlib.import_module("vlaflow.sim.imagined").make_imagined(name, **kwargs)
    if name not in TASKS:
        raise _unknown(name)
    module_name, factory, *arg = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), factory)(*arg, **kwargs)
