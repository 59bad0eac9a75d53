"""ONNX export of a steered (DSRL-refined) policy: the base's graphs + noise_actor.onnx, and the ONNX
runtime's chunk = SteeredRuntime's (actor noise -> frozen denoiser), not the base's chunk from w = 0.

Tiny random-weight models (parity needs no training); the actor's last layer is set to non-zero random
weights so its noise is far from zero (a fresh NoiseActor starts at w = 0, which would hide an ignored actor).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rl_fixtures import tiny_pusht_policy  # noqa: E402

from vlaflow.deploy.export import ExportOptions, export_policy  # noqa: E402
from vlaflow.deploy.onnx_runtime import OnnxPolicy  # noqa: E402
from vlaflow.errors import ConfigError  # noqa: E402
from vlaflow.policies import load_checkpoint, save_checkpoint  # noqa: E402
from vlaflow.policies.steered.actor import NoiseActor  # noqa: E402
from vlaflow.policies.steered.model import SteeredPolicy  # noqa: E402
from vlaflow.train.objectives.dsrl import SteeredRuntime  # noqa: E402

SCALE = 200.0  # raw action units per normalized unit: actions span [50, 450] -> [-1, 1]


def tiny_steered(family: str, tmp_path):
    """A tiny base (as tests/test_rl_refine.tiny_policy, deterministic 4-step sampler) steered by an actor
    with random last-layer weights, saved and reloaded as a `steered` checkpoint; (ckpt dir, policy)."""
    sampler = "ddim" if family == "diffusion" else "euler"
    base = tiny_pusht_policy(family, sampler=sampler, num_inference_steps=4).eval()
    actor = NoiseActor(base.n_cond_tokens * base.cond_dim, int(np.prod(base.target_shape)), 1.5, width=32)
    torch.nn.init.normal_(actor.body[-1].weight, std=0.5)  # away from the zero init: w clearly != 0
    torch.nn.init.normal_(actor.body[-1].bias, std=0.5)
    ckpt = save_checkpoint(tmp_path / f"steered_{family}", SteeredPolicy.wrap(base, actor, width=32))
    policy = load_checkpoint(ckpt)
    assert policy.config.family == "steered"
    return ckpt, policy


def _obs(rng) -> dict:
    return {"obs.state": rng.uniform(0, 512, (2, 5)).astype(np.float32)}


def _base_chunk_at_zero_noise(base, obs) -> np.ndarray:
    with torch.no_grad():
        cond = base.encode({"obs.state": torch.from_numpy(obs["obs.state"])[None]})
        x0 = base.denoise(cond, noise=torch.zeros(1, *base.target_shape)).x0
        return base.unnormalize_target(x0)[0].numpy()


def _check_runtime_matches(export_dir, policy, *, unrolled: bool) -> None:
    ort_pol = OnnxPolicy(export_dir, seed=0)
    assert ort_pol.steered and ort_pol.uses_unrolled == unrolled
    reference = SteeredRuntime(policy.base, policy.actor)
    rng = np.random.default_rng(123)
    for _ in range(4):
        obs = _obs(rng)
        got = ort_pol.infer(obs).actions
        want = reference.infer(obs).actions
        assert got.shape == want.shape == (8, 2)
        err = np.max(np.abs(got - want)) / SCALE  # normalized units, as the export's chunk tolerance
        assert err < 1e-3, err
        # the actor matters: the base's chunk from w = 0 is far away (an ignored actor could not pass above)
        assert np.max(np.abs(got - _base_chunk_at_zero_noise(policy.base, obs))) / SCALE > 0.05
        ort_pol.reset(seed=99)  # the noise is the actor's, not the generator's: same chunk after a re-seed
        np.testing.assert_array_equal(ort_pol.infer(obs).actions, got)
    # the noise graph itself: the actor's deterministic noise, bounded and non-zero
    cond = ort_pol.encode(_obs(rng))
    w = ort_pol.initial_noise(cond)
    with torch.no_grad():
        w_t = policy.steer(torch.from_numpy(cond)).numpy()
    np.testing.assert_allclose(w, w_t, atol=1e-5)
    assert w.shape == (1, 8, 2) and np.abs(w).max() <= 1.5 and np.abs(w).mean() > 0.1


def test_cli_exports_a_steered_diffusion_checkpoint_and_onnx_runtime_matches_steered_runtime(
    tmp_path, capsys
):
    torch.set_num_threads(1)
    from vlaflow.cli import main

    ckpt, policy = tiny_steered("diffusion", tmp_path)
    out = tmp_path / "onnx"
    rc = main(["export", str(ckpt), "--out", str(out), "--exporter", "torchscript", "--samplers", "ddim:4",
               "--parity-obs", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and "noise_actor" in printed and "steered ddim:4 chunk" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "steered" and m["base_family"] == "diffusion"
    assert set(m["graphs"]) == {"encoder", "denoiser", "noise_actor"} and (out / "noise_actor.onnx").is_file()
    assert m["steering"] == {"graph": "noise_actor", "noise_shape": [1, 8, 2], "bound": 1.5,
                             "deterministic": True}  # fmt: skip
    assert m["spec"]["extra"]["family"] == "steered" and m["graphs"]["noise_actor"]["ops"].get("Tanh")
    report = json.loads((out / "parity.json").read_text())
    rows = {r["what"]: r for r in report["summary"]}
    assert report["passed"] and {"encoder", "ddim:4 step", "ddim:4 chunk", "noise_actor"} <= set(rows)
    assert rows["noise_actor"]["max_abs"] <= 1e-4 and rows["steered ddim:4 chunk"]["max_abs"] <= 1e-3
    assert len(report["steered"]["chunks"]) == 2 and not report["steered"]["unrolled"]
    _check_runtime_matches(out, policy, unrolled=False)

    # the deployment entry points run it unchanged; RTI (which replaces the initial noise) refuses it
    from vlaflow.deploy.onnx_rti import OnnxRTIPolicy
    from vlaflow.real.runtime import load_runtime

    rt = load_runtime(f"onnx:{out}")
    obs = _obs(np.random.default_rng(5))
    np.testing.assert_allclose(
        rt.infer(obs).actions, SteeredRuntime(policy.base, policy.actor).infer(obs).actions, atol=0.2
    )
    with pytest.raises(ConfigError, match="steered"):
        OnnxRTIPolicy(out)


def test_steered_flow_export_through_the_unrolled_graph(tmp_path):
    torch.set_num_threads(1)
    _, policy = tiny_steered("flow", tmp_path)
    out = tmp_path / "onnx_flow"  # dynamo: the CLI's default exporter, on the actor graph too
    report = export_policy(policy, out, ExportOptions(exporter="dynamo", n_parity_obs=2, unrolled_steps=4))
    rows = {r["what"] for r in report["summary"]}
    assert report["passed"] and {"euler:4 chunk", "unrolled chunk", "noise_actor"} <= rows
    assert "steered euler:4 unrolled chunk" in rows and report["steered"]["unrolled"]
    assert json.loads((out / "manifest.json").read_text())["base_family"] == "flow"
    _check_runtime_matches(out, policy, unrolled=True)
