"""ONNX export and the torch-free runtime: numpy sampler twin vs torch, parity reports of both families and an
image + language config, failing parity leaves nothing, torch-free import, the sim harness over OnnxPolicy,
and the export / eval onnx: / bench latency CLI entries (tiny models, random weights: parity needs no
training)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaflow.deploy import np_sampling as nps  # noqa: E402
from vlaflow.deploy.export import ExportOptions, export_policy, graph_ops  # noqa: E402
from vlaflow.deploy.onnx_runtime import OnnxPolicy, load_onnx_policy  # noqa: E402
from vlaflow.errors import VlaflowError  # noqa: E402
from vlaflow.policies import DiffusionConfig, FlowConfig, build_policy, save_checkpoint  # noqa: E402
from vlaflow.policies import samplers as tsamp  # noqa: E402
from vlaflow.policies.base_config import EncoderConfig, LanguageConfig, NetConfig, UNetConfig  # noqa: E402
from vlaflow.policies.path import RectifiedFlowPath, VPCosinePath  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = NetConfig(
    kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, step_embed_dim=16)
)
FAST = dict(exporter="torchscript", n_parity_obs=2)


def _stats(shape, lo, hi):
    lo_a, hi_a = np.full(shape, lo, np.float32), np.full(shape, hi, np.float32)
    return {"min": lo_a, "max": hi_a, "mean": (lo_a + hi_a) / 2, "std": hi_a - lo_a, "q01": lo_a, "q99": hi_a}


PUSHT_STATS = {
    "action": _stats((2,), 0, 512),
    "obs.keypoint": _stats((9, 2), 0, 512),
    "obs.agent_pos": _stats((2,), 0, 512),
}


def _lowdim(family: str):
    torch.manual_seed(0)
    cls = DiffusionConfig if family == "diffusion" else FlowConfig
    cfg = cls(net=TINY_UNET, horizon=8, n_action_steps=4, num_inference_steps=4)  # PushT low-dim keys
    return build_policy(cfg, PUSHT_STATS).eval()


@pytest.fixture(scope="module")
def diffusion_export(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("exp")
    policy = _lowdim("diffusion")
    ckpt = save_checkpoint(root / "ckpt", policy)
    opts = ExportOptions(samplers=(("ddim", 4), ("ddpm", 20)), unrolled_steps=4, **FAST)
    report = export_policy(policy, root / "onnx", opts, source=str(ckpt))
    return policy, root / "onnx", report, ckpt


# ------------------------------------------------------------------------------------- numpy twin vs torch
def test_numpy_path_and_grid_match_torch():
    vp = VPCosinePath(100)
    npvp = nps.NpVPPath(vp.alphas_cumprod.numpy())
    t = np.array([-1.0, 0.0, 0.5, 9.0, 37.25, 99.0], np.float32)
    # abar is interpolated bit-identically; torch's vectorized sqrt may differ from numpy's by an ulp
    np.testing.assert_array_equal(npvp._abar(t), vp.alpha_bar(torch.from_numpy(t)).numpy())
    np.testing.assert_allclose(npvp.alpha(t), vp.alpha(torch.from_numpy(t)).numpy(), rtol=2.5e-7, atol=0)
    np.testing.assert_allclose(npvp.sigma(t), vp.sigma(torch.from_numpy(t)).numpy(), rtol=2.5e-7, atol=0)
    for k in (1, 3, 10, 100):
        np.testing.assert_array_equal(npvp.timesteps(k), vp.timesteps(k).numpy())
    fl, npfl = RectifiedFlowPath(), nps.NpFlowPath()
    for k in (1, 2, 3, 7, 10, 16):
        np.testing.assert_array_equal(npfl.timesteps(k), fl.timesteps(k).numpy())  # bit-identical grid
    np.testing.assert_array_equal(npfl.alpha(np.float32(0.3)), fl.alpha(torch.tensor(0.3)).numpy())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler"])
@pytest.mark.parametrize("param", ["eps", "velocity"])
def test_numpy_sampler_loop_matches_torch(sampler, param):
    g = torch.Generator().manual_seed(1)
    path = VPCosinePath(50) if param == "eps" else RectifiedFlowPath()
    nppath = nps.NpVPPath(path.alphas_cumprod.numpy()) if param == "eps" else nps.NpFlowPath()
    w = torch.randn(3, 3, generator=g) * 0.3

    def predict(x, t):  # a fixed, time-dependent "network"
        return torch.tanh(x @ w) * (1 + 0.01 * t.view(-1, 1, 1))

    x_init = torch.randn(1, 6, 3, generator=g)
    kw = {"eta": 0.5 if sampler == "ddim" else 0.0, "clip_x0": 1.0 if sampler != "euler" else None}
    ref = tsamp.sample_loop(
        predict, path, x_init, parameterization=param, sampler=sampler, num_steps=5,
        generator=torch.Generator().manual_seed(7), **kw,
    )  # fmt: skip
    gn = torch.Generator().manual_seed(7)
    noises = [torch.randn(x_init.shape, generator=gn).numpy() for _ in range(5)]
    out, nfe = nps.sample_loop(
        lambda x, t: predict(torch.from_numpy(x), torch.from_numpy(t)).numpy(),
        nppath, x_init.numpy(), parameterization=param, sampler=sampler,
        timesteps=nppath.timesteps(5), step_noise=lambda i, _s: noises[i], **kw,
    )  # fmt: skip
    assert nfe == ref.nfe == 5 and out.dtype == np.float32
    np.testing.assert_allclose(out, ref.x0.numpy(), rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------- export + parity
def test_diffusion_export_parity_manifest_and_graphs(diffusion_export):
    policy, out, report, _ = diffusion_export
    assert report["passed"] and not report["failures"]
    assert (out / "parity.json").is_file() and json.loads((out / "parity.json").read_text())["passed"]
    whats = {r["what"] for r in report["summary"]}
    assert {
        "encoder",
        "ddim:4 step",
        "ddim:4 chunk",
        "ddpm:20 step",
        "ddpm:20 chunk",
        "unrolled chunk",
    } <= whats
    assert (
        len(report["samplers"]["ddpm:20"]["steps"]) == 20 and len(report["samplers"]["ddim:4"]["chunks"]) == 2
    )
    for r in report["summary"]:
        assert r["max_abs"] <= r["tol"] and r["min_cosine"] >= 0.9999
    m = json.loads((out / "manifest.json").read_text())
    assert m["spec"]["horizon"] == 8 and m["spec"]["n_obs_steps"] == 2 and m["spec"]["n_action_steps"] == 4
    assert m["path"]["kind"] == "vp" and len(m["path"]["alphas_cumprod"]) == 100
    assert m["parameterization"] == "eps" and m["sampler"] == {"name": "ddim", "num_steps": 4, "eta": 0.0,
                                                               "clip_x0": 1.0}  # fmt: skip
    assert m["normalizer"]["modes"]["action"] == "minmax"
    for name in ("encoder", "denoiser", "unrolled"):
        ops = graph_ops(out / m["graphs"][name]["file"])
        assert "Loop" not in ops and "Scan" not in ops and sum(ops.values()) > 5
    import onnx

    den = onnx.load(str(out / "denoiser.onnx"))
    assert max(o.version for o in den.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in den.graph.input] == ["x_t", "t", "cond"]  # time is a tensor input
    assert not list(out.parent.glob(".onnx.tmp-*"))


def test_runtime_matches_pytorch_sample_given_the_noise(diffusion_export):
    policy, out, _, _ = diffusion_export
    rng = np.random.default_rng(3)
    obs = {"obs.keypoint": rng.uniform(0, 512, (2, 9, 2)).astype(np.float32),
           "obs.agent_pos": rng.uniform(0, 512, (2, 2)).astype(np.float32)}  # fmt: skip
    p = OnnxPolicy(out, providers=["cpu"])
    assert p.config.horizon == 8 and p.config.obs_shapes["obs.keypoint"] == (9, 2)
    noise = rng.standard_normal((1, 8, 2)).astype(np.float32)
    x0 = p.unnormalize_action(p.denoise(p.encode(obs), noise))
    with torch.inference_mode():
        ref = policy.sample(
            {k: torch.from_numpy(v)[None] for k, v in obs.items()}, noise=torch.from_numpy(noise)
        )
    np.testing.assert_allclose(x0, ref.numpy(), atol=5e-3)  # raw PushT units (pixels)
    assert p.last_nfe == 4
    p.reset(seed=5)
    a = p.infer(obs).actions
    p.reset(seed=5)
    assert a.shape == (8, 2) and a.dtype == np.float32 and np.array_equal(a, p.infer(obs).actions)
    unrolled = OnnxPolicy(out, use_unrolled=True)
    unrolled.reset(seed=5)
    np.testing.assert_allclose(unrolled.infer(obs).actions, a, atol=5e-3)
    ddpm = OnnxPolicy(out, sampler="ddpm", num_steps=20, seed=0)
    assert ddpm.infer(obs).actions.shape == (8, 2) and ddpm.last_nfe == 20
    with pytest.raises(VlaflowError, match="obs.agent_pos"):
        p.infer({"obs.keypoint": obs["obs.keypoint"]})
    with pytest.raises(VlaflowError, match="not available"):
        OnnxPolicy(out, providers=["TensorrtExecutionProvider"])


def test_flow_export_with_dynamo_exporter(tmp_path):
    policy = _lowdim("flow")
    report = export_policy(policy, tmp_path / "flow", ExportOptions(exporter="dynamo", n_parity_obs=2))
    assert report["passed"] and {r["what"] for r in report["summary"]} == {
        "encoder",
        "euler:4 step",
        "euler:4 chunk",
    }
    m = json.loads((tmp_path / "flow" / "manifest.json").read_text())
    assert m["exporter"] == "dynamo" and m["path"] == {"kind": "flow", "time_scale": 100.0}
    assert m["parameterization"] == "velocity" and m["graphs"]["denoiser"]["ops"].get("Loop", 0) == 0
    assert OnnxPolicy(tmp_path / "flow", seed=0).infer(
        {"obs.keypoint": np.zeros((2, 9, 2), np.float32), "obs.agent_pos": np.zeros((2, 2), np.float32)}
    ).actions.shape == (8, 2)


def test_image_language_export_constant_instruction_tokens(tmp_path):
    torch.manual_seed(0)
    enc = EncoderConfig(
        image_base_width=8, norm_group_size=4, crop_shape=(36, 36), num_keypoints=4, image_feature_dim=8,
        language=LanguageConfig(enabled=True, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                max_length=24),
    )  # fmt: skip
    tasks = ("push the block", "stack the cube")
    cfg = DiffusionConfig(
        obs_shapes={"obs.state": (4,), "obs.image.front": (40, 40, 3)}, encoder=enc, net=TINY_UNET,
        tasks=tasks, horizon=8, n_action_steps=4, action_dim=3, num_inference_steps=3,
    )  # fmt: skip
    stats = {"action": _stats((3,), -1, 1), "obs.state": _stats((4,), -2, 2)}
    policy = build_policy(cfg, stats).eval()
    report = export_policy(policy, tmp_path / "vla", ExportOptions(samplers=(("ddim", 3),), **FAST))
    assert report["passed"], report["failures"]
    assert not any(m.training for m in policy.modules())  # the exporter must not leave crops/dropout on
    m = json.loads((tmp_path / "vla" / "manifest.json").read_text())
    assert sorted(m["language"]["tokens"]) == sorted(tasks) and m["cond"]["n_tokens"] == 3
    assert m["graphs"]["encoder"]["inputs"][1]["dtype"] == "uint8"
    p = OnnxPolicy(tmp_path / "vla", seed=0)
    rng = np.random.default_rng(0)
    obs = {"obs.state": rng.uniform(-2, 2, (2, 4)).astype(np.float32),
           "obs.image.front": rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)}  # fmt: skip
    a = p.infer({**obs, "task": "push the block"}).actions
    p.reset(seed=0)
    b = p.infer({**obs, "task": "stack the cube"}).actions
    assert a.shape == (8, 3) and not np.allclose(a, b)  # the instruction conditions the chunk
    with pytest.raises(VlaflowError, match="not known at export time"):
        p.infer({**obs, "task": "open the drawer"})


@pytest.mark.parametrize("head", ["unet", "mlp"])
def test_consistency_student_exports_as_one_step(tmp_path, head):
    from vlaflow.policies.base_config import MLPConfig, NetConfig
    from vlaflow.policies.consistency.config import ConsistencyConfig

    torch.manual_seed(0)
    net = TINY_UNET if head == "unet" else NetConfig(kind="mlp", mlp=MLPConfig(width=32, n_blocks=2))
    cfg = ConsistencyConfig(net=net, horizon=8, n_action_steps=4, clip_sample_range=1.0)
    policy = build_policy(cfg, PUSHT_STATS).eval()
    # the one step also unrolls into one graph (its time a constant that ONNX Runtime folds away)
    report = export_policy(policy, tmp_path / "cm", ExportOptions(**FAST, unrolled_steps=1))
    assert report["passed"] and [r["what"] for r in report["summary"]][1:] == [
        "onestep:1 step",
        "onestep:1 chunk",
        "unrolled chunk",
    ]
    obs = {"obs.keypoint": np.zeros((2, 9, 2), np.float32), "obs.agent_pos": np.zeros((2, 2), np.float32)}
    p = OnnxPolicy(tmp_path / "cm", seed=0, use_unrolled=False)
    a = p.infer(obs).actions
    assert a.shape == (8, 2) and p.last_nfe == 1 and p.manifest["timesteps"] == [90.0]
    u = OnnxPolicy(tmp_path / "cm", seed=0)
    np.testing.assert_allclose(u.infer(obs).actions, a, atol=1e-4)
    assert u.last_nfe == 1


def test_failing_parity_fails_the_export_and_leaves_nothing(tmp_path, capsys):
    policy = _lowdim("flow")
    with pytest.raises(VlaflowError, match="parity check failed.*euler:4 step: max-abs"):
        export_policy(policy, tmp_path / "bad", ExportOptions(tol_step=1e-12, tol_chunk=1e-12, **FAST))
    assert list(tmp_path.iterdir()) == []  # neither DIR nor its temporary sibling
    (tmp_path / "user").mkdir()
    with pytest.raises(VlaflowError, match="not an ONNX export"):
        export_policy(policy, tmp_path / "user", ExportOptions(**FAST))


# ------------------------------------------------------------------------------------- torch-free + sim
def test_runtime_is_torch_free(diffusion_export):
    _, out, _, _ = diffusion_export
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from vlaflow.deploy.onnx_runtime import OnnxPolicy
p = OnnxPolicy({str(out)!r}, providers=["CPUExecutionProvider"], seed=4)
kp, pos = np.full((2, 9, 2), 100, np.float32), np.full((2, 2), 50, np.float32)
a = p.infer({{"obs.keypoint": kp, "obs.agent_pos": pos}}).actions
assert sys.modules["torch"] is None
HEAVY = ("torch", "transformers", "onnx", "diffusers", "safetensors")
heavy = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in HEAVY)
print("SHAPE", a.shape, "HEAVY", heavy, "SUM", float(a.sum()))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SHAPE (8, 2) HEAVY []" in res.stdout
    here = (
        OnnxPolicy(out, seed=4)
        .infer(
            {
                "obs.keypoint": np.full((2, 9, 2), 100, np.float32),
                "obs.agent_pos": np.full((2, 2), 50, np.float32),
            }
        )
        .actions
    )
    assert abs(float(res.stdout.split("SUM")[1]) - float(here.sum())) < 1e-3  # same numbers as in-process


def test_onnx_policy_in_the_sim_harness(diffusion_export):
    pytest.importorskip("gym_pusht")
    from vlaflow.sim.evaluate import evaluate

    _, out, _, _ = diffusion_export
    factory = functools.partial(load_onnx_policy, str(out))
    report = evaluate(factory, task="pusht", n_episodes=2, workers=0, max_steps=12, progress=False)
    eps = report["episodes"]
    assert len(eps) == 2 and not report["errors"] and all(e["length"] == 12 for e in eps)
    assert all(0.0 <= e["max_reward"] <= 1.0 for e in eps)


def test_cli_export_eval_onnx_and_bench(diffusion_export, tmp_path, capsys):
    pytest.importorskip("gym_pusht")
    from vlaflow.cli import main

    _, _, _, ckpt = diffusion_export
    out = tmp_path / "cli_onnx"
    rc = main(["export", str(ckpt), "--out", str(out), "--exporter", "torchscript", "--samplers", "ddim:4",
               "--parity-obs", "1"])  # fmt: skip
    assert rc == 0 and "ddim:4 chunk" in capsys.readouterr().out and (out / "parity.json").is_file()
    rc = main(["eval", "--task", "pusht", "--policy", f"onnx:{out}", "--episodes", "1", "--workers", "0",
               "--max-steps", "8", "--out", str(tmp_path / "ev")])  # fmt: skip
    assert (
        rc == 0 and json.loads((tmp_path / "ev" / "report.json").read_text())["aggregate"]["n_episodes"] == 1
    )
    rc = main(["bench", "latency", str(ckpt), "--onnx", str(out), "--variants", "ddim:4", "--repeats", "3",
               "--step-repeats", "5", "--episodes", "1", "--max-steps", "8", "--workers", "0", "--json",
               "--out", str(tmp_path / "b")])  # fmt: skip
    assert rc == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {(r["variant"], r["runtime"]) for r in rows} == {
        ("DDIM-4", "torch-eager"),
        ("DDIM-4", "onnxruntime"),
    }
    for r in rows:
        assert set(r) >= {"variant", "runtime", "nfe", "p50_ms", "p99_ms", "mean_score"} and r["nfe"] == 4
        assert 0 < r["p50_ms"] <= r["p99_ms"] and 0 <= r["mean_score"] <= 1
    for f in ("latency.json", "latency.md", "latency_hist.png"):
        assert (tmp_path / "b" / f).is_file()


def test_bench_latency_takes_typed_options_and_a_score_callable_and_leaves_no_temp_dirs(
    diffusion_export, tmp_path, monkeypatch
):
    """bench_latency needs no simulator (the score comes from the caller) and removes the ONNX exports it
    makes in the temp dir, when it returns and when it raises."""
    import dataclasses
    import tempfile

    from vlaflow.deploy.bench import LatencyBench, bench_latency
    from vlaflow.errors import ConfigError

    _, _, _, ckpt = diffusion_export
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    calls = []

    def score(factory, episodes, workers, max_steps):
        rt = factory()  # the exported graphs must still be there while rows are scored
        assert rt.config.horizon == 8
        calls.append((episodes, workers, max_steps))
        return {"mean_score": 0.5, "success_rate": 0.25, "episodes": episodes}

    # a second checkpoint as "one-step" extra: its own export into a second temp dir
    cfg = LatencyBench(str(ckpt), variants=(("ddim", 4),), onestep=(str(ckpt),), episodes=2, workers=0,
                       max_steps=8, repeats=2, step_repeats=2)  # fmt: skip
    result = bench_latency(cfg, score=score)
    assert [(r["variant"], r["runtime"]) for r in result["rows"]] == [
        ("DDIM-4", "torch-eager"),
        ("DDIM-4", "onnxruntime"),
        ("one-step", "torch-eager"),
        ("one-step", "onnxruntime"),
    ]
    assert all(r["mean_score"] == 0.5 and r["score_source"] == "this run" for r in result["rows"])
    assert calls == [(2, 0, 8)] * 4 and result["onnx_dir"] is None
    assert not list(scratch.glob("vlaflow-bench-*"))
    unscored = bench_latency(dataclasses.replace(cfg, onestep=(), runtimes=("torch-eager",)))
    assert [r["mean_score"] for r in unscored["rows"]] == [None]
    with pytest.raises(FileNotFoundError):  # fails after its export: the export must go all the same
        bench_latency(dataclasses.replace(cfg, scores_from=(str(tmp_path / "missing.json"),)), score=score)
    assert not list(scratch.glob("vlaflow-bench-*"))
    with pytest.raises(ConfigError, match="--runtimes"):
        LatencyBench(str(ckpt), runtimes=("tensorrt",))
    with pytest.raises(ConfigError, match="--step-repeats must be >= 1"):
        LatencyBench(str(ckpt), step_repeats=0)


def test_tensorrt_builder_is_guarded(diffusion_export, capsys):
    from vlaflow.cli import tensorrt as tensorrt_cli
    from vlaflow.deploy import tensorrt_engine

    if tensorrt_engine.tensorrt_available():
        pytest.skip("tensorrt is installed here; the guard is for machines without it")
    _, out, _, _ = diffusion_export
    with pytest.raises(VlaflowError, match="needs the `tensorrt` Python package"):
        tensorrt_engine.build_engines(out)
    assert tensorrt_cli.main([str(out)]) == 1 and "tensorrt" in capsys.readouterr().err
    assert not list(out.glob("*.plan"))


@pytest.mark.parametrize(
    "gripper_dims, gripper_mode",
    [((), "none"), ((1,), "none"), ((1,), "clip")],
    ids=["no-gripper", "dims", "clip"],
)
def test_onnx_rti_matches_torch_rti_warm_start(diffusion_export, gripper_dims, gripper_mode):
    """Torch and ONNX RTI agree call for call, also with a gripper dim: both snap it only under "clip"."""
    from vlaflow.deploy.onnx_rti import OnnxRTIPolicy
    from vlaflow.deploy.rti import RTIConfig, RTIRuntime

    policy, out, _, _ = diffusion_export
    rng = np.random.default_rng(2)

    def obs():
        return {"obs.keypoint": rng.uniform(0, 512, (2, 9, 2)).astype(np.float32),
                "obs.agent_pos": rng.uniform(0, 512, (2, 2)).astype(np.float32)}  # fmt: skip

    fields = dict(sampler="ddim", num_steps=4, n_warm_steps=2, gripper_dims=gripper_dims)
    fields.update({"gripper_mode": gripper_mode} if gripper_mode != "none" else {})
    ref = RTIRuntime(policy, RTIConfig(**fields))
    onx = OnnxRTIPolicy(out, **fields)  # the same settings, as keywords
    ref.infer(obs())
    onx.infer(obs())
    assert onx.last_nfe == 4
    # the same previous chunk (first calls drew different noise), its gripper dim well inside (-1, 1)
    prev = torch.linspace(-0.6, 0.6, 16).view(1, 8, 2)
    ref._prev, onx._prev = prev.clone(), prev.numpy().copy()
    chunks, seen = [], []
    for shift in (4, 2):
        o = obs()
        seen.append(o)
        a, b = ref.infer(o, shift=shift).actions, onx.infer(o, shift=shift).actions
        assert onx.last_nfe == ref.last_nfe == 2
        np.testing.assert_allclose(b, a, atol=5e-3)  # raw PushT units (pixels)
        chunks.append(a)
    assert onx.nfe_history == [4, 2, 2]
    # the case is not vacuous: snapping the gripper changes the warm-started chunk
    snapped = RTIRuntime(policy, RTIConfig(sampler="ddim", num_steps=4, n_warm_steps=2, gripper_dims=(1,),
                                           gripper_mode="clip"))  # fmt: skip
    snapped.infer(obs())
    snapped._prev = prev.clone()
    moved = not np.allclose(snapped.infer(seen[0], shift=4).actions, chunks[0], atol=1e-3)
    assert moved == (gripper_mode != "clip")
    assert onx.rti == ref.rti  # one settings type for both runtimes


# ------------------------------------------------------------------------------------- composed (GPC)
def test_numpy_time_for_snr_and_v_conversions_match_torch():
    from vlaflow.policies import conversions as tconv

    vp = VPCosinePath(100)
    npvp = nps.NpVPPath(vp.alphas_cumprod.numpy())
    snr = np.array([1e-4, 0.01, 0.3, 1.0, 2.5, 17.0, 150.0], np.float32)
    np.testing.assert_allclose(
        npvp.time_for_snr(snr), vp.time_for_snr(torch.from_numpy(snr)).numpy(), atol=2e-5
    )
    fl = RectifiedFlowPath()
    np.testing.assert_array_equal(
        nps.NpFlowPath().time_for_snr(snr), fl.time_for_snr(torch.from_numpy(snr)).numpy()
    )
    g = np.random.default_rng(0)
    x, pred = g.standard_normal((2, 1, 4, 3)).astype(np.float32)
    a, s = np.float32(0.8), np.float32(0.6)
    for param in ("eps", "x0", "velocity", "v"):
        x0, eps = nps.to_x0_eps(pred, param, x, a, s)
        tx0, teps = tconv.to_x0_eps(torch.from_numpy(pred), param, torch.from_numpy(x), a, s)
        np.testing.assert_allclose(x0, tx0.numpy(), atol=1e-6)
        np.testing.assert_allclose(eps, teps.numpy(), atol=1e-6)
        back = nps.from_x0_eps(x0, eps, param, a, s)
        np.testing.assert_allclose(back, tconv.from_x0_eps(tx0, teps, param, a, s).numpy(), atol=1e-6)
        np.testing.assert_allclose(back, pred, atol=1e-5)  # round trip


class _TorchToy:
    def __init__(self, path, param, w):
        self.path, self.parameterization, self.w = path, param, w

    def predict(self, x, t, cond):
        return torch.tanh(x @ self.w) * (1 + 0.01 * t.view(-1, 1, 1)) + cond


class _NumpyToy:
    def __init__(self, path, param, w):
        self.path, self.parameterization, self.w = path, param, w.numpy()

    def predict(self, x, t, cond):
        return (np.tanh(x @ self.w) * (1 + np.float32(0.01) * t.reshape(-1, 1, 1)) + cond).astype(np.float32)


@pytest.mark.parametrize("reference", [0, 1])
@pytest.mark.parametrize("space", ["eps", "velocity", "x0", "v"])
def test_numpy_mixing_matches_the_torch_mixing(reference, space):
    from vlaflow.deploy import np_compose
    from vlaflow.policies.compose import mix_predictions

    g = torch.Generator().manual_seed(2)
    vp = VPCosinePath(100)
    ws = [torch.randn(3, 3, generator=g) * 0.4 for _ in range(2)]
    torch_parents = [_TorchToy(vp, "eps", ws[0]), _TorchToy(RectifiedFlowPath(), "velocity", ws[1])]
    np_paths = [nps.NpVPPath(vp.alphas_cumprod.numpy()), nps.NpFlowPath()]
    np_parents = [
        _NumpyToy(pth, p.parameterization, w) for pth, p, w in zip(np_paths, torch_parents, ws, strict=True)
    ]
    conds = [torch.randn(1, 4, 3, generator=g) * 0.1 for _ in range(2)]
    clips, weights = [1.0, None], (0.3, 0.7)
    same = [p.path == torch_parents[reference].path for p in torch_parents]
    ts = [50.0, 3.0, 0.0] if reference == 0 else [1.0, 0.5, 0.1]
    for t in ts:
        x = torch.randn(1, 4, 3, generator=g)
        tt = torch.full((1,), t)
        ref = mix_predictions(torch_parents, conds, weights, reference, space, x, tt, clips)
        got = np_compose.mix_predictions(
            np_parents,
            [c.numpy() for c in conds],
            weights,
            reference,
            space,
            x.numpy(),
            tt.numpy(),
            clips,
            same,
        )
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=2e-5)
    # weight 1 on the reference in its native space: the prediction passes through untouched
    one = [0.0, 0.0]
    one[reference] = 1.0
    native = torch_parents[reference].parameterization
    x = torch.randn(1, 4, 3, generator=g)
    got = np_compose.mix_predictions(
        np_parents,
        [c.numpy() for c in conds],
        one,
        reference,
        native,
        x.numpy(),
        np.float32([ts[0]]),
        clips,
        same,
    )
    assert np.array_equal(
        got, np_parents[reference].predict(x.numpy(), np.float32([ts[0]]), conds[reference].numpy())
    )


def _gpc_parents():
    torch.manual_seed(0)
    diff = _lowdim("diffusion")
    torch.manual_seed(1)
    cfg = FlowConfig(net=TINY_UNET, horizon=8, n_action_steps=4, num_inference_steps=4, n_obs_steps=1,
                     obs_shapes={"obs.keypoint": (9, 2)})  # fmt: skip
    flow = build_policy(cfg, {k: PUSHT_STATS[k] for k in cfg.norm_modes()}).eval()
    return diff, flow


def _pusht_obs(rng):
    return {"obs.keypoint": rng.uniform(0, 512, (2, 9, 2)).astype(np.float32),
            "obs.agent_pos": rng.uniform(0, 512, (2, 2)).astype(np.float32)}  # fmt: skip


@pytest.fixture(scope="module")
def composed_export(tmp_path_factory):
    from vlaflow.policies.composed.model import compose_policies

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gpc")
    comp = compose_policies(list(_gpc_parents()), (0.6, 0.4))  # diffusion reference: DDIM on the VP path
    report = export_policy(comp, root / "onnx", ExportOptions(samplers=(("ddim", 4), ("ddpm", 10)), **FAST))
    return comp, root / "onnx", report


def test_composed_export_one_graph_pair_per_parent_and_parity(composed_export):
    comp, out, report = composed_export
    assert report["passed"], report["failures"]
    assert {r["what"] for r in report["summary"]} == {
        "encoder", "ddim:4 step", "ddim:4 chunk", "ddpm:10 step", "ddpm:10 chunk",
    }  # fmt: skip
    for r in report["summary"]:
        assert r["max_abs"] <= r["tol"] and r["min_cosine"] >= 0.9999
    assert len(report["samplers"]["ddpm:10"]["steps"]) == 10  # per step: the mixed prediction
    assert [p["passed"] for p in report["parents"]] == [True, True]  # each parent's graphs alone
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "composed" and m["graphs"] == {} and m["parameterization"] == "eps"
    c = m["composition"]
    assert c["weights"] == [0.6, 0.4] and c["reference"] == 0 and c["space"] == "eps"
    assert [(e["dir"], e["family"], e["same_path_as_reference"]) for e in c["parents"]] == [
        ("parents/0", "diffusion", True), ("parents/1", "flow", False),
    ]  # fmt: skip
    assert [e["clip_x0"] for e in c["parents"]] == [1.0, None]
    for i in (0, 1):
        files = sorted(f.name for f in (out / "parents" / str(i)).iterdir())
        assert files == ["denoiser.onnx", "encoder.onnx", "manifest.json", "parity.json"]
        assert "Loop" not in graph_ops(out / "parents" / str(i) / "denoiser.onnx")


def test_onnx_policy_runs_a_composed_export_like_pytorch(composed_export):
    from vlaflow.deploy.onnx_rti import OnnxRTIPolicy

    comp, out, _ = composed_export
    rng = np.random.default_rng(5)
    obs = _pusht_obs(rng)
    p = OnnxPolicy(out, seed=0)
    cond = p.encode(obs)
    assert cond.shape == (1, comp.cond_width) and len(p.parents) == 2
    noise = rng.standard_normal((1, 8, 2)).astype(np.float32)
    got = p.unnormalize_action(p.denoise(cond, noise))
    with torch.inference_mode():
        ref = comp.sample(
            {k: torch.from_numpy(v)[None] for k, v in obs.items()}, noise=torch.from_numpy(noise)
        )
    np.testing.assert_allclose(got[0], ref[0].numpy(), atol=5e-3)  # raw PushT units (pixels)
    assert p.last_nfe == 4
    a = p.infer(obs)
    assert a.actions.shape == (8, 2) and a.nfe == 4 and np.isfinite(a.actions).all()
    rti = OnnxRTIPolicy(out, sampler="ddpm", num_steps=10, n_warm_steps=3)
    rti.infer(obs)
    rti.infer(_pusht_obs(rng), shift=4)
    assert rti.nfe_history == [10, 3]
    with pytest.raises(VlaflowError, match="obs.agent_pos"):
        p.infer({"obs.keypoint": obs["obs.keypoint"]})


def test_composed_export_with_weight_one_reproduces_the_parent_export(tmp_path):
    from vlaflow.policies.composed.model import compose_policies

    diff, flow = _gpc_parents()
    comp = compose_policies([diff, flow], (0.0, 1.0))  # flow is the reference: Euler, passed through
    export_policy(comp, tmp_path / "c", ExportOptions(**FAST))
    export_policy(flow, tmp_path / "f", ExportOptions(**FAST))
    obs = _pusht_obs(np.random.default_rng(1))
    a = OnnxPolicy(tmp_path / "c", seed=3).infer(obs).actions
    b = OnnxPolicy(tmp_path / "f", seed=3).infer({"obs.keypoint": obs["obs.keypoint"]}).actions
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(VlaflowError, match="no unrolled graph"):
        export_policy(comp, tmp_path / "u", ExportOptions(unrolled_steps=2, **FAST))


def test_cli_export_of_a_composed_checkpoint(tmp_path, capsys):
    from vlaflow.cli import main
    from vlaflow.policies.composed.model import compose_policies

    ckpt = save_checkpoint(tmp_path / "gpc", compose_policies(list(_gpc_parents()), (0.5, 0.5)))
    out = tmp_path / "onnx"
    rc = main(["export", str(ckpt), "--out", str(out), "--exporter", "torchscript", "--samplers", "ddim:4",
               "--parity-obs", "1"])  # fmt: skip
    assert rc == 0 and "ddim:4 chunk" in capsys.readouterr().out
    assert json.loads((out / "parity.json").read_text())["passed"]
    assert json.loads((out / "manifest.json").read_text())["source"] == str(ckpt)
    res = OnnxPolicy(out, seed=0).infer(_pusht_obs(np.random.default_rng(0)))
    assert res.actions.shape == (8, 2) and res.nfe == 4


def _edited_export(src: Path, dest: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


@pytest.mark.parametrize(
    "case",
    [
        "absolute graph path",
        "graph path out of the directory",
        "symlink out",
        "graphs swapped",
        "shape",
        "horizon",
    ],
)
def test_manifest_paths_are_confined_and_shapes_checked(diffusion_export, tmp_path, case):
    """issue 12: a manifest names only files of its own export, and its graphs' inputs are what it says."""
    _, onnx_dir, _, _ = diffusion_export
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes((onnx_dir / "encoder.onnx").read_bytes())

    def edit(m):
        if case == "absolute graph path":
            m["graphs"]["encoder"]["file"] = str(outside)
        elif case == "graph path out of the directory":
            m["graphs"]["encoder"]["file"] = "../elsewhere.onnx"
        elif case == "symlink out":
            m["graphs"]["encoder"]["file"] = "link.onnx"
        elif case == "graphs swapped":
            m["graphs"]["denoiser"]["file"] = "encoder.onnx"
        elif case == "horizon":  # the spec disagrees with the graphs
            m["spec"]["horizon"] += 1
        else:
            m["graphs"]["encoder"]["inputs"][0]["shape"][1] += 1

    d = _edited_export(onnx_dir, tmp_path / "x", edit)
    if case == "symlink out":
        (d / "link.onnx").symlink_to(outside)
    want = {
        "graphs swapped": "the graph's inputs are",
        "shape": "its spec",
        "horizon": "input 'x_t' has shape",
    }.get(case, "outside the export directory")
    with pytest.raises(VlaflowError, match=want):
        OnnxPolicy(d)


