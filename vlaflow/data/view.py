"""Look at one episode of a store: camera frames, state / action curves, instruction, success.

Two outputs, both headless:

- a Rerun recording (``.rrd``, what LeRobot's dataset viewer uses): cameras under ``obs/image/<camera>``,
  every other per-step key as a scalar plot under its key with dots as slashes (``action``,
  ``obs/state``), the instruction and the episode's metadata as text under ``episode/``; timelines
  ``step`` (sequence) and ``time`` (seconds, when the store knows its fps). :func:`write_rrd` writes it
  without a viewer; :func:`spawn_viewer` opens one where a display exists.
- a folder that needs no viewer (:func:`write_folder`): one H.264 mp4 per camera (PyAV, through
  :mod:`vlaflow.data.video`), ``curves.png`` (matplotlib, one panel per key), ``frames.png`` (a few frames
  per camera), ``episode.json`` (what was written and the episode's metadata).

``rerun-sdk`` (extra ``view``) and matplotlib are imported only by the functions that need them.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import vlaflow.keys as K
from vlaflow.data.store import EpisodeStore, KeySpec
from vlaflow.data.video import write_video
from vlaflow.errors import StoreError, VlaflowError

# A curve panel with more dimensions than this is skipped (a flattened image or point cloud is not a plot).
MAX_CURVE_DIMS = 64
# The fps videos and the ``time`` timeline assume for a store that does not record its own.
FALLBACK_FPS = 10.0
APPLICATION_ID = "vlaflow_view"


@dataclass
class EpisodeView:
    """One episode, read into memory: what both outputs draw."""

    store: str  # the store's path, as given
    episode: int  # index in the store
    n_steps: int
    fps: float | None  # the store's fps (None: unknown)
    task: str  # instruction text ("" when the store has none)
    success: bool | None
    source: str
    cameras: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> (T, H, W, 3) uint8
    curves: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (T, D) float64
    names: dict[str, list[str]] = field(default_factory=dict)  # key -> D per-dimension names
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it is not drawn

    def entity(self, key: str) -> str:
        """The Rerun entity path of a key (``obs.state`` -> ``obs/state``)."""
        return key.replace(".", "/")

    def camera_entity(self, camera: str) -> str:
        return self.entity(K.image_key(camera))

    @property
    def times(self) -> np.ndarray:
        return np.arange(self.n_steps) / float(self.fps or FALLBACK_FPS)


def _camera_name(key: str, spec: KeySpec) -> str | None:
    """The camera a key holds, or None: vlaflow's ``obs.image.<camera>`` keys, and in a diffusion_policy
    store (read-only, roles unknown) any (H, W, 3) key such as ``img``."""
    if K.is_image(key):
        return K.camera_of(key)
    if spec.role == K.ROLE_IMAGE or (
        len(spec.shape) == 3 and spec.shape[-1] in (1, 3) and min(spec.shape[:2]) >= 8
    ):
        return key
    return None


def _as_rgb_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype != np.uint8:  # diffusion_policy stores keep images as float32 0..255
        frames = np.clip(np.nan_to_num(frames), 0, 255).astype(np.uint8)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def _dim_names(spec: KeySpec, d: int) -> list[str]:
    if spec.names and len(spec.names) == d:
        return [str(n) for n in spec.names]
    if len(spec.shape) > 1:  # (9, 2) keypoints -> "3,1"
        return [",".join(map(str, ix)) for ix in np.ndindex(*spec.shape)]
    return [str(i) for i in range(d)]


def load_episode(store: str | os.PathLike | EpisodeStore, episode: int = 0) -> EpisodeView:
    """Read episode ``episode`` of a store; an index out of range names the store's episode count."""
    s = store if isinstance(store, EpisodeStore) else EpisodeStore.open(store)
    n = s.n_episodes
    if n == 0:
        raise StoreError(f"{s.path}: the store has no finished episodes; nothing to view")
    if not isinstance(episode, (int, np.integer)) or not 0 <= int(episode) < n:
        raise StoreError(f"{s.path}: episode {episode} out of range: the store has {n} episodes (0..{n - 1})")
    episode = int(episode)
    s.require_intact()  # a store with missing chunks reads zeros there: never draw those as data
    meta = s.episode_meta(episode)
    data = s.get_episode(episode)
    v = EpisodeView(
        store=str(s.path),
        episode=episode,
        n_steps=int(s.episode_lengths[episode]),
        fps=float(s.fps) if s.fps else None,
        task=str(meta.get("task") or ""),
        success=meta.get("success"),
        source=str(meta.get("source") or ""),
    )
    for key, spec in s.keys.items():
        arr = data[key]
        cam = _camera_name(key, spec)
        if cam is not None:
            v.cameras[cam] = _as_rgb_uint8(arr)
            continue
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            v.skipped[key] = f"dtype {arr.dtype} is not numeric"
            continue
        flat = arr.reshape(len(arr), -1).astype(np.float64)
        if flat.shape[1] > MAX_CURVE_DIMS:
            v.skipped[key] = f"{flat.shape[1]} dimensions per step (more than {MAX_CURVE_DIMS} to plot)"
            continue
        v.curves[key] = flat
        v.names[key] = _dim_names(spec, flat.shape[1])
    # action first, then state, then the rest in the store's order: the two curves a person looks for
    order = {K.ACTION: 0, K.OBS_STATE: 1}
    v.curves = dict(sorted(v.curves.items(), key=lambda kv: order.get(kv[0], 2)))
    return v


