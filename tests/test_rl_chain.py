"""The denoising chain as a policy (issue 13, part 1) and the RL maths (GAE, PPO-clip, IQL expectile).

Tiny diffusion and flow policies (U-Net 8/16 channels, H=8) on one torch thread; closed forms on literals.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from vlaflow.errors import VlaflowError  # noqa: E402
from vlaflow.policies.samplers import gaussian_log_prob  # noqa: E402
from vlaflow.rl.chain import ChainConfig, NoiseScale, rescore, resolve_chain, sample_chain  # noqa: E402

torch.set_num_threads(1)


def tiny_policy(family: str, **over):
    from vlaflow.policies import DiffusionConfig, FlowConfig, NetConfig, UNetConfig, build_policy

    z = {k: np.zeros(d, np.float32) for k, d in (("action", 2), ("obs.state", 5))}
    stats = {k: {"min": v - 3, "max": v + 3, "mean": v, "std": v + 1} for k, v in z.items()}
    net = NetConfig(
        kind="unet", unet=UNetConfig(down_dims=(8, 16), kernel_size=3, n_groups=4, step_embed_dim=8)
    )
    cls = DiffusionConfig if family == "diffusion" else FlowConfig
    cfg = cls(obs_shapes={"obs.state": (5,)}, action_dim=2, horizon=8, n_action_steps=4, net=net, **over)
    torch.manual_seed(0)
    return build_policy(cfg, stats).eval()


def obs(b: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"obs.state": torch.randn(b, 2, 5, generator=g)}


@pytest.mark.parametrize(
    "family,cfg",
    [
        ("diffusion", ChainConfig()),  # stochastic DDIM eta=1, std floor 0.1
        ("diffusion", ChainConfig(sampler="ddpm", min_std=0.05)),
        ("flow", ChainConfig(noise_std=0.2)),  # Euler + ReinFlow noise
    ],
)
def test_recorded_logprob_is_sum_of_step_gaussians_and_rescoring_gives_ratio_one(family, cfg):
    from vlaflow.policies.samplers import reverse_step

    pol = tiny_policy(family)
    chain = resolve_chain(pol, cfg)
    cond = pol.encode(obs(6))
    x0, rec = sample_chain(pol, pol, chain, cond, torch.Generator().manual_seed(1))
    assert rec["logp"].shape == (6, chain.num_steps) and x0.shape == (6, 8, 2)
    # each recorded log-density is the Gaussian of the step rebuilt by reverse_step at (x_t, t)
    min_std = chain.options.get("min_std", 0.0)
    total = torch.zeros(6)
    for k in range(chain.num_steps):
        st = reverse_step(
            lambda x, t: pol.predict(x, t, cond),
            pol.path,
            rec["x_t"][:, k],
            rec["t"][k],
            rec["t_next"][k],
            parameterization=pol.parameterization,
            sampler=chain.sampler,
            draw_noise=False,
            **chain.options,
        )
        assert float(torch.as_tensor(st.std).min()) > 0  # every step is stochastic (floored / injected)
        lp = gaussian_log_prob(rec["x_next"][:, k], st.mean, st.std, min_std)
        torch.testing.assert_close(lp, rec["logp"][:, k], rtol=0, atol=1e-4)
        total += lp
    torch.testing.assert_close(rec["logp"].sum(1), total, rtol=0, atol=1e-3)
    # re-scoring under unchanged parameters: the PPO ratio at the first update is 1
    with torch.no_grad():
        new = rescore(pol, chain, cond, rec)
    ratio = (new - rec["logp"]).exp()
    assert float((ratio - 1).abs().max()) < 1e-4, ratio
    assert torch.equal(x0, rec["x_next"][:, -1])


def test_learned_flow_noise_scale_rescoring_matches_and_gets_gradient():
    pol = tiny_policy("flow")
    scale = NoiseScale(0.15, action_dim=2)
    chain = resolve_chain(pol, ChainConfig(noise_std=0.15, learn_noise_std=True))
    cond = pol.encode(obs(4))
    _, rec = sample_chain(pol, pol, chain, cond, torch.Generator().manual_seed(2), noise_scale=scale)
    lp = rescore(pol, chain, cond, rec, noise_scale=scale)
    torch.testing.assert_close(lp.detach(), rec["logp"], rtol=0, atol=1e-4)
    lp.sum().backward()
    assert scale.log_std.grad is not None and float(scale.log_std.grad.abs().sum()) > 0


def test_only_the_last_k_steps_receive_gradient():
    """K'=3 of 10: the frozen copy runs steps 1..7 (no gradient, unchanged by an update), the actor 8..10."""
    actor = tiny_policy("diffusion")
    frozen = copy.deepcopy(actor).requires_grad_(False)
    chain = resolve_chain(actor, ChainConfig(finetune_last=3))
    assert chain.finetune_last == 3
    cond = actor.encode(obs(5)).detach()
    _, rec = sample_chain(actor, frozen, chain, cond, torch.Generator().manual_seed(3))
    assert rec["x_t"].shape[1] == 3
    ts = actor.default_timesteps(10)
    assert torch.equal(rec["t"], ts[7:10])  # the recorded steps are the last three of the grid
    lp = rescore(actor, chain, cond, rec)
    (-lp.sum()).backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert sum(float(p.grad.abs().sum()) for p in actor.parameters() if p.grad is not None) > 0
    with torch.no_grad():
        for p in actor.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    _, rec2 = sample_chain(actor, frozen, chain, cond, torch.Generator().manual_seed(3))
    # the input of the first fine-tuned step comes from the frozen part: identical after the update
    assert torch.equal(rec2["x_t"][:, 0], rec["x_t"][:, 0])
    assert not torch.equal(rec2["x_next"][:, -1], rec["x_next"][:, -1])
    with pytest.raises(VlaflowError, match="finetune_last=11 exceeds"):
        resolve_chain(actor, ChainConfig(finetune_last=11))


