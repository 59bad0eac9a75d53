"""Real-robot commands: ``vlaflow sim-arm``, ``node``, ``record`` and ``serve``.

The work is done by :class:`vlaflow.real.node.PolicyNode`, :class:`vlaflow.real.recorder.Recorder`,
:class:`vlaflow.real.server.PolicyServer` and :class:`vlaflow.cli.sim_arm.SimArm`; this module turns flags
into their typed parameters, starts the CycloneDDS transport (loopback unless ``CYCLONEDDS_URI`` is set)
and stops cleanly on SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _transport_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", type=int, default=0, help="DDS domain id (ROS_DOMAIN_ID)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- sim-arm
def add_sim_arm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="pick_place", help="pybullet task behind the topics (pick_place)")
    p.add_argument(
        "--robot", default="panda_pick_place", help="robot contract: a YAML file or a shipped name"
    )
    p.add_argument("--seed", type=int, default=0, help="scene seed of the first episode")
    p.add_argument("--latency", default="fixed:0", help="sensor message delay: fixed:L | lognormal:MED:S ...")
    p.add_argument("--jitter", type=float, default=0.0, help="extra uniform delay up to this many seconds")
    p.add_argument("--drop", type=float, default=0.0, help="probability a sensor message is lost")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault draws")
    p.add_argument("--command-log", default=None, help="JSON lines of every received command")
    _transport_args(p)


def run_sim_arm(args: argparse.Namespace) -> int:
    from vlaflow.cli.sim_arm import SimArm, SimArmConfig, load_contract_for
    from vlaflow.real.dds import DdsTransport

    contract = load_contract_for(args.robot)
    cfg = SimArmConfig(
        task=args.task,
        seed=args.seed,
        latency=args.latency,
        jitter_s=args.jitter,
        drop=args.drop,
        fault_seed=args.fault_seed,
        log=args.command_log,
    )
    stop = _stop_event()
    transport = DdsTransport(args.domain)
    arm = SimArm(contract, transport, cfg, log=_log)
    _log(f"sim-arm: {args.task} behind {contract.name} ({contract.control.rate_hz} Hz, domain {args.domain})")
    try:
        res = arm.run(stop, args.duration)
    finally:
        arm.close()
        transport.close()
    _log(f"sim-arm: {json.dumps(res)}")
    return 0


# ----------------------------------------------------------------------------------------- node
def add_node_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="checkpoint directory or onnx:DIR")
    p.add_argument("--robot", required=True, help="robot contract: a YAML file or a shipped name")
    p.add_argument("--merge", default="switch", choices=["switch", "rti", "rtc", "ensemble"])
    p.add_argument("--exec-horizon", type=int, default=0, help="steps between inference starts (0: Ta)")
    p.add_argument(
        "--task", default=None, help="instruction text (default: the instruction topic / contract)"
    )
    p.add_argument("--device", default="cpu", help="torch device for a checkpoint")
    p.add_argument("--threads", type=int, default=0, help="torch / onnxruntime threads (0: library default)")
    p.add_argument(
        "--inject-latency", default=None, help="extra inference latency (tests): lognormal:MED:S ..."
    )
    p.add_argument("--summary", default=None, help="write the per-run summaries and diagnostics here (JSON)")
    p.add_argument("--diagnostics-hz", type=float, default=1.0, help="diagnostics messages per second")
    p.add_argument(
        "--transport",
        choices=["dds", "rclpy"],
        default="dds",
        help="dds: CycloneDDS with ROS 2 wire names (default); rclpy: a ROS 2 lifecycle node (untested here)",
    )
    _transport_args(p)


def _delayed(infer, spec: str, seed: int = 0):
    """``infer`` with an extra latency drawn per call (the soak's injected inference latency)."""
    import numpy as np

    from vlaflow.sim.realtime import draw_latency, parse_latency

    kind, vals = parse_latency(spec)
    rng = np.random.default_rng(seed)

    def wrapped(obs, **kw):
        t = time.monotonic() + draw_latency(kind, vals, rng)
        out = infer(obs, **kw)
        time.sleep(max(0.0, t - time.monotonic()))
        return out

    return wrapped


def run_node(args: argparse.Namespace) -> int:
    from vlaflow.real.contract import load_contract
    from vlaflow.real.dds import DdsTransport
    from vlaflow.real.node import NodeConfig, PolicyNode
    from vlaflow.real.runtime import load_runtime

    if args.transport == "rclpy":
        from vlaflow.real.rclpy_node import spin_lifecycle_node

        spin_lifecycle_node(args.policy, args.robot, args.merge, args.device)
        return 0
    contract = load_contract(args.robot)
    kw = {"threads": args.threads} if args.threads and args.policy.startswith("onnx:") else {}
    if args.threads and not args.policy.startswith("onnx:"):
        import torch

        torch.set_num_threads(args.threads)
    runtime = load_runtime(args.policy, args.merge, args.device, kw)
    if args.inject_latency:
        runtime.infer = _delayed(runtime.infer, args.inject_latency)
    cfg = NodeConfig(
        merge=args.merge, exec_horizon=args.exec_horizon, task=args.task, diagnostics_hz=args.diagnostics_hz
    )
    stop = _stop_event()
    transport = DdsTransport(args.domain)
    node = PolicyNode(contract, runtime, transport, cfg, log=_log)
    _log(f"node: {args.policy} on {contract.name}, disabled until {contract.topics.enable} is True")
    try:
        node.spin(stop, args.duration)
    finally:
        transport.close()
        if args.summary:
            out = {"runs": node.runs, "diagnostics": node.diagnostics()}
            Path(args.summary).write_text(json.dumps(out, indent=1, default=float))
    return 0


# ----------------------------------------------------------------------------------------- enable
def add_enable_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--robot", default="panda_pick_place", help="robot contract (for the topic names)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--off", action="store_true", help="disengage (the node brings motion to rest)")
    g.add_argument("--estop", action="store_true", help="latch the e-stop (until the node restarts)")
    p.add_argument("--seed", type=int, default=None, help="reset the scene / runtime seed first (sim-arm)")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the node to confirm")
    p.add_argument("--domain", type=int, default=0, help="DDS domain id (ROS_DOMAIN_ID)")


def run_enable(args: argparse.Namespace) -> int:
    from vlaflow.real import msgs
    from vlaflow.real.contract import BOOL, STRING, QosSpec, load_contract
    from vlaflow.real.dds import DdsTransport
    from vlaflow.real.driver import EpisodeDriver

    c = load_contract(args.robot)
    t = DdsTransport(args.domain)
    try:
        d = EpisodeDriver(c, t)
        if args.seed is not None:
            t.publisher(c.topics.episode, STRING, QosSpec("reliable", 10)).publish(
                msgs.string_msg(f"reset:{args.seed}")
            )
            time.sleep(0.3)
        if args.estop:
            topic, value, want = c.topics.estop, True, "estopped"
        else:
            topic, value, want = c.topics.enable, not args.off, "disabled" if args.off else "running"
        pub = t.publisher(topic, BOOL, QosSpec("latched", 1))
        pub.publish(msgs.bool_msg(value))
        ok = d.wait_node(
            want, args.wait
        )  # the latched sample lives as long as this writer: stay until confirmed
        _log(
            f"{topic} <- {value}: "
            + (f"node is {want}" if ok else f"node did not report {want!r} within {args.wait} s")
        )
        return 0 if ok else 1
    finally:
        t.close()


# ----------------------------------------------------------------------------------------- record
def add_record_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--robot", required=True, help="robot contract: a YAML file or a shipped name")
    p.add_argument("--out", required=True, help="episode store (created, or appended to when it exists)")
    p.add_argument(
        "--task", default=None, help="instruction text (default: the instruction topic / contract)"
    )
    p.add_argument(
        "--bags", default=None, help="also write each saved episode's raw topics as a rosbag2 MCAP here"
    )
    p.add_argument(
        "--keys", action="store_true", help="also read start / save / discard from stdin (s, w, d)"
    )
    _transport_args(p)


def run_record(args: argparse.Namespace) -> int:
    from vlaflow.real.contract import load_contract
    from vlaflow.real.dds import DdsTransport
    from vlaflow.real.recorder import Recorder

    contract = load_contract(args.robot)
    stop = _stop_event()
    transport = DdsTransport(args.domain)
    rec = Recorder(contract, transport, args.out, task=args.task, bags=args.bags, log=_log)
    _log(
        f"record: {contract.name} -> {args.out}; commands on {contract.topics.record}: start | save | discard"
    )
    if args.keys:
        threading.Thread(target=_keys, args=(rec, stop), daemon=True).start()
    try:
        rec.spin(stop, args.duration)
    finally:
        rec.close()
        transport.close()
    _log(f"record: {rec.saved} saved, {rec.discarded} discarded")
    return 0


def _keys(rec, stop: threading.Event) -> None:
    names = {"s": "start", "w": "save", "d": "discard", "q": "quit"}
    for line in sys.stdin:
        cmd = names.get(line.strip()[:1])
        if cmd == "quit":
            stop.set()
            return
        if cmd:
            rec.command(cmd)


# ----------------------------------------------------------------------------------------- serve
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="checkpoint directory or onnx:DIR")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--device", default="cpu", help="torch device for a checkpoint")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")


def run_serve(args: argparse.Namespace) -> int:
    from vlaflow.real.runtime import load_runtime
    from vlaflow.real.server import PolicyServer

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _log(f"serve: binding {args.host}: clients beyond this machine can reach the policy")
    runtime = load_runtime(args.policy, "switch", args.device)
    stop = _stop_event()
    server = PolicyServer(runtime, host=args.host, port=args.port, name=args.policy)
    _log(
        f"serve: {args.policy} on ws://{args.host}:{server.port} (health: http://{args.host}:{server.port}/healthz)"
    )
    try:
        server.serve(stop, args.duration)
    finally:
        server.close()
    return 0