def _info_markdown(v: EpisodeView) -> str:
    ok = {True: "yes", False: "no", None: "unknown"}[v.success]
    fps = f"{v.fps:g} Hz" if v.fps else f"unknown (time axis assumes {FALLBACK_FPS:g} Hz)"
    lines = [
        f"# episode {v.episode} of {v.store}",
        "",
        f"- instruction: {v.task or '(none)'}",
        f"- success: {ok}",
        f"- steps: {v.n_steps} at {fps}",
        f"- source: {v.source or '(unknown)'}",
        f"- cameras: {', '.join(v.cameras) or '(none)'}",
        f"- curves: {', '.join(v.curves) or '(none)'}",
    ]
    lines += [f"- not drawn: {k} ({why})" for k, why in v.skipped.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- rerun
def _rerun():
    try:
        import rerun as rr
    except ImportError as e:
        raise VlaflowError(
            "the Rerun viewer needs rerun-sdk: pip install 'vlaflow[view]' (or use --out DIR for mp4 + PNG, "
            "which needs no viewer)"
        ) from e
    return rr


def log_episode(rec, v: EpisodeView, jpeg_quality: int = 0) -> list[str]:
    """Log ``v`` into the Rerun recording stream ``rec``; returns the entity paths logged.

    ``jpeg_quality`` > 0 stores camera frames as JPEG (a tenth of the size for big cameras); 0 keeps them
    raw (bit-exact, 27 KB per 96x96 frame).
    """
    rr = _rerun()
    steps = np.arange(v.n_steps, dtype=np.int64)
    indexes = [rr.TimeColumn("step", sequence=steps), rr.TimeColumn("time", duration=v.times)]
    paths = ["episode/info", "episode/task"]
    rec.log("episode/info", rr.TextDocument(_info_markdown(v), media_type=rr.MediaType.MARKDOWN), static=True)
    rec.log("episode/task", rr.TextDocument(v.task or "(no instruction)"), static=True)
    for key, values in v.curves.items():
        path = v.entity(key)
        rec.log(path, rr.SeriesLines(names=v.names[key]), static=True)
        rec.send_columns(path, indexes=indexes, columns=rr.Scalars.columns(scalars=values))
        paths.append(path)
    if v.success is not None:  # a constant line on the plots' time axis is easy to miss: text + scalar
        rec.send_columns(
            "episode/success",
            indexes=indexes,
            columns=rr.Scalars.columns(scalars=np.full(v.n_steps, float(v.success))),
        )
        paths.append("episode/success")
    for cam, frames in v.cameras.items():
        path = v.camera_entity(cam)
        for i, img in enumerate(frames):
            rec.set_time("step", sequence=i)
            rec.set_time("time", duration=float(v.times[i]))
            im = rr.Image(img)
            rec.log(path, im.compress(jpeg_quality=jpeg_quality) if jpeg_quality > 0 else im)
        paths.append(path)
    return paths


def _temp_file(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_rrd(v: EpisodeView, path: str | os.PathLike, jpeg_quality: int = 0) -> list[str]:
    """Write ``v`` as a Rerun recording at ``path`` (temp file, then renamed: a kill never leaves half a
    recording under the name); returns the entity paths. The caller checks the overwrite rule."""
    rr = _rerun()
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_file(dest)
    rec = rr.RecordingStream(APPLICATION_ID, recording_id=f"{Path(v.store).name}-episode-{v.episode}")
    try:
        rec.save(str(tmp))
        paths = log_episode(rec, v, jpeg_quality)
        rec.flush()
        rec.disconnect()  # closes the file sink (writes the footer)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return paths


def has_display() -> bool:
    """Whether a viewer window could open here (X11 / Wayland on Linux; assumed elsewhere)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def spawn_viewer(v: EpisodeView, jpeg_quality: int = 0) -> list[str]:
    """Start the Rerun viewer (a separate process that outlives this one) and stream ``v`` into it."""
    if not has_display():
        raise VlaflowError(
            "--spawn: no display here (DISPLAY / WAYLAND_DISPLAY unset); write a recording with "
            "--save FILE.rrd and open it where there is one (`rerun FILE.rrd`), or use --out DIR"
        )
    rr = _rerun()
    rec = rr.RecordingStream(APPLICATION_ID, recording_id=f"{Path(v.store).name}-episode-{v.episode}")
    # the viewer binary beside this interpreter (a venv that is not activated has it off PATH), else PATH
    beside = Path(sys.executable).with_name("rerun")
    rr.spawn(executable_path=str(beside) if beside.is_file() else None, recording=rec)
    paths = log_episode(rec, v, jpeg_quality)
    rec.flush()
    return paths


# ------------------------------------------------------------------------------------------- folder
def _even(frames: np.ndarray) -> np.ndarray:
    """H.264 (yuv420p) needs even sizes: repeat the last row / column of an odd-sized camera."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _plot_curves(v: EpisodeView, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(v.curves))
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.4 * n + 0.6), sharex=True, squeeze=False)
    t = v.times
    for ax, (key, values) in zip(axes[:, 0], v.curves.items(), strict=False):
        names = v.names[key]
        for j in range(values.shape[1]):
            ax.plot(t, values[:, j], lw=1.0, label=names[j])
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if values.shape[1] <= 10:
            ax.legend(fontsize=7, loc="upper right", ncol=min(values.shape[1], 5))
    if not v.curves:
        axes[0, 0].text(0.5, 0.5, "no numeric per-step keys", ha="center", va="center")
    axes[-1, 0].set_xlabel("time (s)" if v.fps else f"time (s, assuming {FALLBACK_FPS:g} Hz)")
    ok = {True: "success", False: "failure", None: "success unknown"}[v.success]
    fig.suptitle(
        f"episode {v.episode} ({v.n_steps} steps, {ok}): {v.task or '(no instruction)'}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_frames(v: EpisodeView, path: Path, per_camera: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cams = list(v.cameras.items())
    k = min(per_camera, v.n_steps)
    idx = np.linspace(0, v.n_steps - 1, k).round().astype(int)
    fig, axes = plt.subplots(len(cams), k, figsize=(2 * k, 2.2 * len(cams)), squeeze=False)
    for r, (cam, frames) in enumerate(cams):
        for c, i in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(frames[i])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{cam} t={v.times[i]:.1f}s", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_folder(v: EpisodeView, out: str | os.PathLike) -> dict:
    """Write the viewer-free output of ``v`` into the (new, empty) directory ``out``; returns the summary
    that is also written as ``episode.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fps = float(v.fps or FALLBACK_FPS)
    videos = {}
    for cam, frames in v.cameras.items():
        name = f"{cam.replace('/', '_')}.mp4"
        write_video(out / name, _even(frames), fps, "h264")
        videos[cam] = {"file": name, "frames": int(len(frames)), "size": list(frames.shape[1:3])}
    _plot_curves(v, out / "curves.png")
    files = ["curves.png", *(d["file"] for d in videos.values())]
    if v.cameras:
        _plot_frames(v, out / "frames.png")
        files.append("frames.png")
    summary = {
        "store": v.store,
        "episode": v.episode,
        "n_steps": v.n_steps,
        "fps": v.fps,
        "video_fps": fps,
        "task": v.task,
        "success": v.success,
        "source": v.source,
        "videos": videos,
        "curves": {k: v.names[k] for k in v.curves},
        "skipped": v.skipped,
        "files": sorted([*files, "episode.json"]),
    }
    (out / "episode.json").write_text(json.dumps(summary, indent=1))
    return summary