def test_deterministic_sampler_is_refused_naming_the_options():
    from vlaflow.policies.runtime import PolicyRuntime

    flow = tiny_policy("flow")
    with pytest.raises(VlaflowError, match=r"(?s)deterministic.*ddim with eta > 0.*noise_std > 0"):
        resolve_chain(flow, ChainConfig(noise_std=0.0))
    with pytest.raises(VlaflowError, match=r"(?s)'ddim'.*eta=0.0.*use one of: sampler=ddpm"):
        PolicyRuntime(tiny_policy("diffusion"), record_chain=True, require_stochastic=True)
    with pytest.raises(VlaflowError, match="chain.sampler must be one of"):
        ChainConfig(sampler="onestep")


def test_runtime_selects_the_stochastic_chain_and_records_it():
    from vlaflow.policies.runtime import PolicyRuntime
    from vlaflow.policies.samplers import chain_log_prob, unstack_chain

    for family, opts in (("diffusion", {"eta": 1.0, "min_std": 0.1}), ("flow", {"noise_std": 0.1})):
        rt = PolicyRuntime(
            tiny_policy(family), seed=0, record_chain=True, sampler_options=opts, require_stochastic=True
        )
        res = rt.infer({"obs.state": np.zeros((2, 5), np.float32)})
        ch = res.extras["chain"]
        assert ch["sampler_options"] == opts and (ch["std"] > 0).all()
        steps = unstack_chain(
            {k: v[:, None] for k, v in ch.items() if k not in ("obs", "sampler", "sampler_options")}
        )
        assert torch.isfinite(chain_log_prob(steps, opts.get("min_std", 0.0))).all()


# ------------------------------------------------------------------------------------------ the maths
def test_chunk_rewards_and_gae_closed_form():
    from vlaflow.rl.returns import chunk_discount, chunk_rewards, gae

    r = chunk_rewards(torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5, 0.5]]), ta=2)
    torch.testing.assert_close(r, torch.tensor([[3.0, 7.0, 1.0]]))
    g = chunk_discount(0.99, 8)
    assert abs(g - 0.99**8) < 1e-12
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [0.2], [0.1]])
    dones = torch.tensor([[False], [False], [False]])
    last = torch.tensor([0.3])
    lam = 0.9
    adv, ret = gae(rewards, values, last, dones, g, lam)
    d2 = 2.0 + g * 0.3 - 0.1
    d1 = 0.0 + g * 0.1 - 0.2
    d0 = 1.0 + g * 0.2 - 0.5
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(ret, adv + values)
    # an episode that ended at decision 1 bootstraps nothing past it
    adv_d, _ = gae(rewards, values, last, torch.tensor([[False], [True], [False]]), g, lam)
    torch.testing.assert_close(adv_d[1, 0], torch.tensor(0.0 - 0.2))
    torch.testing.assert_close(adv_d[0, 0], torch.tensor(d0 + g * lam * (0.0 - 0.2)))
    # lam = 1, no bootstrap: the advantage is the discounted return minus V
    adv1, _ = gae(rewards, values, torch.zeros(1), dones, g, 1.0)
    torch.testing.assert_close(adv1[0, 0], torch.tensor(1.0 + g * 0 + g * g * 2.0 - 0.5))


