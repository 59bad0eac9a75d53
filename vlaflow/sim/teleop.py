"""Drive an arm task by hand and record episodes into an episode store (``vlaflow teleop``, in
:mod:`vlaflow.cli.sim`).

Input sources share one small interface, :class:`InputSource`: ``poll(step) -> TeleopCommand`` (an
end-effector motion in [-1, 1]^3 plus discrete events), ``show(frame)`` and ``close()``.

- :class:`KeyboardSource` (pygame window; needs a display): arrows / W-S-A-D move in x/y, R / F up /
  down, SPACE toggles the gripper, ENTER starts recording or stops and saves, BACKSPACE discards the
  recording, N resets the scene (new seed), ESC or Q quits. Paced at the task's control rate.
- :class:`JoystickSource` (a gamepad or a SpaceMouse that pygame exposes as a joystick, only when one is
  present): axes move the end effector, buttons toggle the gripper / start-stop / discard / quit.
- :class:`ScriptedKeys`: a list of ``(step, key)`` events using the keyboard's key names; runs headless
  and unpaced (tests, scripted demos). ``vlaflow teleop --script FILE.json`` reads such a list.

Recording semantics: ENTER starts an episode at the current scene; every step while recording stores
``obs[t]`` and the action applied at it. ENTER again (or the task's success) saves the episode and
resets the scene with the next seed; BACKSPACE drops it and resets. Each saved episode is appended to
the store at once (crash-safe: finished episodes survive a crash); quitting drops an unsaved recording.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from vlaflow.errors import VlaflowError

# Key names shared by the keyboard and scripted sources.
MOTION_KEYS: dict[str, tuple[int, float]] = {
    "up": (0, 1.0),  # +x (away from the robot base)
    "w": (0, 1.0),
    "down": (0, -1.0),
    "s": (0, -1.0),
    "left": (1, 1.0),  # +y
    "a": (1, 1.0),
    "right": (1, -1.0),
    "d": (1, -1.0),
    "r": (2, 1.0),  # +z
    "f": (2, -1.0),
}
EVENT_KEYS: dict[str, str] = {
    "space": "gripper",
    "return": "start_stop",
    "enter": "start_stop",
    "backspace": "discard",
    "n": "reset",
    "escape": "quit",
    "q": "quit",
}
ARM_TASKS = ("pick_place", "lift", "can")


@dataclass
class TeleopCommand:
    """One control tick's input: a motion direction and the discrete events pressed this tick."""

    motion: np.ndarray = field(default_factory=lambda: np.zeros(3))  # end-effector direction, each in [-1, 1]
    events: set[str] = field(
        default_factory=set
    )  # subset of {"gripper", "start_stop", "discard", "reset", "quit"}


class InputSource(Protocol):
    def poll(self, step: int) -> TeleopCommand: ...

    def show(self, frame: np.ndarray | None) -> None: ...

    def close(self) -> None: ...


def command_from_keys(keys: list[str]) -> TeleopCommand:
    """Turn key names pressed in one tick into a command; unknown names raise (naming the key)."""
    cmd = TeleopCommand()
    for key in keys:
        k = key.lower()
        if k in MOTION_KEYS:
            axis, sign = MOTION_KEYS[k]
            cmd.motion[axis] = np.clip(cmd.motion[axis] + sign, -1.0, 1.0)
        elif k in EVENT_KEYS:
            cmd.events.add(EVENT_KEYS[k])
        else:
            known = ", ".join(sorted({*MOTION_KEYS, *EVENT_KEYS}))
            raise VlaflowError(f"teleop: unknown key {key!r}; keys are: {known}")
    return cmd


class ScriptedKeys:
    """Key presses from a list of ``(step, key)`` events; a key listed at step t acts at tick t only."""

    def __init__(self, events: list[tuple[int, str]], max_steps: int | None = None) -> None:
        self._by_step: dict[int, list[str]] = {}
        for i, ev in enumerate(events):
            if len(ev) != 2 or not isinstance(ev[0], int) or not isinstance(ev[1], str):
                raise VlaflowError(f"teleop script: event {i} must be [step, key], got {ev!r}")
            command_from_keys([ev[1]])  # validates the key name now, not mid-session
            self._by_step.setdefault(ev[0], []).append(ev[1])
        last = max(self._by_step, default=0)
        self.max_steps = max_steps if max_steps is not None else last + 1  # quit after the last event

    def poll(self, step: int) -> TeleopCommand:
        cmd = command_from_keys(self._by_step.get(step, []))
        if step >= self.max_steps:
            cmd.events.add("quit")
        return cmd

    def show(self, frame: np.ndarray | None) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def from_json(path: str | os.PathLike) -> ScriptedKeys:
        p = Path(path)
        try:
            events = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VlaflowError(
                f"teleop script {p}: cannot read a JSON list of [step, key] events: {e}"
            ) from e
        if not isinstance(events, list):
            raise VlaflowError(
                f"teleop script {p}: expected a JSON list of [step, key], got {type(events).__name__}"
            )
        return ScriptedKeys([tuple(e) if isinstance(e, list) else e for e in events])


