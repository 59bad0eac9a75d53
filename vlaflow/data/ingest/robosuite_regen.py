"""Observation regeneration for robosuite demos: reset a robosuite (1.5) env to every recorded MuJoCo state.

This is robomimic's ``dataset_states_to_obs`` without stepping: build the env from the file's env metadata,
load the demo's model XML when it still compiles (else fall back to the env's own model, only when the
state sizes match), then ``sim.set_state_from_flattened(state); sim.forward()`` and read the observations.
Used by :mod:`vlaflow.data.ingest.robosuite_hdf5` with ``regenerate_obs=True``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

import vlaflow.keys as K
from vlaflow.errors import IngestError

_CONTROLLER_RENAMES = {"damping": "damping_ratio", "damping_limits": "damping_ratio_limits"}


# robosuite's low-dim state as vlaflow stores it: per arm, eef position + quaternion + gripper qpos. Shared
# by the hdf5 reader (states recorded in the file) and the regenerator (states re-rendered by robosuite).
def _state_key_groups(names: list[str]) -> list[tuple[str, str, str | None]]:
    """(eef_pos, eef_quat, gripper_qpos|None) key triples, per arm (robot0_eef_pos, robot0_right_eef_pos)."""
    groups = []
    for pos in sorted(n for n in names if re.fullmatch(r"robot\d+_(?:\w+_)?eef_pos", n)):
        quat = pos[: -len("eef_pos")] + "eef_quat"
        grip = pos[: -len("eef_pos")] + "gripper_qpos"
        if quat in names:
            groups.append((pos, quat, grip if grip in names else None))
    return groups


def compose_state(obs: dict[str, np.ndarray]) -> np.ndarray | None:
    groups = _state_key_groups(list(obs))
    if not groups:
        return None
    parts = [obs[k] for g in groups for k in g if k is not None]
    return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1).astype(np.float32)


def state_names_of(obs_dims: dict[str, int]) -> list[str]:
    names: list[str] = []
    for g in _state_key_groups(list(obs_dims)):
        for k in g:
            if k is not None:
                names += [f"{k}[{i}]" for i in range(obs_dims[k])]
    return names


class Regenerator:
    """A robosuite env reset to recorded states (robomimic's dataset_states_to_obs, without stepping)."""

    def __init__(
        self,
        env_name: str,
        env_info: dict | None,
        env_args: dict | None,
        cameras: tuple[str, ...],
        image_size: int,
        src: Path,
    ) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")
        try:
            import robosuite
            from robosuite import macros
        except ImportError as e:
            raise IngestError(
                f"--regenerate-obs needs robosuite and mujoco (pip install 'vlaflow[sim]'): {e}"
            ) from e
        self.robosuite = robosuite
        self.src = src
        self.cameras = cameras
        self.image_size = image_size
        self.flip = macros.IMAGE_CONVENTION == "opengl"  # bottom row first: flip to the store's top-row-first
        self.warnings: list[str] = []
        self.xml_mode: str | None = None  # "model_file" once a demo XML loaded, "env_model" after a fallback
        self.state_names: list[str] = []
        self.kwargs = self._env_kwargs(env_name, env_info, env_args)
        self.env = self._make()

    def _env_kwargs(self, env_name: str, env_info: dict | None, env_args: dict | None) -> dict:
        from robosuite.controllers.composite.composite_controller_factory import (
            refactor_composite_controller_config,
        )

        if env_info is not None:
            kw = {k: v for k, v in env_info.items() if k != "env_name"}
        elif env_args is not None:
            kw = dict(env_args.get("env_kwargs", {}))
        else:
            raise IngestError(
                f"{self.src}: data.attrs has neither env_info nor env_args; cannot rebuild the env"
            )
        robots = kw.get("robots", "Panda")
        robots = [robots] if isinstance(robots, str) else list(robots)
        cc = kw.get("controller_configs")
        if cc is not None:
            # robosuite <= 1.4 stored one arm ("part") controller config; 1.5 wants a composite one per robot.
            cc = {_CONTROLLER_RENAMES.get(k, k): v for k, v in cc.items()}
            cc = [refactor_composite_controller_config(dict(cc), r, ["right"]) for r in robots]
            kw["controller_configs"] = cc if len(cc) > 1 else cc[0]
        kw.update(
            env_name=env_name,
            robots=robots if len(robots) > 1 else robots[0],
            has_renderer=False,
            has_offscreen_renderer=bool(self.cameras),
            use_camera_obs=bool(self.cameras),
            camera_names=list(self.cameras) or None,
            camera_heights=self.image_size,
            camera_widths=self.image_size,
            ignore_done=True,
            use_object_obs=True,
        )
        if not self.cameras:
            kw.pop("camera_names")
        for legacy in ("camera_depths", "render_gpu_device_id"):
            kw.pop(legacy, None)
        return kw

    def _make(self) -> Any:
        try:
            env = self.robosuite.make(**self.kwargs)
            env.reset()
        except Exception as e:
            raise IngestError(
                f"{self.src}: cannot build robosuite {self.robosuite.__version__} env "
                f"{self.kwargs.get('env_name')!r} "
                f"from the file's env metadata: {type(e).__name__}: {e}"
            ) from e
        return env

    def describe(self) -> dict:
        return {
            "robosuite_version": self.robosuite.__version__,
            "cameras": list(self.cameras),
            "image_size": self.image_size,
            "model": self.xml_mode,
            "state_names": self.state_names,
        }

    def _load_model(self, xml: str | None, demo: str, n_state: int) -> None:
        if self.xml_mode != "env_model" and xml is not None:
            import mujoco

            xml = self.env.edit_model_xml(xml)
            # compile it alone first: a failed reset_from_xml_string leaves the env closed (~5 s to rebuild)
            try:
                mujoco.MjModel.from_xml_string(xml)
            except Exception as e:  # a 1.4 XML often names assets that 1.5 no longer ships
                self.warnings.append(
                    f"data/{demo}: the recorded model XML does not load in robosuite "
                    f"{self.robosuite.__version__} "
                    f"({type(e).__name__}: {str(e)[:200]}); using the env's own model with the recorded "
                    "states (what the state lacks, e.g. object sizes or textures drawn at reset, may differ "
                    "from the recording)"
                )
                self.xml_mode = "env_model"
            else:
                try:
                    self.env.reset_from_xml_string(xml)
                    self.env.sim.reset()
                except Exception as e:
                    raise IngestError(
                        f"{self.src}: data/{demo}: the recorded model XML compiles but robosuite "
                        f"{self.robosuite.__version__} cannot set up {self.kwargs['env_name']} from it "
                        f"({type(e).__name__}: {e})"
                    ) from e
                self.xml_mode = "model_file"
        elif self.xml_mode is None:
            self.xml_mode = "env_model"
        size = self.env.sim.get_state().flatten().size
        if size != n_state:
            raise IngestError(
                f"{self.src}: data/{demo}: recorded states have {n_state} values per step but the robosuite "
                f"{self.robosuite.__version__} {self.kwargs['env_name']} model ({self.xml_mode}) has "
                f"{size}; the model "
                "changed between versions, so the recorded states cannot be replayed into it"
            )

    def observe(self, states: np.ndarray, model_xml: str | None, demo: str) -> dict[str, np.ndarray]:
        self._load_model(model_xml, demo, states.shape[1])
        sim = self.env.sim
        per_step: list[dict[str, np.ndarray]] = []
        for s in states:
            sim.set_state_from_flattened(s)
            sim.forward()
            per_step.append(self.env._get_observations(force_update=True))
        obs = {k: np.stack([o[k] for o in per_step]) for k in per_step[0]}
        out: dict[str, np.ndarray] = {}
        state = compose_state(obs)
        if state is None:
            raise IngestError(f"{self.src}: the robosuite env gives no robot*_eef_pos/eef_quat observations")
        out[K.OBS_STATE] = state
        self.state_names = state_names_of({k: v.shape[1] for k, v in obs.items() if v.ndim == 2})
        if "object-state" in obs:
            out["obs.object"] = obs["object-state"].astype(np.float32)
        for cam in self.cameras:
            img = obs[f"{cam}_image"]
            out[K.image_key(cam)] = np.ascontiguousarray(img[:, ::-1] if self.flip else img)
        out["_success"] = bool(self.env._check_success())
        return out

    def close(self) -> None:
        try:
            self.env.close()
        except Exception as e:  # closing a renderer must not hide a finished ingest
            self.warnings.append(f"closing the robosuite env failed: {e}")
