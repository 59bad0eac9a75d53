"""Gaussian paths on closed forms, conversion round trips, sampler identities, chain log-probs, flow toy."""

from __future__ import annotations

import math

import numpy as np
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
    rescore_chain,
    reverse_step,
    sample_loop,
    stack_chain,
    step_log_prob,
    unstack_chain,
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


def test_ddpm_step_mean_and_std_match_the_textbook_posterior():
    """Ho et al.'s posterior in abar terms, on literal numbers: abar_t = 0.5, abar_prev = 0.8."""
    abar_t, abar_prev = 0.5, 0.8
    alpha_t = abar_t / abar_prev  # 0.625
    beta_t = 1 - alpha_t  # 0.375
    c_x0 = math.sqrt(abar_prev) * beta_t / (1 - abar_t)  # 0.670820...
    c_xt = math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)  # 0.316227...
    var = (1 - abar_prev) / (1 - abar_t) * beta_t  # 0.15
    x_t = torch.tensor([[1.0, -2.0]])
    x0 = torch.tensor([[0.5, 0.25]])
    a, s = torch.tensor(abar_t).sqrt(), torch.tensor(1 - abar_t).sqrt()
    an, sn = torch.tensor(abar_prev).sqrt(), torch.tensor(1 - abar_prev).sqrt()
    st = ddpm_step(x_t, x0, a, s, an, sn, torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(st.mean, torch.tensor([[0.5 * c_x0 + c_xt, 0.25 * c_x0 - 2 * c_xt]]))
    torch.testing.assert_close(st.mean, torch.tensor([[0.651638, -0.464750]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.std, torch.tensor(math.sqrt(var)))  # 0.387298
    torch.testing.assert_close(st.x_next, st.mean + math.sqrt(var) * torch.tensor([[1.0, -1.0]]))
    # the same step through reverse_step, from an eps prediction whose x0 estimate is the x0 above
    eps = (x_t - a * x0) / s
    rs = reverse_step(
        lambda x, t: eps, None, x_t, torch.tensor(1.0), torch.tensor(0.0),
        parameterization="eps", sampler="ddpm", draw_noise=False, coefs=(a, s, an, sn),
    )  # fmt: skip
    torch.testing.assert_close(rs.mean, st.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(rs.std, st.std)
    assert rs.nfe == 1 and torch.equal(rs.x_next, rs.mean) and torch.equal(rs.x_t, x_t)


class _Net(nn.Module):
    """A small time-dependent eps "network" whose weights can change between sampling and re-scoring."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(3, 3)

    def forward(self, x, t):  # x (B, H, 3), t (B,)
        return torch.tanh(self.lin(x)) * (1 + 0.01 * t.view(-1, 1, 1))


@pytest.mark.parametrize(
    "sampler,kw",
    [
        ("ddpm", {}),
        ("ddim", {"eta": 1.0}),
        ("ddim", {"eta": 0.0, "min_std": 0.1}),
        ("ddpm", {"min_std": 0.1}),
    ],
    ids=["ddpm", "ddim-eta1", "ddim-eta0-minstd", "ddpm-minstd"],
)
def test_rescoring_a_recorded_chain_reproduces_its_log_probs(sampler, kw):
    net = _Net(0)
    x_init = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))
    common = {"parameterization": "eps", "sampler": sampler, "clip_x0": 1.0, **kw}
    with torch.no_grad():
        res = sample_loop(
            net,
            VP,
            x_init,
            num_steps=8,
            generator=torch.Generator().manual_seed(2),
            return_chain=True,
            **common,
        )
        min_std = kw.get("min_std", 0.0)
        recorded = chain_log_prob(res.steps, min_std)
        for st in res.steps:  # each step, under the weights that sampled it
            if float(st.std) == 0 and min_std == 0:
                continue
            lp = step_log_prob(net, VP, st, **common)
            torch.testing.assert_close(lp, gaussian_log_prob(st.x_next, st.mean, st.std, min_std))
        torch.testing.assert_close(rescore_chain(net, VP, res.steps, **common), recorded)
        # the same transitions as one flat minibatch with per-sample times (what an RL buffer holds)
        arrays = stack_chain(res.steps)
        k, b = arrays["t"].shape
        assert arrays["x_t"].shape == (k, b, 6, 3) and k == 8
        flat = unstack_chain({n: v.reshape(1, k * b, *v.shape[2:]) for n, v in arrays.items()})[0]
        per_transition = step_log_prob(net, VP, flat, **common).view(k, b)
        if min_std == 0:  # the last step to the clean end is deterministic: not part of the chain's density
            per_transition = per_transition[arrays["std"][:, 0] > 0]
        torch.testing.assert_close(per_transition.sum(0), recorded, atol=1e-4, rtol=1e-6)
        # new weights: a different density, equal to the one rebuilt by hand from the new predictions
        new = _Net(5)
        rescored = rescore_chain(new, VP, res.steps, **common)
        assert (rescored - recorded).abs().min() > 1e-3
        manual = torch.zeros(4)
        for st in res.steps:
            if float(st.std) == 0 and min_std == 0:
                continue
            a, s = VP.alpha(st.t), VP.sigma(st.t)
            an, sn = VP.alpha(st.t_next), VP.sigma(st.t_next)
            eps = new(st.x_t, st.t.expand(4))
            x0 = ((st.x_t - s * eps) / a).clamp(-1, 1)
            ref = (ddpm_step if sampler == "ddpm" else ddim_step)(
                *(
                    (st.x_t, x0, a, s, an, sn)
                    if sampler == "ddpm"
                    else (st.x_t, x0, eps, a, s, an, sn, kw["eta"])
                ),
                None,
            )
            manual += gaussian_log_prob(st.x_next, ref.mean, ref.std, min_std)
        torch.testing.assert_close(rescored, manual)


def test_min_std_floors_every_step_and_noise_clip_bounds_the_noise():
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(3))
    kw = {"parameterization": "eps", "sampler": "ddim", "eta": 0.0, "return_chain": True}
    with torch.no_grad():
        plain = sample_loop(_Net(0), VP, x, num_steps=5, **kw)
        gen = torch.Generator().manual_seed(4)
        floored = sample_loop(_Net(0), VP, x, num_steps=5, min_std=0.1, noise_clip=0.5, generator=gen, **kw)
    assert all(float(st.std) == 0 for st in plain.steps)
    assert all(float(st.std) >= 0.1 for st in floored.steps)  # including the last step to the clean end
    for st in floored.steps:
        z = (st.x_next - st.mean) / st.std
        assert float(z.abs().max()) <= 0.5 + 1e-5
    # the floored chain has a density; the deterministic one does not
    assert torch.isfinite(chain_log_prob(floored.steps, 0.1)).all()
    with pytest.raises(ValueError, match="no stochastic step"):
        chain_log_prob(plain.steps)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun", "onestep"])
def test_reverse_step_with_per_sample_times_equals_one_call_per_row(sampler):
    net = _Net(1)
    path = VP if sampler in ("ddpm", "ddim") else FLOW
    x = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(6))
    if path is VP:
        t, tn = torch.tensor([80.0, 40.0, 0.0]), torch.tensor([60.0, 20.0, -1.0])  # last row ends clean
    else:
        t, tn = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])
    param = "eps" if path is VP else "velocity"
    kw = {"parameterization": param, "sampler": sampler, "eta": 0.5, "clip_x0": 1.0, "draw_noise": False}
    with torch.no_grad():
        batched = reverse_step(net, path, x, t, tn, **kw)
        for i in range(3):
            row = reverse_step(net, path, x[i : i + 1], t[i], tn[i], **kw)
            torch.testing.assert_close(batched.x_next[i : i + 1], row.x_next, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(batched.mean[i : i + 1], row.mean, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(batched.std.reshape(-1)[i if batched.std.numel() > 1 else 0], row.std)


def test_onestep_is_one_evaluation_at_the_grid_start_and_mirrors_the_numpy_runtime():
    from vlaflow.deploy import np_sampling as nps

    net = _Net(2)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(7))
    calls = []

    def predict(x_, t_):
        calls.append(t_.clone())
        return net(x_, t_)

    grid = torch.tensor([90.0, 30.0, -1.0])
    with torch.no_grad():
        res = sample_loop(
            predict, VP, x, parameterization="eps", sampler="onestep", timesteps=grid, clip_x0=0.5
        )
        a, s = VP.alpha(grid[0]), VP.sigma(grid[0])
        expect = ((x - s * net(x, grid[:1].expand(2))) / a).clamp(-0.5, 0.5)
    assert res.nfe == 1 and len(calls) == 1 and torch.equal(calls[0], torch.full((2,), 90.0))
    torch.testing.assert_close(res.x0, expect)
    out, nfe = nps.sample_loop(
        lambda x_, t_: net(torch.from_numpy(x_), torch.from_numpy(t_)).detach().numpy(),
        nps.NpVPPath(VP.alphas_cumprod.numpy()), x.numpy(), parameterization="eps", sampler="onestep",
        timesteps=grid.numpy(), clip_x0=0.5,
    )  # fmt: skip
    assert nfe == 1
    np.testing.assert_allclose(out, res.x0.numpy(), rtol=0, atol=1e-6)


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
