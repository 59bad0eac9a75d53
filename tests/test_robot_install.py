"""The torch-free robot install: ``pip install "vlaflow[robot]"`` into a fresh venv without torch, then there
the ONNX runtime (plain and RTI), the policy server with an openpi-style client, and ``vlaflow node`` over
CycloneDDS driving a fake arm's command topic -- for an ONNX export made here (in the torch venv).

The venv is built once per test module under pytest's tmp (20-40 s with pip's cache, left to pytest's tmp
retention): the package is copied out of the repository (so pip's build never writes into it) and installed
with its ``robot`` extra, every package pinned by a constraints file to the version this environment runs,
torch excluded. Without a reachable package index the test skips with pip's reason.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
ROBOT_EXTRA = "robot"
# q0 of the fake arm: inside the Panda limits of panda_joints.yaml, away from their margins
Q0 = np.array([0.0, 0.0, 0.0, -1.5, 0.0, 1.5, 0.0, 0.02, 0.02])
PIP_OFFLINE = re.compile(
    r"No matching distribution|Could not find a version|Failed to establish|NewConnectionError|"
    r"Temporary failure in name resolution|Network is unreachable|ProxyError|timed out",
    re.I,
)


# ------------------------------------------------------------------------------------------ pyproject
def _extras() -> tuple[list[str], dict[str, list[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()


def _closure(extra: str, extras: dict[str, list[str]], seen: set[str] | None = None) -> set[str]:
    """Distribution names an extra pulls in, following ``vlaflow[a,b]`` self-references."""
    seen = set() if seen is None else seen
    names: set[str] = set()
    for req in extras[extra]:
        if _name(req) == "vlaflow":
            for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                if sub.strip() not in seen:
                    seen.add(sub.strip())
                    names |= _closure(sub.strip(), extras, seen)
        else:
            names.add(_name(req))
    return names


def test_robot_extra_and_core_have_no_torch_and_all_still_has_it():
    base, extras = _extras()
    robot = _closure(ROBOT_EXTRA, extras)
    assert "torch" not in {_name(r) for r in base}, "torch is a core dependency again: no torch-free install"
    assert "torch" not in robot and not {"torchvision", "transformers", "diffusers"} & robot
    assert {"onnxruntime", "cyclonedds", "websockets", "msgpack", "pyyaml", "rosbags"} <= robot
    assert "torch" in _closure("train", extras) and "torch" in _closure("all", extras)
    readme = (REPO / "README.md").read_text()
    for setup in ('pip install -e ".[all]"', 'pip install -e ".[all,dev]"', 'pip install "vlaflow[robot]"'):
        assert setup in readme, setup


# ------------------------------------------------------------------------------------------ fixtures
def _constraints(path: Path) -> Path:
    """Every distribution of this environment at its version (torch, vlaflow, local builds and the
    packaging tools left out: pip's isolated build picks its own setuptools)."""
    pins, seen = [], set()
    for d in importlib.metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if (
            not name
            or name in seen
            or name in ("vlaflow", "torch", "pip", "setuptools", "wheel")
            or "+" in d.version
        ):
            continue
        seen.add(name)
        pins.append(f"{name}=={d.version}")
    path.write_text("\n".join(sorted(pins)) + "\n")
    return path


@pytest.fixture(scope="module")
def robot_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("robot_venv")
    src = root / "src"
    src.mkdir()
    shutil.copytree(REPO / "vlaflow", src / "vlaflow", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    cmd = [str(py), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", "-c",
           str(_constraints(root / "constraints.txt")), f"{src}[{ROBOT_EXTRA}]"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    if res.returncode != 0:
        tail = "\n".join(line for line in res.stderr.splitlines() if "is ignored" not in line)[-1500:]
        if PIP_OFFLINE.search(tail):
            pytest.skip(f"pip cannot reach a package index to build the robot venv: {tail[-300:]}")
        raise AssertionError(f"pip install .[{ROBOT_EXTRA}] failed:\n{tail}")
    return venv  # ~0.8 GB, left to pytest's tmp retention: removing 20k files here took up to 30 s


def _stats(lo, hi):
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    return {"min": lo, "max": hi, "mean": (lo + hi) / 2, "std": hi - lo, "q01": lo, "q99": hi}


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """A tiny joint-space diffusion policy (obs.state of the 9 Panda joints -> 8 action dims), exported."""
    torch = pytest.importorskip("torch")
    from vlaflow.deploy.export import ExportOptions, export_policy
    from vlaflow.policies import DiffusionConfig, build_policy
    from vlaflow.policies.base_config import NetConfig, UNetConfig

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = NetConfig(
        kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, step_embed_dim=16)
    )
    q = Q0[:8]
    stats = {"action": _stats(q - 0.004, q + 0.004), "obs.state": _stats(Q0 - 1, Q0 + 1)}
    cfg = DiffusionConfig(
        net=net,
        horizon=8,
        n_action_steps=4,
        num_inference_steps=4,
        fps=10.0,
        obs_shapes={"obs.state": (9,)},
        action_dim=8,
    )
    policy = build_policy(cfg, stats).eval()
    out = tmp_path_factory.mktemp("robot_onnx") / "onnx"
    export_policy(
        policy,
        out,
        ExportOptions(samplers=(("ddim", 4), ("ddpm", 20)), exporter="torchscript", n_parity_obs=2),
    )
    return out


def _contract(tmp: Path) -> Path:
    """panda_joints without its camera: what the low-dim export above observes."""
    import yaml

    from vlaflow.real.contract import ROBOTS_DIR

    c = yaml.safe_load((ROBOTS_DIR / "panda_joints.yaml").read_text())
    del c["streams"]["camera"], c["observation"]["obs.image.front"]
    c["control"]["phase_lock"] = "joints"
    path = tmp / "panda_joints_lowdim.yaml"
    path.write_text(yaml.safe_dump(c, sort_keys=False))
    return path


# What runs inside the torch-free venv: the runtime, the server and its client, the node and a fake arm.
ROBOT_SCRIPT = r"""
import importlib.util, json, subprocess, sys, threading, time
from pathlib import Path
assert importlib.util.find_spec("torch") is None, "torch is installed in the robot venv"
import numpy as np
import vlaflow
import vlaflow.deploy.onnx_runtime, vlaflow.deploy.onnx_rti, vlaflow.deploy.np_sampling
import vlaflow.real.node, vlaflow.real.server, vlaflow.real.dds, vlaflow.real.recorder, vlaflow.real.contract
from vlaflow.real import msgs
from vlaflow.real.contract import JOINT_STATE, JOINT_TRAJECTORY, QosSpec, load_contract
from vlaflow.real.dds import DdsTransport
from vlaflow.real.driver import EpisodeDriver
from vlaflow.real.runtime import load_runtime
from vlaflow.real.server import PolicyServer, packb, unpackb

export, contract_path, domain, summary = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
q0 = np.array(json.loads(sys.argv[5]))
bin_dir = Path(sys.executable).parent
out = {"vlaflow": vlaflow.__file__}
obs = {"obs.state": np.stack([q0, q0 + 0.01]).astype(np.float32)}

p = load_runtime("onnx:" + export, "switch")
p.reset(seed=7)
out["switch"] = p.infer(obs).actions.tolist()
r = load_runtime("onnx:" + export, "rti")
r.reset(seed=7)
out["rti_shape"] = list(r.infer(obs).actions.shape)

# the policy server and an openpi-style client (websockets + msgpack, what openpi-client does)
from websockets.sync.client import connect
server = PolicyServer(load_runtime("onnx:" + export, "switch"), port=0).start()
try:
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None, compression=None) as ws:
        out["meta"] = unpackb(ws.recv())
        ws.send(packb({"reset": True, "seed": 7}))
        unpackb(ws.recv())
        ws.send(packb(obs))
        out["served"] = unpackb(ws.recv())["actions"].tolist()
finally:
    server.close()

for cmd in ("node", "serve", "record"):
    h = subprocess.run([str(bin_dir / "vlaflow"), cmd, "--help"], capture_output=True, text=True, timeout=60)
    out[f"{cmd}_help"] = (h.returncode, "--policy" in h.stdout or "--robot" in h.stdout)

# a torch checkpoint (not onnx:DIR) on this install: one clear error, not a traceback
h = subprocess.run([str(bin_dir / "vlaflow"), "serve", "--policy", export, "--duration", "1"],
                   capture_output=True, text=True, timeout=60)
out["ckpt_without_torch"] = (h.returncode, h.stderr[-600:])

# vlaflow node over CycloneDDS; this process plays the arm: joint states in, commands counted
c = load_contract(contract_path)
node = subprocess.Popen(
    [str(bin_dir / "vlaflow"), "node", "--policy", "onnx:" + export, "--robot", contract_path,
     "--domain", str(domain), "--duration", "20", "--summary", summary],
    stderr=subprocess.PIPE, text=True,
)
t = DdsTransport(domain)
got = []
t.subscribe(c.command.topic, JOINT_TRAJECTORY, c.command.qos, lambda m: got.append(m.msg))
joints = t.publisher(c.streams["joints"].topic, JOINT_STATE, QosSpec("sensor", 1))
names = list(c.streams["joints"].names)
stop = threading.Event()

def arm():
    while not stop.is_set():
        joints.publish(msgs.joint_state(t.now_ns(), names, q0))
        time.sleep(0.02)

threading.Thread(target=arm, daemon=True).start()
d = EpisodeDriver(c, t)
out["node_disabled"] = d.wait_node("disabled", 30)
d.enable(True)
out["node_running"] = d.wait_node("running", 15)
t_end = time.monotonic() + 15
while len(got) < 8 and time.monotonic() < t_end:
    time.sleep(0.05)
out["commands"] = len(got)
out["command_joints"] = list(got[-1].joint_names) if got else []
d.enable(False)
out["node_stopped"] = d.wait_node("disabled", 10)
node.terminate()
out["node_rc"] = node.wait(30)
out["node_log"] = node.stderr.read()[-1500:]
stop.set()
t.close()
out["torch_loaded"] = "torch" in sys.modules
print("RESULT " + json.dumps(out))
"""


def test_node_server_and_onnx_runtime_run_without_torch(robot_venv, onnx_export, tmp_path):
    from vlaflow.deploy.onnx_runtime import OnnxPolicy

    contract = _contract(tmp_path)
    summary = tmp_path / "node_summary.json"
    domain = 150 + os.getpid() % 80  # apart from the other DDS tests' domains
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(
        [str(robot_venv / "bin" / "python"), "-c", ROBOT_SCRIPT, str(onnx_export), str(contract), str(domain),
         str(summary), json.dumps(Q0.tolist())],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT ", 1)[1])
    assert Path(out["vlaflow"]).is_relative_to(robot_venv)  # the installed copy, not the repository
    assert out["torch_loaded"] is False

    obs = {"obs.state": np.stack([Q0, Q0 + 0.01]).astype(np.float32)}
    here = OnnxPolicy(onnx_export)
    here.reset(seed=7)
    ref = here.infer(obs).actions  # the same export in the torch venv: same numbers
    np.testing.assert_allclose(np.array(out["switch"]), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(out["served"]), ref, rtol=0, atol=1e-6)
    assert out["rti_shape"] == [8, 8]
    assert out["meta"]["horizon"] == 8 and out["meta"]["obs_shapes"] == {"obs.state": [9]}

    for cmd in ("node", "serve", "record"):
        assert out[f"{cmd}_help"] == [0, True], cmd
    rc, err = out["ckpt_without_torch"]
    assert rc == 1 and "needs torch" in err and "vlaflow[train]" in err and "Traceback" not in err, err
    assert out["node_disabled"] and out["node_running"], out["node_log"]
    assert out["commands"] >= 8, out["node_log"]
    assert out["command_joints"][:7] == [f"panda_joint{i}" for i in range(1, 8)]
    assert out["node_stopped"] and out["node_rc"] == 0, out["node_log"]
    runs = json.loads(summary.read_text())["runs"]
    assert len(runs) >= 1 and runs[0]["policy_actions"] > 0, runs
    print(f"robot venv: {out['commands']} commands, first run {runs[0]['ticks']} ticks")


# The script of the next test: torch blocked in the parent and, through the re-imported main module, in
# the spawned evaluation workers.
BLOCKED_EVAL = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from vlaflow.cli import main

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    assert sys.modules["torch"] is None
    print("RC", rc)
"""


def test_eval_onnx_runs_with_torch_blocked(tmp_path):
    """``vlaflow eval --policy onnx:DIR`` needs the simulator (extra ``sim``), not torch: in-process and in
    spawned workers, with every ``import torch`` failing."""
    pytest.importorskip("gym_pusht")
    torch = pytest.importorskip("torch")
    from vlaflow.deploy.export import ExportOptions, export_policy
    from vlaflow.policies import DiffusionConfig, build_policy
    from vlaflow.policies.base_config import NetConfig, UNetConfig

    torch.manual_seed(0)
    net = NetConfig(
        kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, step_embed_dim=16)
    )
    px = _stats([0, 0], [512, 512])  # PushT pixels
    stats = {
        "action": px,
        "obs.agent_pos": px,
        "obs.keypoint": _stats(np.zeros((9, 2)), np.full((9, 2), 512)),
    }
    policy = build_policy(DiffusionConfig(net=net, horizon=8, n_action_steps=4, num_inference_steps=4), stats)
    export_policy(policy.eval(), tmp_path / "onnx", ExportOptions(samplers=(("ddim", 4),), n_parity_obs=1,
                                                                   exporter="torchscript"))  # fmt: skip
    script = tmp_path / "blocked_eval.py"
    script.write_text(BLOCKED_EVAL)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for workers in ("0", "1"):
        out = tmp_path / f"eval{workers}"
        res = subprocess.run(
            [sys.executable, str(script), "eval", "--task", "pusht", "--policy", f"onnx:{tmp_path / 'onnx'}",
             "--episodes", "2", "--max-steps", "12", "--workers", workers, "--out", str(out)],
            capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert res.returncode == 0 and "RC 0" in res.stdout, res.stderr[-2000:]
        agg = json.loads((out / "report.json").read_text())["aggregate"]
        assert agg["n_episodes"] == 2, agg
