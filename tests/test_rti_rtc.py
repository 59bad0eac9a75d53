"""RTI-DP and RTC samplers: pure maths on literal inputs, network-evaluation counts, RTC's freeze and
beta = 0 parity with plain sampling, guidance pulling the overlap onto the previous chunk."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlaflow.data.normalize import Normalizer
from vlaflow.deploy.rtc import RTCConfig, RTCRuntime, guidance_weight, rtc_denoise, soft_mask
from vlaflow.deploy.rti import (
    RTIConfig,
    RTIRuntime,
    binarize_dims,
    gripper_scaled_stats,
    measure_contraction,
    rti_denoise,
    shift_chunk,
    warm_start,
)
from vlaflow.errors import ConfigError
from vlaflow.policies import DiffusionConfig, FlowConfig, NetConfig, UNetConfig, build_policy
from vlaflow.policies.path import RectifiedFlowPath, VPCosinePath

NET = NetConfig(
    kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, step_embed_dim=16)
)
H, DA = 8, 3


def _stats(shape, lo, hi):
    lo_a, hi_a = np.full(shape, lo, np.float32), np.full(shape, hi, np.float32)
    return {
        "min": lo_a,
        "max": hi_a,
        "mean": (lo_a + hi_a) / 2,
        "std": np.full(shape, (hi - lo) / 4, np.float32),
        "q01": lo_a,
        "q99": hi_a,
    }


STATS = {"action": _stats((DA,), -2.0, 2.0), "obs.state": _stats((5,), -2.0, 2.0)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _policy(fam):
    torch.manual_seed(0)
    cls = DiffusionConfig if fam == "diffusion" else FlowConfig
    cfg = cls(obs_shapes={"obs.state": (5,)}, action_dim=DA, horizon=H, n_action_steps=4, net=NET)
    return build_policy(cfg, STATS).eval()


def _obs(seed=0):
    return {"obs.state": np.random.default_rng(seed).normal(size=(2, 5)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------- RTI maths
def test_shift_chunk_repeats_last_action():
    x = torch.arange(5.0).view(1, 5, 1)
    assert shift_chunk(x, 2).flatten().tolist() == [2, 3, 4, 4, 4]
    assert shift_chunk(x, 0).flatten().tolist() == [0, 1, 2, 3, 4]
    assert shift_chunk(x, 9).flatten().tolist() == [4, 4, 4, 4, 4]


def test_binarize_and_warm_start_modes():
    x = torch.tensor([[[0.3, -0.2], [-0.7, 0.05]]])
    b = binarize_dims(x, (1,))
    assert b[..., 1].flatten().tolist() == [-1.0, 1.0] and torch.equal(b[..., 0], x[..., 0])
    path = VPCosinePath(100)
    eps = torch.ones_like(x)
    t0 = torch.tensor(2.0)
    assert torch.equal(warm_start(x, path, t0, "place"), path.alpha(t0) * x)
    want = path.alpha(t0) * x + path.sigma(t0) * eps
    assert torch.allclose(warm_start(x, path, t0, "noised", eps), want)


def test_gripper_scaled_stats_shrink_the_gripper_tenfold():
    stats = {"action": _stats((3,), 0.0, 1.0)}
    scaled = gripper_scaled_stats(stats, [2], factor=10)
    a = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    n0 = Normalizer(stats, {"action": "minmax"}).normalize("action", a)
    norm = Normalizer(scaled, {"action": "minmax"})
    n1 = norm.normalize("action", a)
    assert np.allclose(n1[:, :2], n0[:, :2]) and np.allclose(n1[:, 2], n0[:, 2] / 10)
    assert np.allclose(norm.unnormalize("action", n1), a, atol=1e-6)
    with pytest.raises(ConfigError, match="out of range"):
        gripper_scaled_stats(stats, [3])


class _LinearX0:
    """A fake policy whose x0 prediction is c + lam * (x_t - c): the few-step map contracts by ~lam."""

    parameterization = "x0"

    def __init__(self, lam, path=None):
        self.lam, self.path = lam, path or VPCosinePath(100)
        self.seen = []

    def predict(self, x, t, cond):
        self.seen.append(x.clone())
        return 0.5 + self.lam * (x - 0.5)

    def sampler_kwargs(self, sampler):
        return {}


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_contraction_measurement_matches_a_known_map(lam):
    pol = _LinearX0(lam)
    cfg = RTIConfig(sampler="ddim", num_steps=100, n_warm_steps=1)
    r = measure_contraction(pol, torch.zeros(1, 1, 1), torch.zeros(1, H, DA), cfg, n_pairs=4)
    # one DDIM step from k=0 to the clean end: x0 prediction at x = alpha(0) a, so ratio = lam alpha(0)
    want = lam * float(VPCosinePath(100).alpha(torch.tensor(0.0)))
    assert r["mean"] == pytest.approx(want, rel=1e-5) and r["max"] == pytest.approx(want, rel=1e-5)


def test_choose_warm_steps_takes_the_first_count_under_the_target():
    from vlaflow.deploy.rti import choose_warm_steps

    pol = _LinearX0(0.9)  # contracts only through the sampler's own shrinkage: more steps, smaller ratio
    base = RTIConfig(sampler="ddim", num_steps=100)
    args = (pol, torch.zeros(1, 1, 1), torch.zeros(1, H, DA), base)
    _, table = choose_warm_steps(*args, candidates=(1, 5, 20), target=0.0, n_pairs=2)
    r = [table[n]["mean"] for n in (1, 5, 20)]
    assert r[0] > r[1] > r[2], table
    pick, seen = choose_warm_steps(*args, candidates=(1, 5, 20), target=(r[0] + r[1]) / 2, n_pairs=2)
    assert pick == 5 and sorted(seen) == [1, 5]  # stops measuring at the first count under the target
    assert choose_warm_steps(*args, candidates=(1, 5), target=0.0, n_pairs=2)[0] == 5  # none: the largest


def test_rti_clip_mode_binarizes_the_warm_start_gripper():
    pol = _LinearX0(0.5)
    cfg = RTIConfig(sampler="ddim", num_steps=100, n_warm_steps=2, gripper_dims=(1,), gripper_mode="clip")
    prev = torch.full((1, H, DA), 0.2)
    res = rti_denoise(pol, torch.zeros(1, 1, 1), prev, 1, cfg)
    assert res.nfe == 2
    a1 = VPCosinePath(100).alpha(torch.tensor(1.0))  # t0 = k 1 on the 100-step grid, x_t0 = alpha x
    assert torch.allclose(pol.seen[0][..., 1], a1 * torch.ones(1, H))
    assert torch.allclose(pol.seen[0][..., 0], a1 * prev[..., 0])
    with pytest.raises(ConfigError, match="gripper_dims"):
        RTIConfig(gripper_mode="clip")


@pytest.mark.parametrize(
    "fam,sampler,steps,warm",
    [("diffusion", "ddpm", 100, 3), ("diffusion", "ddim", 10, 2), ("flow", "euler", 10, 3)],
)
def test_rti_runtime_counts_network_evaluations(fam, sampler, steps, warm):
    rt = RTIRuntime(_policy(fam), RTIConfig(sampler=sampler, num_steps=steps, n_warm_steps=warm))
    a = rt.infer(_obs(0)).actions
    b = rt.infer(_obs(1), shift=4).actions
    rt.infer(_obs(2))
    assert a.shape == b.shape == (H, DA) and np.isfinite(b).all()
    assert rt.nfe_history == [steps, warm, warm] and rt.last_nfe == warm
    rt.reset()
    rt.infer(_obs(0))
    assert rt.nfe_history == [steps]  # a new episode starts with full denoising again


def test_rti_is_deterministic_per_seed():
    pol = _policy("diffusion")
    outs = []
    for _ in range(2):
        rt = RTIRuntime(pol, RTIConfig(sampler="ddpm", num_steps=20, n_warm_steps=3))
        rt.reset(seed=7)
        outs.append([rt.infer(_obs(i)).actions for i in range(3)])
    assert all(np.array_equal(x, y) for x, y in zip(*outs, strict=True))


@pytest.mark.parametrize("warm", [2, 3])
def test_rti_every_tick_through_the_executor_replans_each_step_with_shift_one(warm):
    """RTI-DP's own regime: the executor replans at every control step (exec_horizon 1); each call after
    the first runs only ``warm`` network evaluations, warm-started from the previous chunk shifted by 1,
    and every emitted action is the first action of the chunk planned on that tick's observation."""
    from vlaflow.deploy.executor import RealtimeConfig
    from vlaflow.sim.realtime import SimClockExecutor, SimRealtimeConfig

    rt = RTIRuntime(_policy("diffusion"), RTIConfig(sampler="ddpm", num_steps=100, n_warm_steps=warm))
    rt.reset(seed=0)
    shifts, chunks = [], []

    def infer(obs, shift=None, delay=None):
        shifts.append(shift)
        res = rt.infer(obs, shift=shift)
        chunks.append(res.actions)
        return res

    cfg = SimRealtimeConfig(RealtimeConfig(merge="rti", exec_horizon=1), latency="fixed:0")
    ex = SimClockExecutor(infer, rt.config, cfg)
    n = 12
    emitted = [ex.act({"obs.state": _obs(t)["obs.state"][-1]}, t) for t in range(n)]  # one step each
    st = ex.stats()
    assert st["inferences"] == n and st["ticks"] == n and st["underruns"] == 0
    assert rt.nfe_history == [100] + [warm] * (n - 1)
    assert (
        st["nfe_first"] == 100
        and st["nfe_after_first_max"] == warm
        and st["nfe_total"] == 100 + warm * (n - 1)
    )
    assert shifts == [0] + [1] * (n - 1)
    for t in range(n):
        np.testing.assert_allclose(emitted[t], chunks[t][0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- RTC maths
def test_soft_mask_shape():
    w = soft_mask(10, 2, 3)
    assert w[:2].tolist() == [1.0, 1.0] and w[7:].tolist() == [0.0, 0.0, 0.0]
    mid = w[2:7]
    assert bool((mid[1:] < mid[:-1]).all()) and 0 < float(mid.min()) and float(mid.max()) < 1
    c = (10 - 3 - 2) / (10 - 3 - 2 + 1)
    assert float(w[2]) == pytest.approx(c * (math.exp(c) - 1) / (math.e - 1))


def test_guidance_weight_is_the_papers_on_the_flow_path():
    path = RectifiedFlowPath()
    for t in (0.1, 0.5, 0.9):
        tau = 1 - t  # the paper's time: 0 noise, 1 data
        r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
        paper = min(100.0, (1 - tau) / (tau * r2))
        tt = torch.tensor(t)
        assert float(guidance_weight(path.alpha(tt), path.sigma(tt), 100.0)) == pytest.approx(paper, rel=1e-5)
    assert float(guidance_weight(torch.tensor(0.0), torch.tensor(1.0), 5.0)) == 5.0  # pure noise: clipped


@pytest.mark.parametrize("fam", ["flow", "diffusion"])
def test_rtc_beta_zero_reproduces_plain_sampling(fam):
    pol = _policy(fam)
    cond = pol.encode({"obs.state": torch.from_numpy(_obs(0)["obs.state"])[None]})
    noise = torch.randn(1, H, DA, generator=torch.Generator().manual_seed(3))
    prev = torch.randn(1, H, DA, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = pol.denoise(cond, noise=noise).x0
    for d in (0, 2):
        got = rtc_denoise(pol, cond, prev, d, 4, beta=0.0, noise=noise).x0
        assert torch.equal(got[:, d:], plain[:, d:])
        assert torch.equal(got[:, :d], shift_chunk(prev, 4)[:, :d])


@pytest.mark.parametrize("fam", ["flow", "diffusion"])
def test_rtc_freezes_first_d_and_guidance_pulls_the_overlap(fam):
    pol = _policy(fam)
    d, s = 2, 3
    rt = RTCRuntime(pol, RTCConfig(beta=10.0))
    rt.reset(seed=1)
    first = rt.infer(_obs(0)).actions
    nxt = rt.infer(_obs(5), shift=s, delay=d).actions
    assert (
        np.array_equal(nxt[:d], first[s : s + d])
        and rt.last_delay == d
        and rt.last_nfe == pol.config.num_inference_steps
    )
    if fam == "diffusion":
        return  # an untrained eps-net's x0 Jacobian is ~1/alpha (meaningless); measured on real checkpoints
    # the same noise without guidance: the soft-masked overlap error must be larger
    cond = pol.encode({"obs.state": torch.from_numpy(_obs(5)["obs.state"])[None]})
    prev = torch.from_numpy(pol.normalizer.normalize("action", first))[None]
    noise = torch.randn(1, H, DA, generator=torch.Generator().manual_seed(11))
    w = soft_mask(H, d, s).view(1, -1, 1)
    target = shift_chunk(prev, s)
    errs = []
    for beta in (0.0, 10.0):
        x0 = rtc_denoise(pol, cond, prev, d, s, beta=beta, noise=noise).x0.detach()
        errs.append(float((w[:, d:] * (x0 - target)[:, d:]).pow(2).sum()))
    assert errs[1] < 0.3 * errs[0], errs


def test_rtc_estimates_delay_from_measured_latency(monkeypatch):
    pol = _policy("flow")
    rt = RTCRuntime(pol, RTCConfig(beta=1.0, default_delay=3))
    assert rt.estimated_delay() == 3
    rt._latencies.extend([0.05, 0.21])  # seconds, at the policy's 10 Hz
    assert rt.estimated_delay() == 3
    rt._latencies.clear()
    rt._latencies.append(0.1)
    assert rt.estimated_delay() == 1


def test_rti_warm_steps_default_to_20_or_half_a_short_grid():
    from vlaflow.deploy.rti import RTIConfig

    assert RTIConfig().n_warm_steps == 20  # DDPM-100: measured best on PushT
    assert RTIConfig(sampler="euler", num_steps=10).n_warm_steps == 5
    assert RTIConfig(sampler="ddim", num_steps=1).n_warm_steps == 1
    assert RTIConfig(n_warm_steps=3).n_warm_steps == 3


# ---------------------------------------------------------------------------------------------- composed
def _composed(weights):
    from vlaflow.policies.composed.model import compose_policies

    parents = [_policy("diffusion"), _policy("flow")]
    return compose_policies(parents, weights), parents


def _runtimes(kind):
    if kind == "rti":
        return lambda p: RTIRuntime(p, RTIConfig(sampler="ddpm", num_steps=20, n_warm_steps=3))
    return lambda p: RTCRuntime(p, RTCConfig(beta=5.0))


@pytest.mark.parametrize("kind", ["rti", "rtc"])
@pytest.mark.parametrize("which", [0, 1])
def test_rti_rtc_on_a_composed_policy_with_weight_one_reproduce_that_parent(kind, which):
    """The composite is a policy on the contract: RTI's warm start and RTC's VJP through ``predict`` run on
    it unchanged, and with weight 1 on a parent every chunk equals that parent's, bit for bit."""
    comp, parents = _composed((1.0, 0.0) if which == 0 else (0.0, 1.0))
    make = _runtimes(kind)
    rc, rp = make(comp), make(parents[which])
    rc.reset(seed=3)
    rp.reset(seed=3)
    for i in range(4):
        a, b = rc.infer(_obs(i), shift=3, delay=1), rp.infer(_obs(i), shift=3, delay=1)
        assert np.array_equal(a.actions, b.actions), (kind, which, i)
        assert a.nfe == b.nfe


@pytest.mark.parametrize("kind", ["rti", "rtc"])
def test_rti_rtc_on_a_mixed_composed_policy(kind):
    comp, parents = _composed((0.5, 0.5))
    rt = _runtimes(kind)(comp)
    rt.reset(seed=0)
    outs = [rt.infer(_obs(i), shift=4, delay=2) for i in range(3)]
    assert all(o.actions.shape == (H, DA) and np.isfinite(o.actions).all() for o in outs)
    if kind == "rti":
        assert rt.nfe_history == [20, 3, 3]
    else:
        assert [o.nfe for o in outs] == [comp.config.num_inference_steps] * 3
        assert np.array_equal(outs[2].actions[:2], outs[1].actions[4:6])  # the first d actions frozen
    # the mix is neither parent
    solo = _runtimes(kind)(parents[0])
    solo.reset(seed=0)
    assert not np.allclose(solo.infer(_obs(0)).actions, outs[0].actions)


def test_rtc_beta_zero_on_a_composed_policy_is_plain_composed_sampling():
    comp, _ = _composed((0.3, 0.7))
    cond = comp.encode({"obs.state": torch.from_numpy(_obs(0)["obs.state"])[None]})
    assert cond.shape == (1, comp.cond_width)  # the parents' conditions, packed
    noise = torch.randn(1, H, DA, generator=torch.Generator().manual_seed(3))
    prev = torch.randn(1, H, DA, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = comp.denoise(cond, noise=noise).x0
    got = rtc_denoise(comp, cond, prev, 2, 4, beta=0.0, noise=noise).x0
    assert torch.equal(got[:, 2:], plain[:, 2:])
    guided = rtc_denoise(comp, cond, prev, 2, 4, beta=5.0, noise=noise).x0.detach()
    assert not torch.allclose(guided[:, 2:], plain[:, 2:])


def test_rti_settings_are_one_torch_free_definition():
    """RTIConfig lives in a torch-free module both runtimes import; its samplers are the torch samplers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vlaflow.deploy import onnx_rti, rti, rti_config
    from vlaflow.policies.samplers import SAMPLERS

    assert rti.RTIConfig is rti_config.RTIConfig is onnx_rti.RTIConfig
    # the multi-step samplers: a warm start runs a tail of a grid, which the one-step sampler has not
    assert rti_config.RTI_SAMPLERS == tuple(s for s in SAMPLERS if s != "onestep")
    assert RTIConfig(gripper_dims=(1,)).binarized_dims == ()  # dims alone only name the gripper
    assert RTIConfig(gripper_dims=[1], gripper_mode="clip").binarized_dims == (1,)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import vlaflow.deploy.onnx_rti, vlaflow.deploy.rti_config\n"
        "print('OK')"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
