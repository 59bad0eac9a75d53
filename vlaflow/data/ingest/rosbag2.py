"""ROS 2 bags (sqlite3 ``.db3`` and MCAP) -> episode store, resampled to a fixed rate.

Chosen topics, read with ``rosbags``:

- ``joint_topic``: sensor_msgs/JointState -> ``obs.state`` (positions, in the first message's joint order).
- ``action_topic``: sensor_msgs/JointState (position), std_msgs/Float64MultiArray or Float32MultiArray
  (data), or trajectory_msgs/JointTrajectory (first point's positions) -> ``action``. Without an action
  topic the action is the next tick's joint state (the common convention for position-controlled arms),
  the last tick repeating its own.
- ``image_topics``: sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) or sensor_msgs/CompressedImage
  (jpeg, png) -> ``obs.image.<camera>``, uint8 RGB (mono is repeated to 3 channels).

Time and alignment. A message's time is its ``header.stamp`` (``stamp="header"``: a zero stamp is an
error; ``"header-or-receive"``: zero stamps take the bag's receive time and are counted; ``"receive"``:
the receive time throughout). Messages without a header (Float64MultiArray, Bool, Empty) always use the
receive time. Stamps must not go backwards within a topic. Output ticks (integer ns) are
``t0 + round(k * 1e9 / rate)``, where ``t0`` is the first time every chosen topic has a sample; ticks run
while every topic still has data (``tick <=`` the earliest of the topics' last stamps). At each tick every
topic contributes its as-of sample: the last one with stamp <= tick.

Episodes: one per bag (``src`` may be a bag directory, a ``.db3``/``.mcap`` file, or a directory of
those), or, with ``episode_topic``, each message on that topic (any type) starts a new episode; samples
before the first one are dropped (counted in the summary). Each episode is aligned on its own samples.
"""

from __future__ import annotations

import contextlib
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import vlaflow.keys as K
from vlaflow.errors import ConfigError, IngestError

FORMAT = "rosbag2"

JOINT_TYPES = ("sensor_msgs/msg/JointState",)
ACTION_TYPES = (
    "sensor_msgs/msg/JointState",
    "std_msgs/msg/Float64MultiArray",
    "std_msgs/msg/Float32MultiArray",
    "trajectory_msgs/msg/JointTrajectory",
)
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
STAMP_MODES = ("header", "header-or-receive", "receive")
_CAMERA_SUFFIXES = {"image_raw", "image", "compressed", "image_rect", "image_color", "image_rect_color"}


def camera_name(topic: str) -> str:
    """'/wrist/color/image_raw/compressed' -> 'wrist_color' (the topic without its image_* suffixes)."""
    parts = [p for p in topic.strip("/").split("/") if p]
    while len(parts) > 1 and parts[-1] in _CAMERA_SUFFIXES:
        parts.pop()
    return "_".join(parts) or "camera"


def parse_image_topic(spec: str) -> tuple[str, str]:
    """'/cam/image_raw:front' -> ('/cam/image_raw', 'front'); without ':name' it is named from the topic."""
    topic, _, cam = spec.partition(":")
    if not topic.startswith("/"):
        raise ConfigError(f"image topic {spec!r}: expected '/topic' or '/topic:camera_name'")
    return topic, (cam or camera_name(topic))


