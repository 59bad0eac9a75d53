"""Video I/O with PyAV: mp4 (H.264, AV1) <-> uint8 frames (T, H, W, 3).

Timestamps follow LeRobot: a frame's time is ``pts * time_base`` of the video stream, and an
episode inside a concatenated file (LeRobot v3.0) is the half-open range ``[from_s, to_s)`` with
``to_s = from_s + length / fps``. Frames are matched to that range with half a frame period of
tolerance, so muxer time bases that do not divide 1/fps exactly (mp4 often uses 1/15360) still land
on the right frame.

Encoders (see :data:`CODECS`): ``h264`` (libx264, yuv420p, what browsers play), ``av1`` (SVT-AV1,
yuv420p, LeRobot's default), ``h264-lossless`` (libx264rgb at qp 0 in RGB: bit-exact, larger files).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from vlaflow.errors import VlaflowError

# SVT-AV1 prints a banner to stderr for every stream unless told otherwise (read when it is loaded).
os.environ.setdefault("SVT_LOG", "1")


class VideoError(VlaflowError):
    """A video file is missing, unreadable, or does not hold the frames its metadata promises."""


@dataclass(frozen=True)
class CodecChoice:
    """How one ``video_codec`` name is encoded."""

    encoders: tuple[str, ...]  # PyAV encoder names, first available wins
    pix_fmt: str  # pixel format given to the encoder
    options: tuple[tuple[str, str], ...]  # encoder options (crf, preset, ...)
    family: str  # codec name written to LeRobot's info.json ("h264" | "av1")
    lossless: bool  # decoded frames equal the input exactly
    even_dims: bool  # chroma subsampling needs even width and height


CODECS: dict[str, CodecChoice] = {
    "h264": CodecChoice(
        ("libx264",), "yuv420p", (("crf", "20"), ("preset", "veryfast")), "h264", False, True
    ),
    "av1": CodecChoice(
        ("libsvtav1", "libaom-av1"), "yuv420p", (("crf", "30"), ("preset", "8")), "av1", False, True
    ),
    "h264-lossless": CodecChoice(
        ("libx264rgb",), "rgb24", (("qp", "0"), ("preset", "veryfast")), "h264", True, False
    ),
}
# Decoder threads pay off only on larger frames: on 96x96 H.264 they cost 1.6x (230 vs 145 us per frame,
# 2 busy cores); from QVGA up they are neutral here and faster on idle multi-core machines.
_THREADED_DECODE_MIN_PIXELS = 320 * 240
# LeRobot encodes with a GOP of 2 so that random access during training decodes at most one extra frame.
DEFAULT_GOP = 2


def _av():
    import av

    return av


def available_codecs() -> dict[str, dict[str, list[str]]]:
    """Software codecs PyAV offers here: {"h264": {"encoders": [...], "decoders": [...]}, "av1": {...}}."""
    av = _av()
    # Software codecs only: hardware ones (nvenc, qsv, ...) are compiled into most builds but need a device.
    # FFmpeg's native "av1" decoder is left out too: it decodes only through hardware acceleration.
    names = {
        "h264": (["libx264", "libx264rgb", "libopenh264"], ["h264", "libopenh264"]),
        "av1": (["libsvtav1", "libaom-av1", "librav1e"], ["libdav1d", "libaom-av1"]),
    }
    out: dict[str, dict[str, list[str]]] = {}
    for fam, (encs, decs) in names.items():
        found_e, found_d = [], []
        for name in encs:
            try:
                av.codec.Codec(name, "w")
                found_e.append(name)
            except Exception:
                pass
        for name in decs:
            try:
                av.codec.Codec(name, "r")
                found_d.append(name)
            except Exception:
                pass
        out[fam] = {"encoders": found_e, "decoders": found_d}
    return out


def encoder_for(video_codec: str) -> tuple[str, CodecChoice]:
    """The PyAV encoder that will write ``video_codec`` here, with its settings."""
    if video_codec not in CODECS:
        raise VideoError(f"unknown video codec {video_codec!r}; choose one of {', '.join(CODECS)}")
    choice = CODECS[video_codec]
    av = _av()
    for name in choice.encoders:
        try:
            av.codec.Codec(name, "w")
            return name, choice
        except Exception:
            continue
    raise VideoError(
        f"video codec {video_codec!r} needs one of the encoders {list(choice.encoders)}, none of which this "
        f"PyAV/FFmpeg build offers (available: {available_codecs()})"
    )


@dataclass(frozen=True)
class VideoProbe:
    """What an mp4 says about itself."""

    path: str  # the file
    codec: str  # codec family, e.g. "h264", "av1"
    width: int  # pixels
    height: int  # pixels
    pix_fmt: str  # decoder pixel format, e.g. "yuv420p"
    fps: float  # average frame rate from the container
    n_frames: int  # frame count from the container header (0 when the container does not say)
    duration_s: float  # stream duration in seconds (0.0 when unknown)


def _open(path: str | Path):
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    try:
        container = av.open(str(path), mode="r")
    except Exception as e:
        raise VideoError(f"{path}: cannot open as a video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream")
    return container


def probe_video(path: str | Path) -> VideoProbe:
    """Read a video's header (no decoding)."""
    container = _open(path)
    try:
        st = container.streams.video[0]
        cc = st.codec_context
        rate = st.average_rate or st.guessed_rate or 0
        dur = float(st.duration * st.time_base) if st.duration is not None and st.time_base else 0.0
        return VideoProbe(
            path=str(path),
            codec=cc.codec.canonical_name if cc.codec is not None else cc.name,
            width=int(cc.width),
            height=int(cc.height),
            pix_fmt=cc.pix_fmt or "",
            fps=float(rate),
            n_frames=int(st.frames or 0),
            duration_s=dur,
        )
    finally:
        container.close()


