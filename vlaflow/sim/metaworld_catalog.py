"""Meta-World's task names, benchmark splits and instructions, as plain data (no metaworld import).

The task registry (:mod:`vlaflow.sim.tasks`) lists ``mw:<name>`` for each of the 50 Meta-World v3 tasks
(``name`` is Meta-World's env name without ``-v3``, e.g. ``mw:drawer-open``) and the benchmark task sets
below. The splits are copied from ``metaworld.env_dict`` 3.1.1 (a test checks they still match):

- ``mw:mt10`` / ``mw:mt50``: Meta-World's multi-task benchmarks (every task is a training task).
- ``mw:ml10-train`` / ``mw:ml10-test`` and ``mw:ml45-train`` / ``mw:ml45-test``: the meta-learning
  benchmarks' task splits; the test tasks are held out from the train tasks.

Goal and object positions are split too, by seed (see :mod:`vlaflow.sim.metaworld_tasks`): seeds below
:data:`TEST_SEED_START` draw the training positions, seeds from it on the held-out ones.

Instructions: every task has a short plain sentence first (the canonical instruction, stored as the task
text of collected episodes) and two paraphrases. Every sentence names exactly one task, so a language
policy's training instructions tell which tasks it has seen.
"""

from __future__ import annotations

PREFIX = "mw:"
TEST_SEED_START = 100000  # seeds >= this draw the held-out goal/object positions (vlaflow eval's default)

# name -> (canonical instruction, paraphrase, paraphrase); the order is Meta-World's ALL_V3_ENVIRONMENTS
INSTRUCTIONS: dict[str, tuple[str, str, str]] = {
    "assembly": (
        "put the nut on the peg",
        "pick up the nut and fit it onto the peg",
        "slide the ring down over the peg",
    ),
    "basketball": (
        "dunk the ball into the basket",
        "put the ball through the hoop",
        "pick up the ball and drop it in the basket",
    ),
    "bin-picking": (
        "move the cube from one bin to the other",
        "pick the cube out of its bin and put it in the other bin",
        "transfer the block to the second bin",
    ),
    "box-close": (
        "put the lid on the box",
        "close the box with its lid",
        "pick up the lid and cover the box",
    ),
    "button-press-topdown": (
        "press the button from the top",
        "push the button straight down",
        "press down on the button from above",
    ),
    "button-press-topdown-wall": (
        "press the button from the top behind the wall",
        "push the button down on the far side of the wall",
        "reach over the wall and press the button down",
    ),
    "button-press": (
        "press the button",
        "push the button forward",
        "press the button in front of you",
    ),
    "button-press-wall": (
        "press the button behind the wall",
        "push the button past the wall",
        "reach around the wall and press the button",
    ),
    "coffee-button": (
        "press the coffee machine button",
        "push the button on the coffee machine",
        "start the coffee machine",
    ),
    "coffee-pull": (
        "pull the mug away from the coffee machine",
        "take the mug out from under the coffee machine",
        "slide the cup back from the coffee machine",
    ),
    "coffee-push": (
        "push the mug under the coffee machine",
        "slide the mug into the coffee machine",
        "put the cup under the coffee spout",
    ),
    "dial-turn": (
        "turn the dial",
        "rotate the dial",
        "spin the knob around",
    ),
    "disassemble": (
        "take the nut off the peg",
        "lift the nut up and off the peg",
        "remove the ring from the peg",
    ),
    "door-close": (
        "close the door",
        "push the door shut",
        "swing the door closed",
    ),
    "door-lock": (
        "lock the door",
        "turn the door lock down",
        "rotate the lock to lock the door",
    ),
    "door-open": (
        "open the door",
        "pull the door open",
        "swing the door open",
    ),
    "door-unlock": (
        "unlock the door",
        "turn the lock to unlock the door",
        "rotate the door lock open",
    ),
    "hand-insert": (
        "push the block into the hole",
        "slide the object into the hole in the table",
        "insert the block into the hole",
    ),
    "drawer-close": (
        "close the drawer",
        "push the drawer shut",
        "slide the drawer closed",
    ),
    "drawer-open": (
        "open the drawer",
        "pull the drawer open",
        "slide the drawer out",
    ),
    "faucet-open": (
        "turn the faucet on",
        "open the faucet",
        "rotate the faucet handle to turn the water on",
    ),
    "faucet-close": (
        "turn the faucet off",
        "close the faucet",
        "rotate the faucet handle to turn the water off",
    ),
    "hammer": (
        "hammer the nail into the wall",
        "use the hammer to drive in the nail",
        "pick up the hammer and hit the nail",
    ),
    "handle-press-side": (
        "press the handle down from the side",
        "push the side handle down",
        "press down on the handle from the side",
    ),
    "handle-press": (
        "press the handle down",
        "push the handle down",
        "press down on the handle",
    ),
    "handle-pull-side": (
        "pull the handle up from the side",
        "lift the side handle up",
        "pull up on the handle from the side",
    ),
    "handle-pull": (
        "pull the handle up",
        "lift the handle up",
        "pull up on the handle",
    ),
    "lever-pull": (
        "pull the lever up",
        "raise the lever",
        "lift the lever",
    ),
    "pick-place-wall": (
        "pick up the puck and place it at the goal behind the wall",
        "move the puck over the wall to the goal",
        "lift the puck over the wall and put it on the target",
    ),
    "pick-out-of-hole": (
        "pick the puck out of the hole",
        "lift the puck out of the hole",
        "take the puck out of the hole",
    ),
    "pick-place": (
        "pick up the puck and place it at the goal",
        "move the puck to the goal in the air",
        "lift the puck and put it on the target",
    ),
    "plate-slide": (
        "slide the plate into the goal",
        "push the plate into the cabinet",
        "slide the plate forward into the goal",
    ),
    "plate-slide-side": (
        "slide the plate sideways into the goal",
        "push the plate sideways into the cabinet",
        "slide the plate to the side into the goal",
    ),
    "plate-slide-back": (
        "slide the plate back out of the goal",
        "pull the plate back out of the cabinet",
        "slide the plate back toward you",
    ),
    "plate-slide-back-side": (
        "slide the plate back out sideways",
        "pull the plate sideways out of the cabinet",
        "slide the plate back to the side",
    ),
    "peg-insert-side": (
        "insert the peg into the hole from the side",
        "push the peg sideways into the hole",
        "pick up the peg and put it in the side hole",
    ),
    "peg-unplug-side": (
        "unplug the peg from the side",
        "pull the peg out of the hole sideways",
        "remove the peg from the side hole",
    ),
    "soccer": (
        "kick the ball into the goal",
        "push the soccer ball into the net",
        "shoot the ball into the goal",
    ),
    "stick-push": (
        "use the stick to push the bottle",
        "grab the stick and push the thermos with it",
        "push the bottle with the stick",
    ),
    "stick-pull": (
        "use the stick to pull the bottle",
        "grab the stick and pull the thermos with it",
        "pull the bottle with the stick",
    ),
    "push": (
        "push the puck to the goal",
        "slide the puck to the target",
        "push the puck across the table to the goal",
    ),
    "push-wall": (
        "push the puck past the wall to the goal",
        "slide the puck around the wall to the target",
        "push the puck around the wall",
    ),
    "push-back": (
        "push the puck back to the goal",
        "pull the puck back toward the target",
        "slide the puck backward to the goal",
    ),
    "reach": (
        "reach the goal",
        "move the gripper to the target",
        "put the hand at the goal position",
    ),
    "reach-wall": (
        "reach the goal behind the wall",
        "move the gripper over the wall to the target",
        "reach over the wall to the goal",
    ),
    "shelf-place": (
        "put the block on the shelf",
        "pick up the block and place it on the shelf",
        "move the cube onto the shelf",
    ),
    "sweep-into": (
        "sweep the puck into the hole",
        "push the puck into the hole",
        "brush the puck into the hole",
    ),
    "sweep": (
        "sweep the puck off the table",
        "push the puck off the edge of the table",
        "brush the puck off the table",
    ),
    "window-open": (
        "open the window",
        "slide the window open",
        "push the window open",
    ),
    "window-close": (
        "close the window",
        "slide the window shut",
        "push the window closed",
    ),
}

