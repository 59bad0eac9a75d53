"""rosbag2 ingest: bags written here with rosbags (sqlite3 and MCAP), uneven rates with jitter, as-of
alignment checked against an independent pure-Python computation, episode splitting, bad input, the CLI."""

from __future__ import annotations

import bisect

import cv2
import numpy as np
import pytest

from vlaflow.data.ingest import detect_format, rosbag2
from vlaflow.data.store import EpisodeStore
from vlaflow.errors import IngestError

rb = pytest.importorskip("rosbags.rosbag2", reason="rosbags not installed")
from rosbags.typesys import Stores, get_typestore  # noqa: E402

TS = get_typestore(Stores.ROS2_HUMBLE)
T = TS.types
SEC = 1_000_000_000
PLUGINS = {"sqlite3": rb.StoragePlugin.SQLITE3, "mcap": rb.StoragePlugin.MCAP}
H, W = 6, 8


def _header(ns: int):
    return T["std_msgs/msg/Header"](
        stamp=T["builtin_interfaces/msg/Time"](sec=ns // SEC, nanosec=ns % SEC), frame_id=""
    )


def joint_msg(ns: int, pos, names=None):
    names = names or [f"j{i}" for i in range(len(pos))]
    e = np.zeros(0)
    return T["sensor_msgs/msg/JointState"](
        header=_header(ns), name=names, position=np.asarray(pos, float), velocity=e, effort=e
    )


def image_value(i: int) -> np.ndarray:
    """An RGB frame that encodes its message index i (and differs per channel, to catch BGR/RGB swaps)."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = i % 256, (2 * i + 1) % 256, 255 - i % 256
    img[0, 0] = (7, 8, 9)
    return img


def image_msg(ns: int, i: int, encoding="rgb8"):
    img = image_value(i)
    if encoding == "bgr8":
        img = img[..., ::-1]
    data = np.ascontiguousarray(img).reshape(-1)
    return T["sensor_msgs/msg/Image"](
        header=_header(ns), height=H, width=W, encoding=encoding, is_bigendian=0, step=W * 3, data=data
    )


def png_msg(ns: int, i: int):
    ok, buf = cv2.imencode(".png", image_value(i)[..., ::-1])
    assert ok
    return T["sensor_msgs/msg/CompressedImage"](header=_header(ns), format="png", data=buf.reshape(-1))


def action_msg(values):
    layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    return T["std_msgs/msg/Float64MultiArray"](layout=layout, data=np.asarray(values, float))


def write_bag(path, plugin, messages):
    """messages: (topic, msgtype, receive_ns, msg); written in receive order as a recorder would."""
    with rb.Writer(path, version=9, storage_plugin=PLUGINS[plugin]) as w:
        conns = {}
        for topic, msgtype, t_recv, msg in sorted(messages, key=lambda m: m[2]):
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=TS)
            w.write(conns[topic], t_recv, TS.serialize_cdr(msg, msgtype))


def make_stream(seed=0, t_start=10 * SEC, dur=2.0, markers=()):
    """Joints ~100 Hz with jitter, actions ~50 Hz (no header: receive time), raw images ~15 Hz, png ~15 Hz."""
    rng = np.random.default_rng(seed)
    msgs, truth = [], {"joint": [], "action": [], "cam": [], "wrist": []}
    n_j = int(dur * 100)
    for i in range(n_j):
        ns = t_start + i * 10_000_000 + int(rng.integers(-3_000_000, 3_000_000))
        pos = [i + 0.25, -i, 0.001 * i]
        truth["joint"].append((ns, pos))
        # received 0-4 ms after the stamp (transport delay): alignment must use the header stamps
        msgs.append(
            (
                "/joint_states",
                "sensor_msgs/msg/JointState",
                ns + int(rng.integers(0, 4_000_000)),
                joint_msg(ns, pos),
            )
        )
    for i in range(int(dur * 50)):
        ns = t_start + 5_000_000 + i * 20_000_000 + int(rng.integers(0, 2_000_000))
        truth["action"].append((ns, [i, 2 * i]))
        msgs.append(("/arm/commands", "std_msgs/msg/Float64MultiArray", ns, action_msg([i, 2 * i])))
    for i in range(int(dur * 15)):
        ns = t_start + 30_000_000 + i * 66_666_667 + int(rng.integers(-5_000_000, 5_000_000))
        truth["cam"].append((ns, i))
        msgs.append(
            (
                "/camera/image_raw",
                "sensor_msgs/msg/Image",
                ns + 20_000_000,
                image_msg(ns, i, "bgr8" if i % 2 else "rgb8"),
            )
        )
        ns2 = ns + 11_000_000
        truth["wrist"].append((ns2, i))
        msgs.append(
            ("/wrist/image/compressed", "sensor_msgs/msg/CompressedImage", ns2 + 25_000_000, png_msg(ns2, i))
        )
    for m in markers:
        msgs.append(("/episode_start", "std_msgs/msg/Bool", m, T["std_msgs/msg/Bool"](data=True)))
    return msgs, truth


def expected(truth, rate, start=-(1 << 62), end=1 << 62):
    """Independent as-of alignment: plain Python over the known stamps."""
    seg = {k: [(t, v) for t, v in s if start <= t < end] for k, s in truth.items()}
    t0 = max(s[0][0] for s in seg.values())
    t_end = min(s[-1][0] for s in seg.values())
    ticks, k = [], 0
    while t0 + round(k * SEC / rate) <= t_end:
        ticks.append(t0 + round(k * SEC / rate))
        k += 1
    out = {}
    for name, s in seg.items():
        stamps = [t for t, _ in s]
        out[name] = [s[bisect.bisect_right(stamps, tick) - 1][1] for tick in ticks]
    return ticks, out


OPTS = dict(
    joint_topic="/joint_states",
    action_topic="/arm/commands",
    image_topics=[("/camera/image_raw", "cam"), "/wrist/image/compressed"],
    rate=10.0,
    task="wave the arm",
    progress=False,
)


def check_episode(ep, want):
    np.testing.assert_array_equal(ep["obs.state"], np.asarray(want["joint"], np.float32))
    np.testing.assert_array_equal(ep["action"], np.asarray(want["action"], np.float32))
    np.testing.assert_array_equal(ep["obs.image.cam"], np.stack([image_value(i) for i in want["cam"]]))
    np.testing.assert_array_equal(ep["obs.image.wrist"], np.stack([image_value(i) for i in want["wrist"]]))


@pytest.mark.parametrize("plugin", ["sqlite3", "mcap"])
def test_asof_alignment(tmp_path, plugin):
    msgs, truth = make_stream(seed=1)
    bag = tmp_path / "bag"
    write_bag(bag, plugin, msgs)
    assert detect_format(bag) == "rosbag2"
    summary = rosbag2.ingest(bag, tmp_path / "s.zarr", **OPTS)
    ticks, want = expected(truth, 10.0)
    assert 15 <= len(ticks) <= 20
    assert (summary["n_episodes"], summary["n_steps"]) == (1, len(ticks))
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert store.fps == 10 and set(store.keys) == {"obs.state", "action", "obs.image.cam", "obs.image.wrist"}
    assert store.keys["obs.state"].names == ["j0", "j1", "j2"]
    assert store.episode_meta(0) == {
        "task": "wave the arm",
        "source": f"rosbag2:bag@{ticks[0]}",
        "success": None,
    }
    check_episode(store.get_episode(0), want)
    # the storage file alone (no metadata.yaml) reads the same
    (f,) = [p for p in bag.iterdir() if p.suffix in (".db3", ".mcap")]
    rosbag2.ingest(f, tmp_path / "f.zarr", **OPTS)
    np.testing.assert_array_equal(
        EpisodeStore.open(tmp_path / "f.zarr").read("obs.state"), store.read("obs.state")
    )


def test_episode_topic_and_bag_directory(tmp_path):
    marks = [10 * SEC + 200_000_000, 10 * SEC + 1_100_000_000]
    msgs, truth = make_stream(seed=2, markers=marks)
    write_bag(tmp_path / "bags" / "a_run", "mcap", msgs)
    summary = rosbag2.ingest(
        tmp_path / "bags" / "a_run", tmp_path / "s.zarr", episode_topic="/episode_start", **OPTS
    )
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert store.n_episodes == 2
    for k, (a, b) in enumerate(zip(marks, [marks[1], 1 << 62], strict=True)):
        ticks, want = expected(truth, 10.0, a, b)
        assert store.episode_lengths[k] == len(ticks)
        check_episode(store.get_episode(k), want)
    assert summary["dropped_before_first_marker"] == sum(
        sum(t < marks[0] for t, _ in s) for s in truth.values()
    )

    # a directory of bags: one episode per bag, in name order, sqlite3 and MCAP mixed
    msgs2, truth2 = make_stream(seed=3, t_start=50 * SEC, dur=1.0)
    write_bag(tmp_path / "bags" / "b_run", "sqlite3", msgs2)
    summary = rosbag2.ingest(tmp_path / "bags", tmp_path / "d.zarr", **OPTS)
    store = EpisodeStore.open(tmp_path / "d.zarr")
    assert store.n_episodes == 2 and len(summary["bags"]) == 2
    check_episode(store.get_episode(0), expected(truth, 10.0)[1])
    check_episode(store.get_episode(1), expected(truth2, 10.0)[1])


def test_action_from_next_joint_state_and_receive_fallback(tmp_path):
    msgs = []
    for i in range(30):  # zero header stamps: only usable with --stamp header-or-receive
        ns = SEC + i * 10_000_000
        msgs.append(("/js", "sensor_msgs/msg/JointState", ns, joint_msg(0 if i < 3 else ns, [float(i)])))
    write_bag(tmp_path / "bag", "sqlite3", msgs)
    with pytest.raises(IngestError, match=r"topic /js: message 0 has a zero header stamp"):
        rosbag2.ingest(tmp_path / "bag", tmp_path / "x.zarr", joint_topic="/js", rate=20, progress=False)
    summary = rosbag2.ingest(
        tmp_path / "bag",
        tmp_path / "s.zarr",
        joint_topic="/js",
        rate=20,
        stamp="header-or-receive",
        progress=False,
    )
    assert summary["receive_time_fallbacks"] == {"bag:/js": 3}
    ep = EpisodeStore.open(tmp_path / "s.zarr").get_episode(0)
    np.testing.assert_array_equal(ep["obs.state"][:, 0], np.arange(0, 30, 5, dtype=np.float32)[:6])
    np.testing.assert_array_equal(ep["action"][:, 0], [5, 10, 15, 20, 25, 25])


def test_joint_order_follows_first_message(tmp_path):
    msgs = []
    for i in range(20):
        names, pos = (["a", "b"], [i, -i]) if i % 2 == 0 else (["b", "a"], [-i, i])
        msgs.append(
            ("/js", "sensor_msgs/msg/JointState", SEC + i * 10**7, joint_msg(SEC + i * 10**7, pos, names))
        )
    write_bag(tmp_path / "bag", "mcap", msgs)
    rosbag2.ingest(tmp_path / "bag", tmp_path / "s.zarr", joint_topic="/js", rate=50, progress=False)
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert store.keys["obs.state"].names == ["a", "b"]
    np.testing.assert_array_equal(
        store.read("obs.state"), np.stack([np.arange(0, 20, 2), -np.arange(0, 20, 2)], 1)
    )


def test_decode_image_encodings():
    want = image_value(3)
    rgba = np.concatenate([want, np.full((H, W, 1), 255, np.uint8)], axis=2)
    padded = np.zeros((H, W * 4 + 5), np.uint8)  # row stride larger than the pixels (step > width * channels)
    padded[:, : W * 4] = rgba[..., [2, 1, 0, 3]].reshape(H, -1)
    msg = T["sensor_msgs/msg/Image"](
        header=_header(SEC), height=H, width=W, encoding="bgra8", is_bigendian=0, step=W * 4 + 5,
        data=padded.reshape(-1),
    )  # fmt: skip
    np.testing.assert_array_equal(rosbag2._decode_image(msg, "sensor_msgs/msg/Image", "/c", 0, None), want)
    mono = T["sensor_msgs/msg/Image"](
        header=_header(SEC), height=H, width=W, encoding="mono8", is_bigendian=0, step=W,
        data=want[..., 0].reshape(-1).copy(),
    )  # fmt: skip
    out = rosbag2._decode_image(mono, "sensor_msgs/msg/Image", "/c", 0, None)
    np.testing.assert_array_equal(out, np.repeat(want[..., :1], 3, axis=2))
    ok, buf = cv2.imencode(
        ".jpg", np.full((16, 16, 3), (10, 100, 200), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    jpg = T["sensor_msgs/msg/CompressedImage"](header=_header(SEC), format="jpeg", data=buf.reshape(-1))
    out = rosbag2._decode_image(jpg, "sensor_msgs/msg/CompressedImage", "/c", 0, None)
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - (200, 100, 10)).max() <= 3  # BGR in, RGB out
    bad = T["sensor_msgs/msg/Image"](
        header=_header(SEC),
        height=2,
        width=2,
        encoding="16UC1",
        is_bigendian=0,
        step=4,
        data=np.zeros(8, np.uint8),
    )
    with pytest.raises(IngestError, match=r"/c: message 7: image encoding '16UC1' not supported"):
        rosbag2._decode_image(bad, "sensor_msgs/msg/Image", "/c", 7, "bag")


def test_bad_inputs(tmp_path):
    msgs, _ = make_stream(seed=4, dur=0.5)
    write_bag(tmp_path / "ok", "mcap", msgs)
    with pytest.raises(
        IngestError,
        match=r"\['/nope'\] not in the bag; it has: .*/joint_states \(sensor_msgs/msg/JointState\)",
    ):
        rosbag2.ingest(tmp_path / "ok", tmp_path / "a.zarr", joint_topic="/nope", progress=False)
    with pytest.raises(
        IngestError, match=r"topic /camera/image_raw has type sensor_msgs/msg/Image, expected one of"
    ):
        rosbag2.ingest(tmp_path / "ok", tmp_path / "a.zarr", joint_topic="/camera/image_raw", progress=False)

    # non-monotonic header stamps
    bad = [
        ("/js", "sensor_msgs/msg/JointState", SEC + i, joint_msg(SEC + (i if i != 5 else 1) * 1000, [0.0]))
        for i in range(9)
    ]
    write_bag(tmp_path / "mono", "sqlite3", bad)
    with pytest.raises(IngestError, match=r"mono: topic /js: stamps are not monotonic: message 5 "):
        rosbag2.ingest(tmp_path / "mono", tmp_path / "a.zarr", joint_topic="/js", progress=False)

    # joint count changes
    bad = [
        ("/js", "sensor_msgs/msg/JointState", SEC + i, joint_msg(SEC + i, [0.0] * (2 if i < 4 else 3)))
        for i in range(9)
    ]
    write_bag(tmp_path / "shape", "mcap", bad)
    with pytest.raises(IngestError, match=r"topic /js: message 4 has 3 values, expected 2"):
        rosbag2.ingest(tmp_path / "shape", tmp_path / "a.zarr", joint_topic="/js", progress=False)

    # NaN in an action
    bad = [
        ("/cmd", "std_msgs/msg/Float64MultiArray", SEC + i, action_msg([1.0, np.nan if i == 6 else 0.0]))
        for i in range(9)
    ]
    write_bag(tmp_path / "nan", "sqlite3", bad)
    with pytest.raises(
        IngestError, match=r"nan: topic /cmd: message 6 has a non-finite value \(nan\) at index 1"
    ):
        rosbag2.ingest(tmp_path / "nan", tmp_path / "a.zarr", action_topic="/cmd", progress=False)

    # truncated / corrupt storage files, both backends
    for plugin in ("mcap", "sqlite3"):
        write_bag(tmp_path / f"t_{plugin}", plugin, msgs)
        (f,) = [p for p in (tmp_path / f"t_{plugin}").iterdir() if p.suffix in (".db3", ".mcap")]
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if plugin == "mcap" else b"garbage" * 100)
        with pytest.raises(IngestError, match=rf"{f.name}|t_{plugin}"):
            rosbag2.ingest(f, tmp_path / "a.zarr", **OPTS)
    assert not (tmp_path / "a.zarr").exists() and not list(tmp_path.glob(".a.zarr*"))


def test_cli_ingest_rosbag(tmp_path, capsys):
    from vlaflow.cli import main

    msgs, truth = make_stream(seed=5, dur=1.0)
    write_bag(tmp_path / "bag", "mcap", msgs)
    argv = ["ingest", str(tmp_path / "bag"), str(tmp_path / "s.zarr"), "--no-progress",
            "--joint-topic", "/joint_states",
            "--action-topic", "/arm/commands", "--image-topic", "/camera/image_raw:cam",
            "--image-topic", "/wrist/image/compressed", "--rate", "10"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    ticks, want = expected(truth, 10.0)
    assert f"1 episodes, {len(ticks)} steps" in capsys.readouterr().out
    check_episode(EpisodeStore.open(tmp_path / "s.zarr").get_episode(0), want)
    argv[2] = str(tmp_path / "t.zarr")
    argv[5] = "/missing"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "['/missing'] not in the bag" in err and "/joint_states" in err
    assert not (tmp_path / "t.zarr").exists()