def test_running_return_moments_merge_to_the_pooled_variance():
    from vlaflow.rl.returns import discounted_returns_to_date, merge_moments

    r = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, 1.0]])
    d = torch.tensor([[False, False], [True, False], [False, False]])
    g = discounted_returns_to_date(r, d, 0.5)
    torch.testing.assert_close(g[:, 0], torch.tensor([1.0, 1.5, 1.0], dtype=torch.float64))  # restarts
    torch.testing.assert_close(g[:, 1], torch.tensor([2.0, 1.0, 1.5], dtype=torch.float64))
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    st = merge_moments(torch.zeros(3, dtype=torch.float64), x[:30])
    st = merge_moments(st, x[30:])
    assert st[0] == 100
    torch.testing.assert_close(st[1], x.double().mean())
    torch.testing.assert_close(st[2] / st[0], x.double().var(unbiased=False))


def test_ppo_clip_per_denoising_step_with_denoising_discount():
    from vlaflow.rl.ppo import denoise_weights, ppo_clip_loss

    torch.testing.assert_close(denoise_weights(3, 0.5), torch.tensor([0.25, 0.5, 1.0]))
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]]))
    adv = torch.tensor([1.0, -2.0])
    loss, st = ppo_clip_loss(logp, old, adv, clip=0.2, gamma_denoise=0.5)
    r = logp.exp()
    # by hand: A>0 takes min(r, clip(r)) * A, A<0 takes max(r, clip(r)) * A (min of negatives)
    s0 = torch.tensor([1.0, 1.2, 0.5]) * 1.0
    s1 = torch.tensor([1.1, 0.8, 1.0]) * -2.0
    w = torch.tensor([0.25, 0.5, 1.0])
    expect = -(((s0 + s1) / 2) * w).sum() / w.sum()
    torch.testing.assert_close(loss, expect)
    assert abs(float(st["clipfrac"]) - 3 / 6) < 1e-6  # 1.5, 0.5, 0.7 are outside [0.8, 1.2]
    torch.testing.assert_close(st["ratio"], r.mean())
    # at ratio 1 the gradient is -A w / sum(w) per step
    lp = torch.zeros(2, 3, requires_grad=True)
    ppo_clip_loss(lp, old, adv, 0.2, 0.5)[0].backward()
    torch.testing.assert_close(lp.grad, -(adv[:, None] * w[None]) / (2 * w.sum()))


def test_iql_expectile_regression_recovers_the_known_expectile():
    """A scalar fit with the expectile loss to U(0, 1) samples lands on the closed-form tau-expectile
    (tau = 0.5: the mean); and a conditional V(s) recovers the expectile of each state's Q-values."""
    from vlaflow.rl.iql import expectile_loss, uniform_expectile

    g = torch.Generator().manual_seed(0)
    x = torch.rand(20000, generator=g)
    for tau in (0.5, 0.7, 0.9):
        v = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([v], lr=0.05)
        for _ in range(600):
            opt.zero_grad()
            expectile_loss(x - v, tau).backward()
            opt.step()
        assert abs(float(v.detach()) - uniform_expectile(tau)) < 0.01, (tau, float(v.detach()))
    assert abs(uniform_expectile(0.7) - 0.6044) < 1e-3
    # conditional: Q(s, a) ~ U(s, s + 1) over the data's actions; V(s) = s + expectile_0.7(U(0,1))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Mish(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(800):
        s = torch.rand(512, 1, generator=g) * 2
        q = s[:, 0] + torch.rand(512, generator=g)
        opt.zero_grad()
        expectile_loss(q - net(s)[:, 0], 0.7).backward()
        opt.step()
    grid = torch.tensor([[0.25], [1.0], [1.75]])
    torch.testing.assert_close(
        net(grid)[:, 0].detach(), grid[:, 0] + uniform_expectile(0.7), atol=0.04, rtol=0
    )
