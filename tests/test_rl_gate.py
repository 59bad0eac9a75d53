"""RL-100's offline gate (issue 13): an MLP dynamics ensemble + an IQL value, fit on behaviour data of a
toy point-mass task, rank policies like the true returns, reject a deliberately corrupted policy and
accept a real improvement. One torch thread, a few seconds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vlaflow.rl.gate import DynamicsEnsemble, fit_dynamics, gate, imagined_score  # noqa: E402
from vlaflow.rl.iql import IQLCritic, iql_losses, polyak  # noqa: E402

torch.set_num_threads(1)
GAMMA, H = 0.95, 10


def step(s, a):
    """s' = s + 0.2 clip(a); reward = -|s'| (drive the point to the origin)."""
    s2 = s + 0.2 * a.clamp(-1, 1)
    return s2, -s2.norm(dim=-1)


def true_return(policy, starts):
    s, ret, d = starts.clone(), torch.zeros(len(starts)), 1.0
    for _ in range(H):
        s, r = step(s, policy(s))
        ret += d * r
        d *= GAMMA
    return float(ret.mean())


def gain(k):
    return lambda s: k * s


def test_gate_ranks_like_true_returns_rejects_a_corrupted_policy_and_accepts_an_improvement():
    import copy

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # behaviour data: a noisy, mediocre controller a = -0.3 s + noise, from random states
    s = torch.randn(6000, 2, generator=g) * 1.5
    a = -0.3 * s + 0.8 * torch.randn(6000, 2, generator=g)
    s2, r = step(s, a)
    model = DynamicsEnsemble(2, 2, n_models=4, width=64)
    loss = fit_dynamics(model, s, a, s2, r, steps=600, batch=256, lr=3e-3)
    assert loss < 0.05
    # the IQL critic on the same data (done never: the toy is continuing), its V bootstraps the horizon
    critic = IQLCritic(2, 2, width=64)
    target = copy.deepcopy(critic).requires_grad_(False)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for _ in range(600):
        idx = torch.randint(0, len(s), (256,), generator=g)
        lo, _ = iql_losses(critic, target, s[idx], a[idx], r[idx], s2[idx], torch.zeros(256), GAMMA, 0.7)
        opt.zero_grad()
        lo.backward()
        opt.step()
        polyak(target, critic, 0.02)

    starts = torch.randn(256, 2, generator=g)
    ks = [0.5, 0.0, -0.3, -1.0]  # from a corrupted (pushing away) to the best controller
    truth = [true_return(gain(k), starts) for k in ks]
    imagined = [imagined_score(gain(k), model, starts, H, GAMMA, critic.value)[0] for k in ks]
    assert truth == sorted(truth)  # the toy's ground truth: ordered as listed
    assert imagined == sorted(imagined), (imagined, truth)  # the gate ranks the four policies the same

    current = gain(-0.3)
    bad = gate(gain(0.5), current, model, starts, horizon=H, gamma=GAMMA, value=critic.value)
    assert not bad.accept and bad.candidate < bad.current
    good = gate(gain(-1.0), current, model, starts, horizon=H, gamma=GAMMA, value=critic.value)
    assert good.accept and good.candidate > good.current
    same = gate(current, current, model, starts, horizon=H, gamma=GAMMA, value=critic.value, margin=0.01)
    assert not same.accept  # no improvement, no acceptance
