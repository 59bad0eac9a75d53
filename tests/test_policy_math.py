"""Gaussian paths on closed forms, conversion round trips, sampler identities, chain log-probs, flow toy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlaflow.policies import conversions as C
from vlaflow.policies.path import RectifiedFlowPath, VPCosinePath, pi0_train_time
from vlaflow.policies.samplers import (
    chain_log_prob,
    ddim_step,
    ddpm_step,
    euler_step,
    gaussian_log_prob,
    sample_loop,
)

VP, FLOW = VPCosinePath(100), RectifiedFlowPath()


def test_vp_path_closed_form():
    k = torch.arange(-1, 100).float()
    a, s = VP.alpha(k), VP.sigma(k)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), atol=1e-6, rtol=0)
    assert float(a[0]) == 1.0 and float(s[0]) == 0.0  # k = -1 is the clean end
    # squared cosine: abar_k ~ cos^2(((k+1)/N + s)/(1+s) * pi/2) / cos^2(s/(1+s) * pi/2) (up to the 0.999 cap)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for kk in (0, 10, 50, 90):
        assert abs(float(VP.alpha_bar(torch.tensor(float(kk)))) - f((kk + 1) / 100) / f(0)) < 1e-4
    assert float(VP.alpha_bar(torch.tensor(99.0))) < 1e-3  # the last step is (almost) pure noise
    snr = a / s.clamp(min=1e-12)
    assert (snr[1:] < snr[:-1]).all(), "SNR must fall strictly with k"
    # fractional times interpolate between the integer entries
    mid = float(VP.alpha_bar(torch.tensor(10.5)))
    assert float(VP.alpha_bar(torch.tensor(11.0))) < mid < float(VP.alpha_bar(torch.tensor(10.0)))


def test_flow_path_closed_form():
    t = torch.linspace(0, 1, 101)
    a, s = FLOW.alpha(t), FLOW.sigma(t)
    torch.testing.assert_close(a + s, torch.ones_like(t))
    assert float(FLOW.alpha(torch.tensor(0.0))) == 1.0 and float(FLOW.sigma(torch.tensor(1.0))) == 1.0
    assert float(FLOW.sigma(torch.tensor(0.0))) == 0.0 and float(FLOW.alpha(torch.tensor(1.0))) == 0.0
    snr = a[1:-1] / s[1:-1]
    assert (snr[1:] < snr[:-1]).all()
    grid = FLOW.timesteps(10)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 11


@pytest.mark.parametrize("path", [VP, FLOW], ids=["vp", "flow"])
def test_time_for_snr_inverts(path):
    t = torch.tensor([3.0, 17.5, 60.0, 95.0]) if path is VP else torch.tensor([0.05, 0.3, 0.7, 0.95])
    back = path.time_for_snr(path.alpha(t) / path.sigma(t))
    torch.testing.assert_close(back, t, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("path", [VP, FLOW], ids=["vp", "flow"])
def test_conversion_round_trips(path):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 16, 2, generator=g)
    eps = torch.randn(64, 16, 2, generator=g)
    t = (
        torch.randint(0, 100, (64,), generator=g).float()
        if path is VP
        else torch.rand(64, generator=g) * 0.98 + 0.01
    )
    a, s = path.alpha(t).view(-1, 1, 1), path.sigma(t).view(-1, 1, 1)
    x_t = a * x0 + s * eps
    truth = {p: C.from_x0_eps(x0, eps, p, a, s) for p in C.PARAMETERIZATIONS}
    torch.testing.assert_close(truth["velocity"], eps - x0)
    torch.testing.assert_close(truth["score"], -eps / s)
    for src in C.PARAMETERIZATIONS:
        rx0, reps = C.to_x0_eps(truth[src], src, x_t, a, s)
        torch.testing.assert_close(rx0, x0, atol=2e-3, rtol=1e-3, msg=f"x0 from {src}")
        torch.testing.assert_close(reps, eps, atol=2e-3, rtol=1e-3, msg=f"eps from {src}")
        for dst in C.PARAMETERIZATIONS:
            got = C.convert(truth[src], src, dst, x_t, a, s)
            torch.testing.assert_close(got, truth[dst], atol=5e-3, rtol=2e-3, msg=f"{src}->{dst}")


def test_rescale_between_paths_at_matched_snr():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    for k in (5.0, 40.0, 80.0):
        k = torch.tensor(k)
        a, s = VP.alpha(k), VP.sigma(k)
        t_flow = FLOW.time_for_snr(a / s)
        af, sf = FLOW.alpha(t_flow), FLOW.sigma(t_flow)
        x_flow = C.rescale_between_paths(a * x0 + s * eps, a, s, af, sf)
        torch.testing.assert_close(x_flow, af * x0 + sf * eps, atol=1e-5, rtol=1e-5)
        # and back
        k_back = VP.time_for_snr(af / sf)
        torch.testing.assert_close(k_back, k, atol=1e-3, rtol=0)


def test_pi0_time_distribution():
    t = pi0_train_time(200_000, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0.001 and float(t.max()) <= 1.0
    # Beta(1.5, 1): mean 0.6, P(s < 0.5) = 0.5**1.5
    assert abs(float(t.mean()) - (0.001 + 0.999 * 0.6)) < 3e-3
    assert abs(float((t < 0.001 + 0.999 * 0.5).float().mean()) - 0.5**1.5) < 5e-3


def test_euler_step_is_plain_euler_on_flow_path_and_exact_for_straight_paths():
    g = torch.Generator().manual_seed(2)
    x, u = torch.randn(4, 8, 2, generator=g), torch.randn(4, 8, 2, generator=g)
    t, tn = torch.tensor(0.7), torch.tensor(0.4)
    got = euler_step(x, u, FLOW.alpha(t), FLOW.sigma(t), FLOW.alpha(tn), FLOW.sigma(tn))
    torch.testing.assert_close(got, x + (tn - t) * u)
    # With the exact velocity of one (x0, eps) pair, Euler lands exactly on that pair's path, on any path.
    x0, eps = torch.randn(4, 8, 2, generator=g), torch.randn(4, 8, 2, generator=g)
    for path, (t, tn) in ((FLOW, (0.9, 0.2)), (VP, (80.0, 30.0))):
        t, tn = torch.tensor(t), torch.tensor(tn)
        xt = path.alpha(t) * x0 + path.sigma(t) * eps
        nxt = euler_step(xt, eps - x0, path.alpha(t), path.sigma(t), path.alpha(tn), path.sigma(tn))
        torch.testing.assert_close(nxt, path.alpha(tn) * x0 + path.sigma(tn) * eps, atol=1e-5, rtol=1e-5)


def test_ddim_eta1_has_ddpm_variance_and_ddim_eta0_is_deterministic():
    g = torch.Generator().manual_seed(3)
    x, x0, eps = (torch.randn(2, 3, generator=g) for _ in range(3))
    a, s, an, sn = (
        VP.alpha(torch.tensor(50.0)),
        VP.sigma(torch.tensor(50.0)),
        VP.alpha(torch.tensor(40.0)),
        VP.sigma(torch.tensor(40.0)),
    )
    d1 = ddim_step(x, x0, eps, a, s, an, sn, 1.0, torch.zeros_like(x))
    p = ddpm_step(x, x0, a, s, an, sn, torch.zeros_like(x))
    torch.testing.assert_close(d1.std, p.std)
    d0 = ddim_step(x, x0, eps, a, s, an, sn, 0.0, torch.randn(2, 3, generator=g))
    assert float(d0.std) == 0.0
    torch.testing.assert_close(d0.x_next, an * x0 + sn * eps)


def test_chain_log_prob_is_sum_of_step_gaussians():
    def model(x, t):
        return 0.5 * x

    x_init = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(4))
    res = sample_loop(
        model,
        VP,
        x_init,
        parameterization="eps",
        sampler="ddpm",
        num_steps=10,
        generator=torch.Generator().manual_seed(5),
        return_chain=True,
    )
    assert len(res.steps) == 10 and float(res.steps[-1].std) == 0.0
    manual = torch.zeros(5)
    for st in res.steps[:-1]:
        manual += torch.distributions.Normal(st.mean, st.std).log_prob(st.x_next).flatten(1).sum(-1)
    torch.testing.assert_close(chain_log_prob(res.steps), manual, atol=1e-3, rtol=1e-5)
    # the recorded x_next really is mean + std * z with a standard normal z
    zs = torch.cat([((st.x_next - st.mean) / st.std).flatten() for st in res.steps[:-1]])
    assert abs(float(zs.mean())) < 0.2 and abs(float(zs.std()) - 1) < 0.15
    lp = gaussian_log_prob(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor(1.0))
    torch.testing.assert_close(lp, torch.tensor([-1.5 * math.log(2 * math.pi)]))


def test_flow_matching_two_mode_toy():
    """A tiny velocity MLP trained pi0-style on a two-mode 1-D distribution: both modes, 10 ~ 100 steps."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a shared machine
    net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def data(n):
        sign = torch.where(torch.rand(n, 1) < 0.5, -1.0, 1.0)
        return sign + 0.05 * torch.randn(n, 1)

    for _ in range(600):
        x0 = data(256)
        t = pi0_train_time(256).view(-1, 1)
        eps = torch.randn_like(x0)
        xt = (1 - t) * x0 + t * eps
        loss = ((net(torch.cat([xt, t], 1)) - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def predict(x, t):  # x (B, 1, 1), t (B,)
        return net(torch.cat([x.view(-1, 1), t.view(-1, 1)], 1)).view(-1, 1, 1)

    noise = torch.randn(4000, 1, 1, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        s10 = sample_loop(
            predict, FLOW, noise, parameterization="velocity", sampler="euler", num_steps=10
        ).x0.flatten()
        s100 = sample_loop(
            predict, FLOW, noise, parameterization="velocity", sampler="euler", num_steps=100
        ).x0.flatten()
        heun = sample_loop(predict, FLOW, noise, parameterization="velocity", sampler="heun", num_steps=10)
    torch.set_num_threads(threads)
    for s in (s10, s100, heun.x0.flatten()):
        frac_pos = float((s > 0).float().mean())
        near = float(((s.abs() - 1).abs() < 0.3).float().mean())
        assert 0.35 < frac_pos < 0.65, f"one mode dominates: {frac_pos:.2f} positive"
        print(f"positive {frac_pos:.3f} near-mode {near:.3f}")
        assert near > 0.8, f"samples are not at the modes (an averaging regressor would give ~0): {near:.2f}"
    # 10 vs 100 Euler steps: nearly the same distribution (1-D Wasserstein-1 between sorted samples)
    w1 = float((s10.sort().values - s100.sort().values).abs().mean())
    print(f"W1 {w1:.4f}")
    assert w1 < 0.1, f"W1(10 steps, 100 steps) = {w1:.3f}"
    assert heun.nfe == 19  # corrector skipped on the final step to t = 0