@dataclass(frozen=True)
class RosbagOptions:
    joint_topic: str | None = None  # sensor_msgs/JointState topic -> obs.state
    action_topic: str | None = None  # JointState / Float64MultiArray / JointTrajectory topic -> action
    image_topics: tuple[tuple[str, str], ...] = ()  # (topic, camera name) pairs -> obs.image.<camera>
    rate: float = 10.0  # output rate in Hz (ticks of 1/rate s)
    episode_topic: str | None = None  # each message on it starts an episode; None: one episode per bag
    task: str = ""  # instruction text for every episode
    stamp: str = "header"  # header | header-or-receive | receive (see the module docstring)
    cameras: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and math.isfinite(self.rate) and self.rate > 0):
            raise ConfigError(f"rosbag2 rate must be a positive number of Hz, got {self.rate!r}")
        if self.stamp not in STAMP_MODES:
            raise ConfigError(f"rosbag2 stamp must be one of {STAMP_MODES}, got {self.stamp!r}")
        if self.joint_topic is None and self.action_topic is None:
            raise ConfigError(
                "rosbag2 needs --joint-topic or --action-topic (or both): the store needs an action"
            )
        cams = tuple(c for _, c in self.image_topics)
        if len(set(cams)) != len(cams):
            raise ConfigError(f"rosbag2 camera names must be unique, got {list(cams)}")
        object.__setattr__(self, "cameras", cams)

    def topics(self) -> dict[str, str]:
        """topic -> role ('joint', 'action', 'image:<cam>'); one topic may serve as joints and action."""
        roles: dict[str, str] = {}
        if self.joint_topic:
            roles[self.joint_topic] = "joint"
        if self.action_topic and self.action_topic != self.joint_topic:
            roles[self.action_topic] = "action"
        for t, cam in self.image_topics:
            roles[t] = f"image:{cam}"
        return roles


# ----------------------------------------------------------------------------------------------- detection
def detect(src: Path) -> bool:
    src = Path(src)
    if src.is_file():
        return src.suffix in (".db3", ".mcap")
    if not src.is_dir():
        return False
    if (src / "metadata.yaml").is_file():
        return True
    return any(
        (c.is_dir() and (c / "metadata.yaml").is_file()) or c.suffix in (".db3", ".mcap")
        for c in src.iterdir()
    )


# ----------------------------------------------------------------------------------------------- reading
def bag_paths(src: Path) -> list[Path]:
    """The bags under ``src``: itself if it is one, else its bag directories and .db3/.mcap files, sorted."""
    if src.is_file():
        return [src]
    if (src / "metadata.yaml").is_file():
        return [src]
    found = sorted(
        c
        for c in src.iterdir()
        if (c.is_dir() and (c / "metadata.yaml").is_file()) or c.suffix in (".db3", ".mcap")
    )
    if not found:
        raise IngestError(
            f"{src}: no rosbag2 here (expected metadata.yaml, .db3/.mcap files or bag directories)"
        )
    return found


@dataclass
class _Series:
    """Messages of one topic in receive order: times (ns) and, for joints/actions, the values."""

    stamps: list[int] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    names: list[str] | None = None
    fallbacks: int = 0


def _header_ns(msg: Any) -> int | None:
    header = getattr(msg, "header", None)
    return None if header is None else int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _header_ns_from_cdr(raw: bytes | memoryview) -> int:
    """Header stamp of a message whose first field is std_msgs/Header, read without deserializing the rest.

    CDR: 4 bytes of encapsulation (byte 1: 1 = little endian), then stamp.sec int32, stamp.nanosec uint32.
    Images are big; pass 1 only needs their times.
    """
    sec, nsec = struct.unpack_from("<iI" if raw[1] == 1 else ">iI", raw, 4)
    return sec * 1_000_000_000 + nsec


def _stamp(
    header_ns: int | None, t_recv: int, mode: str, topic: str, index: int, path: Path, series: _Series
) -> int:
    if header_ns is None or mode == "receive":
        return int(t_recv)
    if header_ns != 0:
        return header_ns
    if mode == "header-or-receive":
        series.fallbacks += 1
        return int(t_recv)
    raise IngestError(
        f"{path}: topic {topic}: message {index} has a zero header stamp; pass --stamp header-or-receive "
        "to use the bag's receive time for such messages"
    )