TASK_NAMES: tuple[str, ...] = tuple(INSTRUCTIONS)  # the 50 Meta-World v3 tasks, without "-v3"

_MT10 = (
    "reach",
    "push",
    "pick-place",
    "door-open",
    "drawer-open",
    "drawer-close",
    "button-press-topdown",
    "peg-insert-side",
    "window-open",
    "window-close",
)
_ML10_TRAIN = (
    "reach",
    "push",
    "pick-place",
    "door-open",
    "drawer-close",
    "button-press-topdown",
    "peg-insert-side",
    "window-open",
    "sweep",
    "basketball",
)
_ML10_TEST = ("drawer-open", "door-close", "shelf-place", "sweep-into", "lever-pull")
_ML45_TEST = ("bin-picking", "box-close", "hand-insert", "door-lock", "door-unlock")


def _mw(names) -> tuple[str, ...]:
    return tuple(PREFIX + n for n in names)


# set name -> member task names (registry names); Meta-World's benchmarks in its own order
TASK_SETS: dict[str, tuple[str, ...]] = {
    "mw:mt10": _mw(_MT10),
    "mw:mt50": _mw(TASK_NAMES),
    "mw:ml10-train": _mw(_ML10_TRAIN),
    "mw:ml10-test": _mw(_ML10_TEST),
    "mw:ml45-train": _mw(n for n in TASK_NAMES if n not in _ML45_TEST),
    "mw:ml45-test": _mw(_ML45_TEST),
}


def env_name(task: str) -> str:
    """Meta-World's env name for a registry name: ``mw:drawer-open`` -> ``drawer-open-v3``."""
    return task.removeprefix(PREFIX) + "-v3"


def task_of_instruction(text: str) -> str | None:
    """The registry name of the task an instruction (canonical or paraphrase) names, or None."""
    key = " ".join(text.strip().lower().rstrip(".").split())
    return _BY_INSTRUCTION.get(key)


_BY_INSTRUCTION: dict[str, str] = {s: PREFIX + n for n, texts in INSTRUCTIONS.items() for s in texts}