def has_display() -> bool:
    """A window can open (SDL_VIDEODRIVER=dummy counts: pygame then runs windowless, as in tests)."""
    if os.environ.get("SDL_VIDEODRIVER") == "dummy" or os.name == "nt":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class KeyboardSource:
    """pygame window showing the scene; held keys move, tapped keys toggle. Paced at ``fps``."""

    _PYGAME_KEYS = {
        "up": "K_UP", "down": "K_DOWN", "left": "K_LEFT", "right": "K_RIGHT",
        "w": "K_w", "s": "K_s", "a": "K_a", "d": "K_d", "r": "K_r", "f": "K_f",
    }  # fmt: skip
    _EVENT_KEYS = {
        "K_SPACE": "space", "K_RETURN": "return", "K_KP_ENTER": "enter", "K_BACKSPACE": "backspace",
        "K_n": "n", "K_ESCAPE": "escape", "K_q": "q",
    }  # fmt: skip

    def __init__(self, fps: float, window: int = 512, title: str = "vlaflow teleop") -> None:
        if not has_display():
            raise VlaflowError("teleop: no display (DISPLAY unset); use --script FILE.json for headless runs")
        try:
            import pygame
        except ImportError as e:
            raise VlaflowError("teleop: the keyboard source needs pygame (pip install pygame)") from e
        self.pg = pygame
        pygame.init()
        self.screen = pygame.display.set_mode((window, window))
        pygame.display.set_caption(
            title + "  [arrows/WASD move, R/F up/down, SPACE grip, ENTER rec, BKSP drop]"
        )
        self.clock = pygame.time.Clock()
        self.fps = fps
        self.window = window

    def poll(self, step: int) -> TeleopCommand:
        pg = self.pg
        keys: list[str] = []
        for ev in pg.event.get():
            if ev.type == pg.QUIT:
                keys.append("escape")
            elif ev.type == pg.KEYDOWN:
                for attr, name in self._EVENT_KEYS.items():
                    if ev.key == getattr(pg, attr):
                        keys.append(name)
        pressed = pg.key.get_pressed()
        keys += [name for name, attr in self._PYGAME_KEYS.items() if pressed[getattr(pg, attr)]]
        self.clock.tick(self.fps)
        return command_from_keys(keys)

    def show(self, frame: np.ndarray | None) -> None:
        if frame is None:
            return
        surf = self.pg.surfarray.make_surface(np.ascontiguousarray(frame.transpose(1, 0, 2)))
        self.screen.blit(self.pg.transform.scale(surf, (self.window, self.window)), (0, 0))
        self.pg.display.flip()

    def close(self) -> None:
        self.pg.quit()


class JoystickSource(KeyboardSource):
    """A pygame joystick (gamepad, or a SpaceMouse exposed as one): axes 0/1 -> x/y, axis 3 -> z.

    Buttons: 0 gripper, 1 start/stop, 2 discard, 3 reset, 4 quit. The keyboard still works too.
    """

    BUTTONS = {0: "gripper", 1: "start_stop", 2: "discard", 3: "reset", 4: "quit"}

    def __init__(self, fps: float, deadzone: float = 0.15) -> None:
        super().__init__(fps, title="vlaflow teleop (joystick)")
        self.pg.joystick.init()
        if self.pg.joystick.get_count() == 0:
            self.close()
            raise VlaflowError("teleop: no joystick/gamepad/SpaceMouse found by pygame; use --input keyboard")
        self.js = self.pg.joystick.Joystick(0)
        self.deadzone = deadzone

    def poll(self, step: int) -> TeleopCommand:
        cmd = super().poll(step)
        axes = [self.js.get_axis(i) if i < self.js.get_numaxes() else 0.0 for i in (1, 0, 3)]
        joy = -np.array(axes)  # stick forward is negative on most pads
        joy[np.abs(joy) < self.deadzone] = 0.0
        cmd.motion = np.clip(cmd.motion + joy, -1.0, 1.0)
        for b, name in self.BUTTONS.items():
            if b < self.js.get_numbuttons() and self.js.get_button(b):
                cmd.events.add(name)
        return cmd


def arm_action(action_dim: int, motion: np.ndarray, gripper_closed: bool, speed: float) -> np.ndarray:
    """A task action from an end-effector motion: [dx, dy, dz, g] (pick_place) or OSC_POSE + g (robosuite)."""
    g = 1.0 if gripper_closed else -1.0
    m = np.clip(np.asarray(motion, dtype=np.float32) * speed, -1.0, 1.0)
    if action_dim == 4:
        return np.array([*m, g], dtype=np.float32)
    if action_dim == 7:
        return np.array([*m, 0.0, 0.0, 0.0, g], dtype=np.float32)
    raise VlaflowError(
        f"teleop: no end-effector mapping for an action of {action_dim} dims (arm tasks: 4 or 7)"
    )


