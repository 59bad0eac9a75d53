"""Streaming mp4 (H.264, yuv420p) writer for rollout videos, on PyAV.

Frames are written as they come, so a 300-step rollout never holds all its frames in memory. yuv420p is
what browsers and players expect; it needs even width and height, so odd-sized frames are edge-padded by one
pixel rather than refused. (Dataset video I/O, with readers and other codecs, lives in vlaflow.data.video.)

    with Mp4Writer("out/episode_000.mp4", fps=10) as w:
        for frame in frames:        # (H, W, 3) uint8 RGB
            w.write(frame)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vlaflow.errors import VlaflowError


class Mp4Writer:
    """Append RGB uint8 frames (H, W, 3) to an H.264 mp4; the file appears complete only on close.

    Encodes to ``<path>.partial`` and renames on a clean close, so an interrupted rollout leaves no
    half-written mp4 under the final name.
    """

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 23, preset: str = "veryfast"):
        if fps <= 0:
            raise VlaflowError(f"{path}: video fps must be > 0, got {fps}")
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self.preset = preset
        self.n_frames = 0
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._container = None
        self._stream = None
        self._size: tuple[int, int] | None = None  # (h, w) of incoming frames

    def _open(self, h: int, w: int) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        rate = round(self.fps) if float(self.fps).is_integer() else self.fps
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = w + w % 2, h + h % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf), "preset": self.preset}
        self._size = (h, w)

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame; every frame must have the first frame's size."""
        import av

        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise VlaflowError(
                f"{self.path}: expected an (H, W, 3) uint8 frame, got {frame.dtype} {frame.shape}"
            )
        if self._container is None:
            self._open(frame.shape[0], frame.shape[1])
        if frame.shape[:2] != self._size:
            raise VlaflowError(
                f"{self.path}: frame {self.n_frames} is {frame.shape[:2]}, expected {self._size}"
            )
        h, w = frame.shape[:2]
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.n_frames += 1

    def close(self) -> Path | None:
        """Flush and move the file into place; returns its path (None when no frame was written)."""
        if self._container is None:
            return None
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file (after an error)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # the container may already be broken; the partial file is removed below
                pass
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(path: str | os.PathLike, frames, fps: float, crf: int = 23) -> Path | None:
    """Encode an iterable of (H, W, 3) uint8 frames (or a (T, H, W, 3) array) into one H.264 mp4."""
    with Mp4Writer(path, fps, crf=crf) as w:
        for frame in frames:
            w.write(frame)
    return w.path if w.n_frames else None