def test_bench_latency_rti_every_tick_row_is_named_and_scored_through_the_realtime_executor(diffusion_export):
    """``--rti-warm 3 --rti-exec-horizon 1``: the RTI rows say their settings, time 3 network evaluations
    per call after the first (eager and ONNX Runtime), and ask the score for the real-time executor."""
    from vlaflow.deploy.bench import LatencyBench, bench_latency

    _, _, _, ckpt = diffusion_export
    calls = []

    def score(factory, episodes, workers, max_steps, **realtime):
        rt = factory()
        calls.append((type(rt).__name__, rt.rti.n_warm_steps, realtime))
        return {"mean_score": 0.5, "success_rate": 0.25, "episodes": episodes}

    name = "RTI 3 warm, every tick"
    cfg = LatencyBench(str(ckpt), variants=(("ddim", 4),), rti=True, rti_warm=3, rti_exec_horizon=1,
                       episodes=2, workers=0, max_steps=8, repeats=4, step_repeats=2,
                       score_only=(f"{name}/torch-eager", f"{name}/onnxruntime"))  # fmt: skip
    rows = {(r["variant"], r["runtime"]): r for r in bench_latency(cfg, score=score)["rows"]}
    eager, ort = (
        rows[("RTI 3 warm, every tick", "torch-eager")],
        rows[("RTI 3 warm, every tick", "onnxruntime")],
    )
    assert eager["nfe"] == ort["nfe"] == (100 + 3 * 3) / 4  # the timed calls: one full, then warm starts
    want = {"merge": "rti", "exec_horizon": 1}
    assert calls == [("RTIRuntime", 3, want), ("OnnxRTIPolicy", 3, want)]
    assert rows[("DDIM-4", "torch-eager")]["mean_score"] is None  # not in score_only
