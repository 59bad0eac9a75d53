"""robosuite / robomimic hdf5 demonstrations -> episode store.

Source layout (robosuite's ``collect_human_demonstrations`` and robomimic's datasets)::

    data.attrs: env ("Lift"), env_info (robosuite JSON) or env_args (robomimic JSON), repository_version, ...
    data/demo_N/states   (T, S) float64  flattened MuJoCo state [time, qpos, qvel]
    data/demo_N/actions  (T, Da)         the recorded actions
    data/demo_N.attrs["model_file"]      the MuJoCo XML of that demo (robosuite >= 1.2: the XML itself;
                                         1.0: a file name under models/ beside the hdf5)
    data/demo_N/obs/<key>, rewards, dones  (robomimic only)

What lands in the store:

- ``action``: the recorded actions, dtype kept (float64 stays float64, so the values are bit-identical).
- ``obs.sim_state``: the flattened MuJoCo states, float64, bit-identical.
- robomimic ``obs/<key>`` -> ``obs.<key>``; ``<cam>_image`` -> ``obs.image.<cam>`` as stored (robomimic
  already flips robosuite's renders to top-row-first; see ``flip_dataset_images``); ``rewards`` ->
  ``reward``, ``dones`` -> ``done``. When the eef pose and gripper keys are there, ``obs.state`` =
  [eef_pos, eef_quat, gripper_qpos] per robot (float32), as the regenerated path writes it.
- With ``regenerate_obs=True`` (needs robosuite): ``obs.state`` (same layout), ``obs.object`` (the env's
  object-state vector) and ``obs.image.<cam>`` rendered by resetting an env to every recorded state.

Store attrs ``robosuite``: env_name, env_info / env_args (parsed JSON), repository_version, date/time,
source file, demo names, and the per-episode model XML: ``model_xml`` maps a sha1 to zlib+base64 text
(identical XMLs are kept once) and ``episode_model`` lists that sha1 per episode (None where the file had
none). Use :func:`episode_model_xml` to read one back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

import vlaflow.keys as K
from vlaflow.data.ingest.robosuite_regen import Regenerator, compose_state, state_names_of
from vlaflow.errors import IngestError

FORMAT = "robosuite-hdf5"

# Instruction text per robosuite env; other names become their CamelCase words in lower case.
TASK_TEXT: dict[str, str] = {
    "Lift": "lift the cube",
    "Stack": "stack the red cube on the green cube",
    "NutAssembly": "fit the square nut and the round nut onto their pegs",
    "NutAssemblySingle": "fit the nut onto its peg",
    "NutAssemblySquare": "fit the square nut onto the square peg",
    "NutAssemblyRound": "fit the round nut onto the round peg",
    "PickPlace": "pick each object and place it into its bin",
    "PickPlaceSingle": "pick the object and place it into its bin",
    "PickPlaceMilk": "pick the milk carton and place it into its bin",
    "PickPlaceBread": "pick the bread and place it into its bin",
    "PickPlaceCereal": "pick the cereal box and place it into its bin",
    "PickPlaceCan": "pick the can and place it into its bin",
    "Door": "open the door",
    "Wipe": "wipe the markings off the table",
    "ToolHang": "hang the tool on the hook",
    "TwoArmLift": "lift the pot with both arms",
    "TwoArmPegInHole": "insert the peg into the hole",
    "TwoArmHandover": "hand the hammer over from one arm to the other",
    "TwoArmTransport": "transport the object from one bin to the other",
}

DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")
DEFAULT_FPS = 20  # robosuite's default control_freq


def task_text(env_name: str) -> str:
    if env_name in TASK_TEXT:
        return TASK_TEXT[env_name]
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", env_name)
    return " ".join(w.lower() for w in words) or env_name


def detect(src: Path) -> bool:
    src = Path(src)
    if not src.is_file() or src.suffix.lower() not in (".hdf5", ".h5", ".hdf"):
        return False
    with open(src, "rb") as f:
        if f.read(8) != b"\x89HDF\r\n\x1a\n":
            return False
    try:
        import h5py

        with h5py.File(src, "r") as h:
            return "data" in h and any(k.startswith("demo") for k in h["data"].keys())
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- reading
def _demo_sort_key(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 1 << 62, name)


def _json_attr(data_attrs: Any, name: str, src: Path) -> dict | None:
    if name not in data_attrs:
        return None
    raw = data_attrs[name]
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise IngestError(f"{src}: data.attrs[{name!r}] is not valid JSON ({e})") from e


def _str_attr(attrs: Any, name: str) -> str | None:
    if name not in attrs:
        return None
    v = attrs[name]
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_model_xml(src: Path, demo: str, raw: str | None) -> tuple[str | None, str | None]:
    """-> (xml, warning). robosuite 1.0 stored a file name under models/ beside the hdf5."""
    if raw is None:
        return None, f"data/{demo} has no model_file attribute"
    if raw.lstrip().startswith("<"):
        return raw, None
    for cand in (src.parent / "models" / raw, src.parent / raw):
        if cand.is_file():
            return cand.read_text(), None
    return None, f"data/{demo}.attrs['model_file'] names {raw!r}, not found in {src.parent / 'models'}"


def _check_finite(arr: np.ndarray, src: Path, key: str) -> None:
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = np.argwhere(bad)[0]
            raise IngestError(
                f"{src}: {key} has a non-finite value ({arr[tuple(idx)]}) at step {idx[0]}"
                + (f", dim {tuple(int(i) for i in idx[1:])}" if len(idx) > 1 else "")
            )


def _read_demo(
    h5: Any, src: Path, demo: str, max_steps: int | None, flip_images: bool = False
) -> dict[str, np.ndarray]:
    g = h5["data"][demo]
    for need in ("actions", "states"):
        if need not in g:
            raise IngestError(f"{src}: data/{demo} has no '{need}' dataset (found: {sorted(g.keys())})")
    try:
        actions = g["actions"][()]
        states = g["states"][()]
    except OSError as e:
        raise IngestError(f"{src}: cannot read data/{demo} (truncated or corrupt file?): {e}") from e
    if actions.ndim != 2 or states.ndim != 2:
        raise IngestError(
            f"{src}: data/{demo}: expected actions (T, Da) and states (T, S), found {actions.shape} and "
            f"{states.shape}"
        )
    if len(actions) != len(states):
        raise IngestError(
            f"{src}: data/{demo}: actions has {len(actions)} steps but states has {len(states)} (expected "
            "equal)"
        )
    if len(actions) == 0:
        raise IngestError(f"{src}: data/{demo} is empty (0 steps)")
    _check_finite(actions, src, f"data/{demo}/actions")
    _check_finite(states, src, f"data/{demo}/states")
    T = len(actions) if max_steps is None else min(len(actions), max_steps)
    out = {K.ACTION: actions[:T], "obs.sim_state": states[:T]}
    if "obs" in g:
        for name in sorted(g["obs"].keys()):
            arr = g["obs"][name][()]
            if len(arr) != len(actions):
                raise IngestError(
                    f"{src}: data/{demo}/obs/{name} has {len(arr)} steps, actions has {len(actions)} "
                    "(expected equal)"
                )
            arr = arr[:T]
            if name.endswith("_image") and arr.ndim == 4:
                if arr.dtype != np.uint8:
                    raise IngestError(
                        f"{src}: data/{demo}/obs/{name}: expected uint8 images, found {arr.dtype}"
                    )
                # robomimic's get_observation already flipped robosuite's bottom-row-first renders.
                out[K.image_key(name[: -len("_image")])] = arr[:, ::-1] if flip_images else arr
            else:
                out[f"obs.{name}"] = arr.reshape(T, -1) if arr.ndim == 1 else arr
        state = compose_state({k[len("obs.") :]: v for k, v in out.items() if k.startswith("obs.")})
        if state is not None:
            out[K.OBS_STATE] = state
    for src_key, dst_key in (("rewards", "reward"), ("dones", "done")):
        if src_key in g:
            arr = g[src_key][()]
            if arr.shape[:1] != (len(actions),):
                raise IngestError(
                    f"{src}: data/{demo}/{src_key} has shape {arr.shape}, expected ({len(actions)},) like "
                    "actions"
                )
            out[dst_key] = arr[:T]
    return out


def episode_model_xml(store: Any, episode: int) -> str | None:
    """The MuJoCo XML recorded with ``episode`` in a store this adapter wrote (None if there was none)."""
    meta = store.attrs.get("robosuite", {})
    sha = meta.get("episode_model", [])[episode]
    if sha is None:
        return None
    return zlib.decompress(base64.b64decode(meta["model_xml"][sha])).decode()


# ----------------------------------------------------------------------------------------------- ingest
def ingest(
    src: str | Path,
    dest: str | Path,
    *,
    regenerate_obs: bool = False,
    cameras: tuple[str, ...] | list[str] = DEFAULT_CAMERAS,
    image_size: int = 84,
    max_steps_per_episode: int | None = None,
    max_episodes: int | None = None,
    task: str | None = None,
    fps: float | None = None,
    flip_dataset_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Import a robosuite/robomimic hdf5 file into a new store at ``dest`` (written atomically).

    Images in the store are top-row-first. robosuite renders bottom-row-first (its default OpenGL convention):
    regenerated images are flipped accordingly, and robomimic datasets are already flipped by robomimic
    (``EnvRobosuite.get_observation``: ``di[k][::-1]``). ``flip_dataset_images=True`` flips a file's stored
    ``obs/*_image`` for files recorded from raw robosuite observations.
    """
    import h5py
    from tqdm import tqdm

    from vlaflow.data.store import KeySpec, atomic_store

    src = Path(src)
    if max_steps_per_episode is not None and max_steps_per_episode < 1:
        raise IngestError(f"max_steps_per_episode must be >= 1, got {max_steps_per_episode}")
    if max_episodes is not None and max_episodes < 1:
        raise IngestError(f"max_episodes must be >= 1, got {max_episodes}")
    if image_size < 8:
        raise IngestError(f"image_size must be >= 8, got {image_size}")
    if not src.is_file():
        raise IngestError(f"{src}: no such file")
    try:
        h5 = h5py.File(src, "r")
    except OSError as e:
        raise IngestError(f"{src}: cannot open as HDF5 (truncated or corrupt file?): {e}") from e
    with h5:
        if "data" not in h5:
            raise IngestError(
                f"{src}: no 'data' group (found: {sorted(h5.keys())}); not a robosuite/robomimic file"
            )
        try:
            demos = sorted((k for k in h5["data"].keys() if k.startswith("demo")), key=_demo_sort_key)
        except (OSError, RuntimeError) as e:
            raise IngestError(f"{src}: cannot list data/ (truncated or corrupt file?): {e}") from e
        if not demos:
            raise IngestError(f"{src}: data/ holds no demo_* groups")
        if max_episodes is not None:
            demos = demos[:max_episodes]
        dattrs = h5["data"].attrs
        env_info = _json_attr(dattrs, "env_info", src)
        env_args = _json_attr(dattrs, "env_args", src)
        env_name = (
            _str_attr(dattrs, "env")
            or (env_info or {}).get("env_name")
            or (env_args or {}).get("env_name")
            or "unknown"
        )
        fps = float(fps or ((env_args or {}).get("env_kwargs", {}).get("control_freq")) or DEFAULT_FPS)
        models, warnings = {}, []
        episode_model: list[str | None] = []
        for d in demos:
            xml, warn = _read_model_xml(src, d, _str_attr(h5["data"][d].attrs, "model_file"))
            if warn:
                warnings.append(warn)
            if xml is None:
                episode_model.append(None)
                continue
            sha = hashlib.sha1(xml.encode()).hexdigest()
            models.setdefault(sha, base64.b64encode(zlib.compress(xml.encode(), 9)).decode())
            episode_model.append(sha)
        text = task or task_text(env_name)

        def _model_of(i: int) -> str | None:
            sha = episode_model[i]
            return None if sha is None else zlib.decompress(base64.b64decode(models[sha])).decode()

        filter_keys = {}
        if "mask" in h5:  # robomimic's train/valid splits: mask/<name> = demo names
            for name, ds in h5["mask"].items():
                filter_keys[name] = [v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]]
        attrs = {
            "robosuite": {
                "env_name": env_name,
                "env_info": env_info,
                "env_args": env_args,
                "repository_version": _str_attr(dattrs, "repository_version"),
                "date": _str_attr(dattrs, "date"),
                "time": _str_attr(dattrs, "time"),
                "source_file": str(src.resolve()),
                "demos": demos,
                "model_xml": models,
                "episode_model": episode_model,
                "filter_keys": filter_keys,
                "dataset_images_flipped": bool(flip_dataset_images),
            }
        }

        first = _read_demo(h5, src, demos[0], max_steps_per_episode, flip_dataset_images)
        regen = None
        if regenerate_obs:
            regen = Regenerator(env_name, env_info, env_args, tuple(cameras), image_size, src)
            first.update(regen.observe(first["obs.sim_state"], _model_of(0), demos[0]))
            attrs["robosuite"]["regenerated"] = regen.describe()
        keyspecs = {}
        for k, v in first.items():
            if k.startswith("_"):
                continue
            names = None
            if k == K.OBS_STATE:
                names = (
                    regen.state_names
                    if regen is not None
                    else state_names_of(
                        {kk[len("obs.") :]: first[kk].shape[1] for kk in first if kk.startswith("obs.")}
                    )
                )
            keyspecs[k] = KeySpec(str(v.dtype), tuple(v.shape[1:]), names=names or None)

        n_steps = 0
        successes: list[bool | None] = []
        with atomic_store(dest, keys=keyspecs, fps=fps, attrs=attrs, overwrite=overwrite) as store:
            bar = tqdm(demos, desc=f"ingest {src.name}", unit="demo", disable=not progress)
            for i, d in enumerate(bar):
                ep = first if i == 0 else _read_demo(h5, src, d, max_steps_per_episode, flip_dataset_images)
                if regen is not None and i > 0:
                    ep.update(regen.observe(ep["obs.sim_state"], _model_of(i), d))
                success = ep.pop("_success", None)
                for k, spec in keyspecs.items():
                    if k not in ep:
                        raise IngestError(f"{src}: data/{d} lacks {k!r}, which data/{demos[0]} has")
                    if tuple(ep[k].shape[1:]) != tuple(spec.shape):
                        raise IngestError(
                            f"{src}: data/{d}: {k!r} has per-step shape {tuple(ep[k].shape[1:])}, "
                            f"expected {tuple(spec.shape)} like data/{demos[0]}"
                        )
                extra = set(ep) - set(keyspecs)
                if extra:
                    raise IngestError(f"{src}: data/{d} has keys {sorted(extra)} that data/{demos[0]} lacks")
                if success is None and "reward" in ep:
                    success = bool(np.any(ep["reward"] >= 1.0))
                successes.append(success)
                store.append_episode(
                    {k: ep[k] for k in keyspecs},
                    task=text,
                    source=f"robosuite:{src.name}:{d}",
                    success=success,
                )
                n_steps += len(ep[K.ACTION])
        if regen is not None:
            regen.close()
    return {
        "n_episodes": len(demos),
        "n_steps": n_steps,
        "fps": fps,
        "env_name": env_name,
        "task": text,
        "keys": {k: {"dtype": s.dtype, "shape": list(s.shape)} for k, s in keyspecs.items()},
        "successes": successes,
        "warnings": warnings + (regen.warnings if regen is not None else []),
    }