def _vector(msg: Any, msgtype: str, topic: str, index: int, path: Path, series: _Series) -> np.ndarray:
    if msgtype == "sensor_msgs/msg/JointState":
        pos = np.asarray(msg.position, dtype=np.float64)
        names = list(msg.name)
        if series.names is None and names:
            series.names = names
        elif names and series.names and names != series.names and len(names) == len(series.names):
            if sorted(names) != sorted(series.names):
                raise IngestError(
                    f"{path}: topic {topic}: message {index} names joints {names}, expected {series.names} "
                    "like message 0"
                )
            order = [names.index(n) for n in series.names]  # same joints, other order: reorder
            pos = pos[order]
    elif msgtype == "trajectory_msgs/msg/JointTrajectory":
        if not msg.points:
            raise IngestError(f"{path}: topic {topic}: message {index} is a JointTrajectory with no points")
        pos = np.asarray(msg.points[0].positions, dtype=np.float64)
        if series.names is None and msg.joint_names:
            series.names = list(msg.joint_names)
    else:  # Float64MultiArray / Float32MultiArray
        pos = np.asarray(msg.data, dtype=np.float64)
    if pos.ndim != 1 or pos.size == 0:
        raise IngestError(f"{path}: topic {topic}: message {index} has no values (shape {pos.shape})")
    if series.values and pos.shape != series.values[0].shape:
        raise IngestError(
            f"{path}: topic {topic}: message {index} has {pos.size} values, expected {series.values[0].size} "
            "like message 0 (the joint count must not change)"
        )
    bad = ~np.isfinite(pos)
    if bad.any():
        j = int(np.argmax(bad))
        raise IngestError(
            f"{path}: topic {topic}: message {index} has a non-finite value ({pos[j]}) at index {j}"
        )
    return pos


def _decode_image(msg: Any, msgtype: str, topic: str, index: int, path: Path) -> np.ndarray:
    if msgtype == "sensor_msgs/msg/CompressedImage":
        import cv2

        buf = np.asarray(msg.data, dtype=np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if img is None:
            raise IngestError(
                f"{path}: topic {topic}: message {index}: cannot decode CompressedImage (format "
                f"{msg.format!r}, "
                f"{buf.size} bytes)"
            )
        return np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8UC1": 1, "8UC3": 3}
    enc = msg.encoding
    if enc not in channels:
        raise IngestError(
            f"{path}: topic {topic}: message {index}: image encoding {enc!r} not supported "
            f"(expected one of {sorted(channels)})"
        )
    h, w, ch, step = int(msg.height), int(msg.width), channels[enc], int(msg.step)
    data = np.asarray(msg.data, dtype=np.uint8)
    if step < w * ch or data.size < h * step:
        raise IngestError(
            f"{path}: topic {topic}: message {index}: {enc} image {h}x{w} with step {step} needs {h * step} "
            "bytes, "
            f"found {data.size}"
        )
    img = data[: h * step].reshape(h, step)[:, : w * ch].reshape(h, w, ch)
    if enc in ("bgr8", "bgra8"):
        img = img[:, :, 2::-1]
    elif ch == 4:
        img = img[:, :, :3]
    elif ch == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img)