@dataclass
class TeleopResult:
    saved: int = 0  # episodes written
    discarded: int = 0  # recordings dropped (discard key, or unsaved at quit)
    steps: int = 0  # control ticks run
    saved_lengths: list[int] = field(default_factory=list)


def open_or_create_store(out: str, keys: dict, fps: float, attrs: dict):
    """Append to an existing store whose schema matches, else create one."""
    from vlaflow.data.store import EpisodeStore

    if Path(out).exists():
        store = EpisodeStore.open(out, mode="a")
        have = {k: (s.dtype, tuple(s.shape)) for k, s in store.keys.items()}
        want = {k: (s.dtype, tuple(s.shape)) for k, s in keys.items()}
        if have != want:
            raise VlaflowError(
                f"teleop: store {out} has keys {have}, this task records {want}; use a new --out"
            )
        info = dict(store.attrs.get("teleop") or {})
        n_teleop = sum(store.episode_meta(i)["source"].endswith(":teleop") for i in range(store.n_episodes))
        if len(info.get("episode_seeds", [])) > n_teleop:  # a session killed between seed and episode
            info["episode_seeds"] = info["episode_seeds"][:n_teleop]
            store.root.attrs.update({"teleop": info})
        return store
    return EpisodeStore.create(out, keys=keys, fps=fps, attrs=attrs)


def teleop(
    task: str,
    out: str,
    source: InputSource,
    obs_mode: str = "lowdim",
    seed: int = 0,
    speed: float = 1.0,
    auto_save_on_success: bool = True,
    env_kwargs: dict | None = None,
    show: bool = True,
) -> TeleopResult:
    """Run a teleop session until the source says quit; returns what was recorded."""
    from vlaflow.sim.collect import store_keys, task_attrs
    from vlaflow.sim.tasks import make_env

    if task not in ARM_TASKS:
        raise VlaflowError(f"teleop: task {task!r} is not an arm task; teleop drives: {', '.join(ARM_TASKS)}")
    env = make_env(task, obs_mode=obs_mode, **(env_kwargs or {}))
    spec = env.task_spec
    if hasattr(source, "fps"):
        source.fps = spec.fps  # pace interactive sources at the task's control rate
    res = TeleopResult()
    try:
        store = open_or_create_store(
            out, store_keys(spec), spec.fps, {"env": task_attrs(spec, obs_mode), "teleop": {"seed": seed}}
        )
        episode_seed = seed
        obs, _ = env.reset(seed=episode_seed)
        gripper_closed = False
        recording = False
        buf: dict[str, list[np.ndarray]] = {}
        ep_success = False

        def reset_scene() -> None:
            nonlocal obs, episode_seed, gripper_closed, recording, buf, ep_success
            episode_seed += 1
            obs, _ = env.reset(seed=episode_seed)
            gripper_closed, recording, buf, ep_success = False, False, {}, False

        def save() -> None:
            data = {k: np.stack(v) for k, v in buf.items()}
            # scene seed of every saved episode (reproduces its start); appended sessions extend the list.
            # Written before the episode: a kill between the two leaves one seed too many, which
            # open_or_create_store trims, never an episode without its seed.
            info = dict(store.root.attrs.get("teleop", {}))
            info["episode_seeds"] = [*info.get("episode_seeds", []), episode_seed]
            store.root.attrs.update({"teleop": info})
            store.append_episode(data, task=spec.instruction, source=f"sim:{task}:teleop", success=ep_success)
            res.saved += 1
            res.saved_lengths.append(len(buf["action"]))

        step = 0
        while True:
            cmd = source.poll(step)
            if show:
                source.show(env.render())
            if "quit" in cmd.events:
                if recording and buf:
                    res.discarded += 1
                    print(f"teleop: quit with an unsaved recording of {len(buf['action'])} steps (dropped)")
                break
            if "discard" in cmd.events:
                if recording:
                    res.discarded += 1
                reset_scene()
            elif "reset" in cmd.events and not recording:
                reset_scene()
            elif "start_stop" in cmd.events:
                if recording:
                    if buf:
                        save()
                    reset_scene()
                else:
                    recording, buf, ep_success = True, {}, False
            if "gripper" in cmd.events:
                gripper_closed = not gripper_closed
            action = arm_action(spec.action_dim, cmd.motion, gripper_closed, speed)
            if recording:
                for k, v in obs.items():
                    buf.setdefault(k, []).append(v)
                buf.setdefault("action", []).append(action)
            obs, _, terminated, _, info = env.step(action)
            step += 1
            if recording and info.get("success"):
                ep_success = True
                if auto_save_on_success:
                    save()
                    reset_scene()
        res.steps = step
    finally:
        env.close()
        source.close()
    return res