class VideoReader:
    """Decode frames of one video file by timestamp range, keeping the file open between requests.

    Consecutive ranges (episode after episode of a LeRobot v3.0 file) continue decoding where the last
    one stopped; any other range seeks to the key frame before it.
    """

    def __init__(self, path: str | Path, fps: float | None = None):
        self.path = Path(path)
        self._container = _open(self.path)
        self._stream = self._container.streams.video[0]
        self.width = int(self._stream.codec_context.width)
        self.height = int(self._stream.codec_context.height)
        if self.width * self.height >= _THREADED_DECODE_MIN_PIXELS:
            self._stream.thread_type = "AUTO"  # frame + slice threads in the decoder
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(fps or rate or 0) or None
        # One reformatter for all frames: it keeps its swscale context, whereas frame.to_ndarray(format=...)
        # builds a new one per frame (measured: 1.0 ms vs 0.02 ms per 96x96 frame).
        self._rgb = _av().video.reformatter.VideoReformatter()
        self._frames = None  # the running decode iterator
        self._pending = None  # first decoded frame past the last range (frame, time)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _iter_frames(self):
        try:
            for frame in self._container.decode(self._stream):
                if frame.pts is None:
                    continue
                yield frame, float(frame.pts * frame.time_base)
        except Exception as e:
            av = _av()
            if isinstance(e, av.FFmpegError | OSError):
                raise VideoError(f"{self.path}: decoding failed ({type(e).__name__}: {e})") from e
            raise

    def _seek(self, t: float) -> None:
        self._pending = None
        if t <= 0:
            self._container.seek(0)
        else:
            tb = self._stream.time_base
            self._container.seek(int(t / tb), stream=self._stream, backward=True, any_frame=False)
        self._frames = self._iter_frames()

    def read_range(
        self, from_s: float = 0.0, to_s: float | None = None, expected: int | None = None
    ) -> np.ndarray:
        """Frames with time in ``[from_s, to_s)`` as (N, H, W, 3) uint8; ``to_s=None`` reads to the end.

        With ``expected`` the count is checked (VideoError names the file, the range, expected vs found).
        """
        tol = 0.5 / self.fps if self.fps else 1e-4
        lo, hi = from_s - tol, (to_s - tol if to_s is not None else float("inf"))
        contiguous = self._pending is not None and abs(self._pending[1] - from_s) <= tol
        if not contiguous:
            if self._frames is None and from_s <= tol:
                self._frames = self._iter_frames()
            else:
                self._seek(from_s)
        out: list[np.ndarray] = []
        buf = np.empty((expected, self.height, self.width, 3), np.uint8) if expected else None
        n = 0
        last_t = -float("inf")

        # itertools.chain (not a generator with ``yield from``): breaking out of this loop must not close
        # the running decode iterator, which the next contiguous range continues.
        head = [self._pending] if self._pending is not None else []
        self._pending = None
        for frame, t in itertools.chain(head, self._frames):
            if t < lo:
                continue
            if t >= hi:
                self._pending = (frame, t)
                break
            if t <= last_t:
                raise VideoError(f"{self.path}: frame times not increasing at {t:.4f}s (after {last_t:.4f}s)")
            last_t = t
            img = self._rgb.reformat(frame, format="rgb24").to_ndarray()
            if buf is not None and n < expected:
                buf[n] = img
            else:
                out.append(img)
            n += 1
        if expected is not None and n != expected:
            end = "end of file" if to_s is None else f"{to_s:.4f}s"
            raise VideoError(
                f"{self.path}: expected {expected} frames in [{from_s:.4f}s, {end}), found {n} "
                f"(video fps {self.fps})"
            )
        if buf is not None:
            return buf
        if not out:
            return np.empty((0, self.height, self.width, 3), np.uint8)
        return np.stack(out)


