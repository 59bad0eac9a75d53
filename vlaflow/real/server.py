"""A policy server for remote inference: websocket + msgpack with numpy arrays, openpi's protocol.

What openpi's ``WebsocketClientPolicy`` (the ``openpi-client`` package) expects, and what this serves:

- on connect the server sends its metadata (a msgpack map): the policy's To / H / Ta / Da / fps, its
  observation keys and shapes, the default instruction;
- each binary message from the client is a msgpack map of observations; arrays travel as openpi's
  ``msgpack_numpy`` maps (``__ndarray__``, ``data`` raw bytes, ``dtype`` a numpy dtype string, ``shape``),
  never pickle (object, void and complex dtypes are refused);
- the reply is a msgpack map ``{"actions": (H, Da) float32, "server_timing": {"infer_ms", "prev_total_ms"}}``;
- a bad request (a missing key, a wrong shape or dtype, undecodable bytes) gets a text message naming the
  problem (openpi's client raises it as ``RuntimeError``); the connection and the server stay up;
- ``GET /healthz`` answers 200 ``OK``.

Observations are keyed as the store / the policy are (``obs.state``, ``obs.image.<cam>``), each either a
window ``(To, *shape)`` or a single step ``(*shape)``: single steps are appended to the connection's own
window, edge-padded at its start like training windows. ``prompt`` or ``task`` carries the instruction
text. ``{"reset": true, "seed": S}`` re-seeds the runtime and clears the connection's window.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np

import vlaflow.keys as K
from vlaflow.interfaces import RuntimePolicy, as_infer_result, check_chunk

_REFUSED_KINDS = ("V", "O", "c")


# --------------------------------------------------------------------------------------------- msgpack
def _pack_default(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"unsupported dtype {obj.dtype} (only numeric and bool arrays travel)")
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": a.dtype.str, b"shape": a.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _unpack_hook(obj):
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in _REFUSED_KINDS:
            raise ValueError(f"unsupported dtype {dtype}")
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=tuple(obj[b"shape"]))
    if b"__npgeneric__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in _REFUSED_KINDS:
            raise ValueError(f"unsupported dtype {dtype}")
        return dtype.type(obj[b"data"])
    return obj


def packb(obj) -> bytes:
    import msgpack

    return msgpack.packb(obj, default=_pack_default)


def unpackb(data: bytes):
    import msgpack

    return msgpack.unpackb(data, object_hook=_unpack_hook)


class BadRequest(ValueError):
    pass


# --------------------------------------------------------------------------------------------- serving
class PolicyServer:
    """Serve ``runtime`` on ``host:port`` (loopback by default); ``serve(stop)`` blocks until ``stop``."""

    def __init__(
        self, runtime: RuntimePolicy, host: str = "127.0.0.1", port: int = 8000, name: str = "policy"
    ):
        from websockets.sync.server import serve

        self.runtime, self.spec, self.name = runtime, runtime.config, name
        self._infer_lock = threading.Lock()  # one runtime, many connections: one inference at a time
        self.requests = self.errors = 0
        self._server = serve(
            self._handle,
            host,
            port,
            compression=None,
            max_size=None,
            process_request=self._process_request,
        )
        self.host = host
        self.port = self._server.socket.getsockname()[1]
        self._thread: threading.Thread | None = None

    def metadata(self) -> dict[str, Any]:
        s = self.spec
        return {
            "server": "vlaflow",
            "policy": self.name,
            "n_obs_steps": s.n_obs_steps,
            "horizon": s.horizon,
            "n_action_steps": s.n_action_steps,
            "action_dim": s.action_dim,
            "fps": s.fps,
            "obs_shapes": {k: list(v) for k, v in s.obs_shapes.items()},
            "task": s.task,
        }

    @staticmethod
    def _process_request(connection, request):
        if request.path == "/healthz":
            return connection.respond(200, "OK\n")
        return None

    def start(self) -> PolicyServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="vlaflow-serve", daemon=True)
        self._thread.start()
        return self

    def serve(self, stop: threading.Event, duration_s: float | None = None) -> None:
        self.start()
        stop.wait(duration_s)

    def close(self) -> None:
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------ requests
    def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        window: dict[str, deque] = {}
        prev_total: float | None = None
        ws.send(packb(self.metadata()))
        while True:
            try:
                data = ws.recv()
            except ConnectionClosed:
                return
            t0 = time.monotonic()
            self.requests += 1
            try:
                if isinstance(data, str):
                    raise BadRequest("expected a binary msgpack message, got text")
                try:
                    req = unpackb(data)
                except Exception as e:
                    raise BadRequest(
                        f"cannot decode the request as msgpack + numpy: {type(e).__name__}: {e}"
                    ) from e
                if not isinstance(req, dict):
                    raise BadRequest(f"expected a map of observations, got {type(req).__name__}")
                req = {(k.decode() if isinstance(k, bytes) else k): v for k, v in req.items()}
                if req.get("reset"):
                    window.clear()
                    with self._infer_lock:
                        self.runtime.reset(seed=req.get("seed"))
                    reply: dict[str, Any] = {"reset": True}
                else:
                    obs = self._window(req, window)
                    t_inf = time.monotonic()
                    with self._infer_lock:
                        result = as_infer_result(self.runtime.infer(obs))
                    infer_s = time.monotonic() - t_inf
                    chunk = check_chunk(result.actions, self.spec).astype(np.float32)
                    timing = {"infer_ms": infer_s * 1000}
                    if prev_total is not None:
                        timing["prev_total_ms"] = prev_total * 1000
                    reply = {"actions": chunk, "server_timing": timing}
                    if result.nfe is not None:
                        reply["nfe"] = int(result.nfe)
                out = packb(reply)
            except Exception as e:  # a bad request or a failing policy: a text reply, the server stays up
                self.errors += 1
                kind = (
                    "bad request" if isinstance(e, BadRequest) else f"inference failed ({type(e).__name__})"
                )
                try:
                    ws.send(f"vlaflow serve: {kind}: {e}")
                except ConnectionClosed:
                    return
                continue
            try:
                ws.send(out)
            except ConnectionClosed:
                return
            prev_total = time.monotonic() - t0

    def _window(self, req: dict, window: dict[str, deque]) -> dict[str, Any]:
        s = self.spec
        missing = [k for k in s.obs_keys if k not in req]
        if missing:
            raise BadRequest(
                f"missing observation key(s) {missing}; the policy needs {list(s.obs_keys)}, "
                f"got {sorted(req)}"
            )
        obs: dict[str, Any] = {}
        for k, shape in s.obs_shapes.items():
            x = req[k]
            if not isinstance(x, np.ndarray):
                raise BadRequest(f"{k}: expected an array, got {type(x).__name__}")
            want = "uint8" if K.is_image(k) else "a float or integer dtype"
            if (K.is_image(k) and x.dtype != np.uint8) or (not K.is_image(k) and x.dtype.kind not in "fiub"):
                raise BadRequest(f"{k}: expected {want}, got {x.dtype}")
            if x.shape == tuple(shape):  # one step: the connection's window
                buf = window.setdefault(k, deque(maxlen=s.n_obs_steps))
                if not buf:
                    buf.extend([x] * s.n_obs_steps)
                else:
                    buf.append(x)
                x = np.stack(buf)
            elif x.ndim != len(shape) + 1 or x.shape[1:] != tuple(shape) or x.shape[0] < s.n_obs_steps:
                raise BadRequest(
                    f"{k}: expected {tuple(shape)} (one step) or "
                    f"({s.n_obs_steps}, {', '.join(map(str, shape))}), got {x.shape}"
                )
            obs[k] = x if K.is_image(k) else x.astype(np.float32)
        text = req.get("prompt", req.get(K.TASK))
        if text is not None:
            obs[K.TASK] = text.decode() if isinstance(text, bytes) else str(text)
        return obs
