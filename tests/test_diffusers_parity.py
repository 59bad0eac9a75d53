"""Our DDPM / DDIM steps against diffusers' schedulers (squaredcos_cap_v2, 100 steps, epsilon)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers (dev extra) is needed for the parity test")

from vlaflow.policies.conversions import to_x0_eps  # noqa: E402
from vlaflow.policies.path import VPCosinePath  # noqa: E402
from vlaflow.policies.samplers import ddim_step, ddpm_step, sample_loop  # noqa: E402

N = 100
SHAPE = (3, 16, 2)


def _sched(cls, clip: bool):
    kw = dict(
        num_train_timesteps=N, beta_schedule="squaredcos_cap_v2", clip_sample=clip, prediction_type="epsilon"
    )
    if cls is diffusers.DDIMScheduler:
        kw.update(set_alpha_to_one=True, steps_offset=0)
    return cls(**kw)


def test_alphas_cumprod_match():
    ours = VPCosinePath(N).alphas_cumprod
    ref = _sched(diffusers.DDPMScheduler, True).alphas_cumprod
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("num_steps", [100, 20])
def test_ddpm_step_matches(clip, num_steps):
    path = VPCosinePath(N)
    sched = _sched(diffusers.DDPMScheduler, clip)
    sched.set_timesteps(num_steps)
    ts = path.timesteps(num_steps)
    assert ts[:-1].long().tolist() == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(sched.timesteps.tolist()):
        x = 3.0 * torch.randn(SHAPE, generator=g)  # large enough that clipping matters
        out = torch.randn(SHAPE, generator=g)
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        tt, tn = ts[i], ts[i + 1]
        x0, _ = to_x0_eps(out, "eps", x, path.alpha(tt), path.sigma(tt))
        if clip:
            x0 = x0.clamp(-1, 1)
        ours = ddpm_step(x, x0, path.alpha(tt), path.sigma(tt), path.alpha(tn), path.sigma(tn), noise)
        torch.testing.assert_close(ours.x_next, ref, atol=1e-5, rtol=1e-5, msg=f"t={t}")
        if t == 0:
            assert float(ours.std) == 0.0


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches(clip, eta):
    path = VPCosinePath(N)
    sched = _sched(diffusers.DDIMScheduler, clip)
    sched.set_timesteps(10)
    ts = path.timesteps(10)
    assert ts[:-1].long().tolist() == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(2)
    for i, t in enumerate(sched.timesteps.tolist()):
        x = 3.0 * torch.randn(SHAPE, generator=g)
        out = torch.randn(SHAPE, generator=g)
        noise = torch.randn(SHAPE, generator=g)
        ref = sched.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        tt, tn = ts[i], ts[i + 1]
        x0, eps = to_x0_eps(out, "eps", x, path.alpha(tt), path.sigma(tt))
        if clip:
            x0 = x0.clamp(-1, 1)
        ours = ddim_step(
            x, x0, eps, path.alpha(tt), path.sigma(tt), path.alpha(tn), path.sigma(tn), eta, noise
        )
        torch.testing.assert_close(ours.x_next, ref, atol=1e-5, rtol=1e-5, msg=f"t={t}")


def _toy_model(x, t):
    # A fixed, t-dependent "network" so that whole chains can be compared.
    return 0.7 * torch.tanh(x) + 0.1 * torch.cos(t.float() / 7.0).view(-1, 1, 1)


@pytest.mark.parametrize("sampler,cls,steps", [("ddim", "DDIMScheduler", 10), ("ddpm", "DDPMScheduler", 100)])
def test_full_chain_matches(sampler, cls, steps):
    path = VPCosinePath(N)
    sched = _sched(getattr(diffusers, cls), True)
    sched.set_timesteps(steps)
    x_init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    g_ref = torch.Generator().manual_seed(4)
    x = x_init.clone()
    for t in sched.timesteps:
        out = _toy_model(x, t.expand(SHAPE[0]))
        kw = {"generator": g_ref} if sampler == "ddpm" else {}
        x = sched.step(out, int(t), x, **kw).prev_sample
    ours = sample_loop(
        _toy_model,
        path,
        x_init,
        parameterization="eps",
        sampler=sampler,
        num_steps=steps,
        clip_x0=1.0,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(ours.x0, x, atol=1e-4, rtol=1e-4)
    assert ours.nfe == steps
