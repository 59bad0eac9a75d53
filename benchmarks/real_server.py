"""Policy server throughput: requests/s and round-trip p50/p99 at batch 1 over loopback, openpi's client.

    python benchmarks/real_server.py --policy /work/base/run300/checkpoints/last --requests 300 \
        --out benchmarks/results

``vlaflow serve`` runs in its own process (1 torch thread); this process is the client
(``openpi_client.WebsocketClientPolicy``), sending the PushT low-dim observation window each request,
one request at a time. Round trip = client send -> reply decoded; the server's own ``infer_ms`` is the
policy's share. Writes ``real_server.json`` and ``real_server.md``.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _meta import run_info  # noqa: E402
from _real import CLI, dds_env, percentiles  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--policy", required=True)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dds_env(1)
    proc = subprocess.Popen(
        [*CLI, "serve", "--policy", args.policy, "--port", str(port)], env=env, stderr=subprocess.DEVNULL
    )
    try:
        t_end = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > t_end:
                    raise
                time.sleep(0.2)
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        meta = client.get_server_metadata()
        rng = np.random.default_rng(0)
        shapes = meta["obs_shapes"]
        to = meta["n_obs_steps"]

        def obs():
            return {k: rng.uniform(0, 512, (to, *v)).astype(np.float32) for k, v in shapes.items()}

        for _ in range(args.warmup):
            client.infer(obs())
        rtt, infer_ms = [], []
        t0 = time.perf_counter()
        for _ in range(args.requests):
            o = obs()
            t = time.perf_counter()
            out = client.infer(o)
            rtt.append(time.perf_counter() - t)
            infer_ms.append(out["server_timing"]["infer_ms"])
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    row = {
        "policy": args.policy,
        "requests": args.requests,
        "batch": 1,
        "requests_per_s": args.requests / wall,
        "round_trip_s": percentiles(rtt),
        "server_infer_ms": percentiles(infer_ms),
        "transport_overhead_ms_p50": float(np.percentile(np.array(rtt) * 1000 - np.array(infer_ms), 50)),
        "server_metadata": meta,
        "torch_threads_server": 1,
        **run_info(("vlaflow", "numpy", "torch", "websockets", "msgpack", "openpi-client")),
    }
    out = Path(args.out)
    (out / "real_server.json").write_text(json.dumps(row, indent=1) + "\n")
    r, i = row["round_trip_s"], row["server_infer_ms"]
    md = [
        "# Policy server over loopback (websocket + msgpack, openpi-client), batch 1",
        "",
        f"`{row['command']}` ({row['when']}, commit {row['git_commit']}); the server with 1 torch thread.",
        "",
        "| policy | requests | requests/s | round trip p50 / p99 (ms) | server infer p50 / p99 (ms) |"
        " transport + codec p50 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| `{args.policy}` | {args.requests} | {row['requests_per_s']:.1f} | {r['p50'] * 1000:.2f} / "
        f"{r['p99'] * 1000:.2f} | {i['p50']:.2f} / {i['p99']:.2f} | {row['transport_overhead_ms_p50']:.2f} |",
        "",
        f"Machine: {row['machine']}",
        f"Versions: {row['versions']}",
        "",
    ]
    (out / "real_server.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