def read_video(path: str | Path, expected: int | None = None) -> np.ndarray:
    """All frames of a video as (N, H, W, 3) uint8 (count checked against ``expected`` when given)."""
    with VideoReader(path) as r:
        return r.read_range(0.0, None, expected=expected)


class VideoWriter:
    """Encode uint8 RGB frames into an mp4, frame i at time i / fps (append across episodes)."""

    def __init__(
        self,
        path: str | Path,
        fps: float,
        width: int,
        height: int,
        video_codec: str = "h264",
        gop: int = DEFAULT_GOP,
    ):
        encoder, choice = encoder_for(video_codec)
        if choice.even_dims and (width % 2 or height % 2):
            raise VideoError(
                f"{path}: {video_codec} ({choice.pix_fmt}) needs even frame sizes, got {width}x{height}; "
                f"use video_codec='h264-lossless' for odd sizes"
            )
        av = _av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(fps)
        self.width, self.height = int(width), int(height)
        self.video_codec, self.encoder, self.choice = video_codec, encoder, choice
        rate = Fraction(self.fps).limit_denominator(1001)
        self._container = av.open(str(self.path), mode="w")
        opts = dict(choice.options)
        opts["g"] = str(int(gop))
        self._stream = self._container.add_stream(encoder, rate=rate, options=opts)
        self._stream.width, self._stream.height = self.width, self.height
        self._stream.pix_fmt = choice.pix_fmt
        self._stream.time_base = 1 / rate
        self.n_frames = 0
        self.bytes_written = 0  # encoded bytes so far (encoders buffer a few frames, so it lags slightly)

    @property
    def duration_s(self) -> float:
        """Time of the next frame to be written (= frames written / fps)."""
        return self.n_frames / self.fps

    def write(self, frames: np.ndarray) -> None:
        """Append (N, H, W, 3) uint8 frames."""
        av = _av()
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise VideoError(
                f"{self.path}: expected uint8 frames (N, {self.height}, {self.width}, 3), "
                f"got {frames.dtype} {frames.shape}"
            )
        for img in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts = self.n_frames
            for packet in self._stream.encode(vf):
                self.bytes_written += packet.size
                self._container.mux(packet)
            self.n_frames += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._container.close()


def write_video(path: str | Path, frames: np.ndarray, fps: float, video_codec: str = "h264") -> None:
    """Encode (N, H, W, 3) uint8 frames into one mp4."""
    frames = np.asarray(frames)
    with VideoWriter(path, fps, frames.shape[2], frames.shape[1], video_codec) as w:
        w.write(frames)