def _open_reader(path: Path) -> Any:
    from rosbags.rosbag2 import Reader

    try:
        reader = Reader(path)
        reader.open()
    except Exception as e:  # rosbags raises ReaderError, sqlite3 / mcap errors, yaml errors...
        raise IngestError(
            f"{path}: cannot open as a rosbag2 (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    return reader


def _messages(reader: Any, conns: list, path: Path):
    try:
        yield from reader.messages(connections=conns)
    except IngestError:
        raise
    except Exception as e:
        raise IngestError(
            f"{path}: cannot read messages (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _check_topics(reader: Any, path: Path, opts: RosbagOptions) -> dict[str, Any]:
    have = {c.topic: c.msgtype for c in reader.connections}
    wanted = dict(opts.topics())
    if opts.episode_topic:
        wanted[opts.episode_topic] = "episode"
    if opts.action_topic:
        wanted.setdefault(opts.action_topic, "action")
    listing = ", ".join(f"{t} ({ty})" for t, ty in sorted(have.items())) or "none"
    missing = [t for t in wanted if t not in have]
    if missing:
        raise IngestError(f"{path}: topic(s) {missing} not in the bag; it has: {listing}")
    for topic, allowed in (
        (opts.joint_topic, JOINT_TYPES),
        (opts.action_topic, ACTION_TYPES),
        *((t, IMAGE_TYPES) for t, _ in opts.image_topics),
    ):
        if topic and have[topic] not in allowed:
            raise IngestError(
                f"{path}: topic {topic} has type {have[topic]}, expected one of {list(allowed)}"
            )
    return have


def _read_series(
    reader: Any, path: Path, opts: RosbagOptions, have: dict, typestore: Any, progress: bool = False
) -> dict[str, _Series]:
    """Pass 1: times of every chosen topic, values of the joint/action topics (images are decoded later)."""
    from tqdm import tqdm

    wanted = set(opts.topics()) | ({opts.episode_topic} if opts.episode_topic else set())
    series = {t: _Series() for t in wanted}
    vector_topics = {opts.joint_topic, opts.action_topic} - {None}
    image_topics = {t for t, _ in opts.image_topics}
    conns = [c for c in reader.connections if c.topic in wanted]
    bar = tqdm(
        total=sum(c.msgcount for c in conns), desc=f"read {path.name}", unit="msg", disable=not progress
    )
    for conn, t_recv, raw in _messages(reader, conns, path):
        bar.update()
        s = series[conn.topic]
        i = len(s.stamps)
        try:
            if conn.topic in image_topics:
                header_ns, msg = _header_ns_from_cdr(raw), None
            else:
                msg = typestore.deserialize_cdr(raw, conn.msgtype)
                header_ns = _header_ns(msg)
        except Exception as e:
            raise IngestError(
                f"{path}: topic {conn.topic}: message {i} does not deserialize as {conn.msgtype}: {e}"
            ) from e
        s.stamps.append(_stamp(header_ns, t_recv, opts.stamp, conn.topic, i, path, s))
        if conn.topic in vector_topics:
            s.values.append(_vector(msg, conn.msgtype, conn.topic, i, path, s))
    bar.close()
    for topic, s in series.items():
        if not s.stamps:
            raise IngestError(f"{path}: topic {topic} has no messages")
        st = np.asarray(s.stamps, dtype=np.int64)
        back = np.flatnonzero(np.diff(st) < 0)
        if back.size:
            i = int(back[0]) + 1
            raise IngestError(
                f"{path}: topic {topic}: stamps are not monotonic: message {i} has {st[i]} ns, earlier than "
                f"message {i - 1} ({st[i - 1]} ns)"
            )
    return series


# ----------------------------------------------------------------------------------------------- alignment
def tick_times(t0: int, t_end: int, rate: float) -> np.ndarray:
    """Integer-ns ticks t0 + round(k * 1e9 / rate) for k = 0, 1, ... while <= t_end."""
    if t_end < t0:
        return np.zeros(0, dtype=np.int64)
    n = int(math.floor((t_end - t0) * rate / 1e9)) + 2
    ticks = t0 + np.round(np.arange(n) * (1e9 / rate)).astype(np.int64)
    return ticks[ticks <= t_end]


def asof_indices(stamps: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """Index of the last sample with stamp <= tick, per tick (-1 where there is none)."""
    return np.searchsorted(stamps, ticks, side="right") - 1


def plan_episodes(
    series: dict[str, np.ndarray], segments: list[tuple[int, int]], rate: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """For each [start, end) segment: ticks and the as-of message index of every topic at each tick."""
    episodes, warnings = [], []
    for k, (start, end) in enumerate(segments):
        first, last = {}, {}
        for topic, st in series.items():
            lo, hi = np.searchsorted(st, start, "left"), np.searchsorted(st, end, "left")
            if hi <= lo:
                warnings.append(
                    f"episode segment {k} ({start}..{end} ns): topic {topic} has no samples; skipped"
                )
                break
            first[topic], last[topic] = int(st[lo]), int(st[hi - 1])
        else:
            ticks = tick_times(max(first.values()), min(last.values()), rate)
            if len(ticks) == 0:
                warnings.append(f"episode segment {k}: the topics never overlap in time; skipped")
                continue
            idx = {topic: asof_indices(st, ticks) for topic, st in series.items()}
            episodes.append({"ticks": ticks, "idx": idx})
    return episodes, warnings


# ----------------------------------------------------------------------------------------------- ingest
def ingest(
    src: str | Path,
    dest: str | Path,
    *,
    joint_topic: str | None = None,
    action_topic: str | None = None,
    image_topics: list[tuple[str, str]] | tuple = (),
    rate: float = 10.0,
    episode_topic: str | None = None,
    task: str = "",
    stamp: str = "header",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Import one bag or a directory of bags into a new store at ``dest`` (written atomically)."""
    from rosbags.typesys import Stores, get_typestore
    from tqdm import tqdm

    from vlaflow.data.store import KeySpec, atomic_store

    imgs = tuple(parse_image_topic(t) if isinstance(t, str) else (t[0], t[1]) for t in image_topics)
    opts = RosbagOptions(joint_topic, action_topic, imgs, float(rate), episode_topic, task or "", stamp)
    src = Path(src)
    if not src.exists():
        raise IngestError(f"{src}: no such file or directory")
    typestore = get_typestore(Stores.ROS2_HUMBLE)
    roles = opts.topics()
    summary: dict[str, Any] = {"n_episodes": 0, "n_steps": 0, "fps": opts.rate, "bags": [], "warnings": []}
    summary.update(receive_time_fallbacks={}, dropped_before_first_marker=0)
    attrs = {
        "rosbag2": {
            "topics": {"joint": joint_topic, "action": action_topic, "images": {c: t for t, c in imgs}},
            "episode_topic": episode_topic,
            "rate_hz": opts.rate,
            "stamp": stamp,
            "alignment": "as-of: last sample with stamp <= tick; ticks start when every topic has data",
            "action_source": "action topic" if action_topic else "next tick's joint state",
        }
    }
    schema: dict[str, KeySpec] | None = None
    joint_names: list[str] | None = None
    with contextlib.ExitStack() as stack:
        store = None
        for path in tqdm(bag_paths(src), desc="ingest rosbag2", unit="bag", disable=not progress):
            reader = _open_reader(path)
            stack.callback(reader.close)
            have = _check_topics(reader, path, opts)
            series = _read_series(reader, path, opts, have, typestore, progress)
            for topic, s in series.items():
                if s.fallbacks:
                    summary["receive_time_fallbacks"][f"{path.name}:{topic}"] = s.fallbacks
            aligned = {t: np.asarray(series[t].stamps, dtype=np.int64) for t in roles}
            if opts.joint_topic:
                joint_names = joint_names or series[opts.joint_topic].names
            if episode_topic:
                marks = np.asarray(series[episode_topic].stamps, dtype=np.int64)
                segments = [
                    (int(a), int(b)) for a, b in zip(marks, [*marks[1:], np.iinfo(np.int64).max], strict=True)
                ]
                summary["dropped_before_first_marker"] += sum(
                    int((st < marks[0]).sum()) for st in aligned.values()
                )
            else:
                segments = [(np.iinfo(np.int64).min, np.iinfo(np.int64).max)]
            plans, warns = plan_episodes(aligned, segments, opts.rate)
            summary["warnings"] += [f"{path}: {w}" for w in warns]
            summary["bags"].append(str(path))
            for ep_data, plan in _episodes_with_images(reader, path, opts, plans, have, typestore):
                data = _assemble(ep_data, plan, series, opts)
                if schema is None:
                    names = {K.OBS_STATE: joint_names}
                    names[K.ACTION] = series[action_topic].names if action_topic else joint_names
                    schema = {
                        k: KeySpec(str(v.dtype), v.shape[1:], names=names.get(k)) for k, v in data.items()
                    }
                    store = stack.enter_context(
                        atomic_store(dest, keys=schema, fps=opts.rate, attrs=attrs, overwrite=overwrite)
                    )
                for k, spec in schema.items():
                    if tuple(data[k].shape[1:]) != spec.shape:
                        raise IngestError(
                            f"{path}: {k} has per-step shape {tuple(data[k].shape[1:])}, expected "
                            f"{spec.shape} "
                            "like the first episode"
                        )
                t0 = int(plan["ticks"][0])
                store.append_episode(data, task=opts.task, source=f"rosbag2:{path.name}@{t0}", success=None)
                summary["n_episodes"] += 1
                summary["n_steps"] += len(plan["ticks"])
        if store is None:
            raise IngestError(
                f"{src}: no episode could be aligned: {'; '.join(summary['warnings']) or 'no data'}"
            )
    summary["keys"] = {k: {"dtype": s.dtype, "shape": list(s.shape)} for k, s in (schema or {}).items()}
    return summary


def _assemble(
    images: dict[str, np.ndarray], plan: dict, series: dict[str, _Series], opts: RosbagOptions
) -> dict:
    data: dict[str, np.ndarray] = {}
    if opts.joint_topic:
        vals = np.stack(series[opts.joint_topic].values)
        data[K.OBS_STATE] = vals[plan["idx"][opts.joint_topic]].astype(np.float32)
    if opts.action_topic:
        vals = np.stack(series[opts.action_topic].values)
        data[K.ACTION] = vals[plan["idx"][opts.action_topic]].astype(np.float32)
    else:  # next tick's joint state; the last tick repeats its own
        s = data[K.OBS_STATE]
        data[K.ACTION] = np.concatenate([s[1:], s[-1:]], axis=0)
    for _, cam in opts.image_topics:
        data[K.image_key(cam)] = images[cam]
    return data


def _episodes_with_images(
    reader: Any, path: Path, opts: RosbagOptions, plans: list, have: dict, typestore: Any
):
    """Pass 2: decode only the image messages the ticks use; yield each episode once its frames are in."""
    if not opts.image_topics:
        for plan in plans:
            yield {}, plan
        return
    cam_of = {t: c for t, c in opts.image_topics}
    needed = {t: set() for t in cam_of}
    for plan in plans:
        for t in cam_of:
            needed[t].update(int(i) for i in np.unique(plan["idx"][t]))
    frames: dict[str, dict[int, np.ndarray]] = {t: {} for t in cam_of}
    shapes: dict[str, tuple] = {}
    count = {t: 0 for t in cam_of}
    pending = list(plans)

    def ready(plan: dict) -> bool:
        return all(count[t] > int(plan["idx"][t].max()) for t in cam_of)

    def emit(plan: dict) -> dict[str, np.ndarray]:
        out = {cam_of[t]: np.stack([frames[t][int(i)] for i in plan["idx"][t]]) for t in cam_of}
        lo = {t: int(plan["idx"][t].max()) for t in cam_of}
        for t in cam_of:  # episodes are disjoint in time: frames up to this one's last are no longer needed
            for i in [i for i in frames[t] if i <= lo[t]]:
                del frames[t][i]
        return out

    conns = [c for c in reader.connections if c.topic in cam_of]
    for conn, _t, raw in _messages(reader, conns, path):
        t = conn.topic
        i = count[t]
        count[t] += 1
        if i in needed[t]:
            img = _decode_image(typestore.deserialize_cdr(raw, conn.msgtype), conn.msgtype, t, i, path)
            if shapes.setdefault(t, img.shape) != img.shape:
                raise IngestError(
                    f"{path}: topic {t}: message {i} is a {img.shape} image, expected {shapes[t]} like the "
                    "first"
                )
            frames[t][i] = img
        while pending and ready(pending[0]):
            plan = pending.pop(0)
            yield emit(plan), plan
    if pending:
        raise IngestError(f"{path}: image messages ended before the last episode's frames were read")
