"""EBT-Policy: explicit energy, descent on it, second-order training, early stopping, mode seeking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlaflow.policies.checkpoint import load_checkpoint, save_checkpoint
from vlaflow.policies.ebt.config import EBTConfig
from vlaflow.policies.ebt.model import EBTPolicy
from vlaflow.policies.runtime import PolicyRuntime

H, DA = 4, 2


def _stats(lo=-1.0, hi=1.0):
    def st(n):
        return {
            "min": np.full(n, lo, np.float32),
            "max": np.full(n, hi, np.float32),
            "mean": np.zeros(n, np.float32),
            "std": np.ones(n, np.float32),
            "q01": np.full(n, lo, np.float32),
            "q99": np.full(n, hi, np.float32),
        }

    return {"action": st(DA), "obs.state": st(3)}


def _policy(**kw):
    torch.manual_seed(0)  # weights independent of test order
    cfg = EBTConfig(
        horizon=H,
        n_action_steps=2,
        obs_shapes={"obs.state": (3,)},
        action_dim=DA,
        d_model=32,
        n_layers=1,
        n_heads=2,
        replay_size=64,
        **kw,
    )
    return EBTPolicy(cfg, _stats())


def _linear_batch(n, gen):
    """Actions a linear function of the observation (a unimodal, learnable toy)."""
    s = torch.rand(n, 2, 3, generator=gen) * 2 - 1
    a = (s[:, -1, :DA] * 0.8).unsqueeze(1) + torch.linspace(-0.1, 0.1, H).view(1, H, 1)
    return {"obs.state": s, "action": a}


def _train(policy, batch_fn, steps, lr=3e-3, bs=64, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = policy.compute_loss(batch_fn(bs, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return _train(_policy(), _linear_batch, 200)


def test_second_order_path_reaches_alpha():
    pol = _policy(train_langevin_std=0.0)
    gen = torch.Generator().manual_seed(1)
    loss, metrics = pol.compute_loss(_linear_batch(8, gen))
    loss.backward()
    assert pol.raw_alpha.grad is not None and float(pol.raw_alpha.grad.abs()) > 0
    # the energy weights get gradient only through dE/da: the loss never reads E itself
    assert float(pol.energy_net.out.weight.grad.abs().sum()) > 0
    assert metrics["alpha"] > 0


def test_energy_decreases_on_held_out_and_uncertainty(trained):
    gen = torch.Generator().manual_seed(123)  # held-out windows: a seed training never used
    batch = _linear_batch(128, gen)
    with torch.enable_grad():
        cond = trained.encode(batch)
        noise = torch.randn(128, H, DA, generator=gen)
        res = trained.descend(cond, noise, 6, record=True)
    e = torch.stack(res.energies).mean(1)  # mean energy after each step
    assert float(e[1]) < float(e[0]) and float(e[2]) < float(e[1]), e
    target = trained.normalize_action(batch["action"])
    err0 = float(((res.xs[0] - target) ** 2).mean())
    err2 = float(((res.xs[2] - target) ** 2).mean())
    assert err2 < 0.25 * err0, (err0, err2)
    # final energy correlates with action error (Spearman over samples)
    err = ((res.xs[2] - target) ** 2).flatten(1).mean(1).numpy()
    fin = res.energies[2].numpy()
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(rank(err), rank(fin))[0, 1]
    assert rho > 0, rho


def test_sample_contract_early_stop_candidates_and_checkpoint(trained, tmp_path):
    gen = torch.Generator().manual_seed(7)
    obs = {"obs.state": _linear_batch(5, gen)["obs.state"]}
    noise = torch.randn(5, H, DA, generator=gen)
    a1 = trained.sample(obs, noise=noise)
    a2 = trained.sample(obs, noise=noise)
    assert a1.shape == (5, H, DA) and torch.equal(a1, a2)
    _, res = trained.sample_with_energy(obs, noise=noise, sampler="descent_es", num_steps=20)
    assert res.steps_used.max() <= 20 and res.steps_used.min() >= 0 and res.energy.shape == (5,)
    _, r1 = trained.sample_with_energy(obs, noise=noise, num_steps=20)
    assert int(r1.steps_used.min()) == 20  # without early stopping every sample takes the cap
    _, rk = trained.sample_with_energy(obs, num_steps=3, num_candidates=4, generator=gen)
    assert rk.x.shape == (5, H, DA)
    save_checkpoint(tmp_path / "ebt", trained)
    loaded = load_checkpoint(tmp_path / "ebt")
    assert torch.allclose(loaded.sample(obs, noise=noise), a1, atol=1e-5)
    rt = PolicyRuntime(loaded)  # infer runs under inference_mode: the descent must still get gradients
    out = rt.infer({"obs.state": obs["obs.state"][0].numpy()}).actions
    assert out.shape == (H, DA) and np.isfinite(out).all()


def test_two_mode_toy_lands_on_a_mode_not_the_mean():
    """Constant observation, expert chunks all +0.8 or all -0.8: the descent must pick one."""
    torch.set_num_threads(1)

    def bimodal(n, gen):
        sign = torch.randint(0, 2, (n, 1, 1), generator=gen).float() * 2 - 1
        return {"obs.state": torch.zeros(n, 2, 3), "action": sign * 0.8 * torch.ones(n, H, DA)}

    # Starts near the expert chunks make each mode an attractor (from pure noise only, MSE is mean-seeking:
    # with data_start_prob=0 this toy lands between the modes, measured ~±0.4).
    pol = _train(_policy(data_start_prob=1.0, data_start_std=1.5, replay_prob=0.0), bimodal, 250)
    gen = torch.Generator().manual_seed(5)
    obs = {"obs.state": torch.zeros(200, 2, 3)}
    a, _ = pol.sample_with_energy(obs, noise=torch.randn(200, H, DA, generator=gen), num_steps=10)
    m = a.mean(dim=(1, 2))
    near_mode = ((m.abs() - 0.8).abs() < 0.25).float().mean()
    assert near_mode > 0.8, m[:20]
    assert float((m > 0).float().mean()) > 0.1 and float((m < 0).float().mean()) > 0.1  # both modes


def test_shifted_starts_look_like_the_previous_chunk_shifted_into_the_current_window():
    """The previous call's chunk, shifted by the s steps executed since, covers the current window's first
    H - s steps and repeats its last action over the s new ones: the expert chunk with its last s actions
    replaced by the one before them."""
    pol = _policy(shift_start_prob=1.0, shift_start_std=0.0)
    target = torch.arange(50 * H * DA, dtype=torch.float32).view(50, H, DA)
    starts, level = pol._shifted_starts(target)
    assert torch.equal(level, torch.zeros(50))  # the drawn noise std (0 here)
    seen = set()
    for row, tgt in zip(starts, target, strict=True):
        s = int((row != tgt).any(-1).sum())  # the padded steps
        assert 1 <= s <= pol.config.n_action_steps
        assert torch.equal(row[: H - s], tgt[: H - s])
        assert torch.equal(row[H - s :], tgt[H - s - 1 : H - s].expand(s, DA)), (row, tgt)
        seen.add(s)
    assert seen == set(range(1, pol.config.n_action_steps + 1))  # every shift 1..Ta is drawn


@pytest.mark.parametrize("level_token", [False, True])
def test_rti_runtime_warm_starts_an_energy_policy_and_keeps_the_mode_the_last_chunk_chose(level_token):
    """RTI-DP's scheme on an EBT: the first call descends from noise, later calls take n_warm_steps
    gradient steps from the shifted previous chunk. On a two-mode toy trained with shifted starts, a warm
    start on either mode stays on it (the previous chunk carries the mode choice a 2-step descent from
    noise cannot make)."""
    from vlaflow.deploy.rti import RTIConfig, RTIRuntime, rti_denoise

    torch.set_num_threads(1)

    def bimodal(n, gen):
        sign = torch.randint(0, 2, (n, 1, 1), generator=gen).float() * 2 - 1
        return {"obs.state": torch.zeros(n, 2, 3), "action": sign * 0.8 * torch.ones(n, H, DA)}

    pol = _policy(shift_start_prob=0.6, data_start_prob=0.2, replay_prob=0.0, level_token=level_token)
    pol = _train(pol, bimodal, 250)
    cond = pol.encode({"obs.state": torch.zeros(1, 2, 3)})
    cfg = RTIConfig(n_warm_steps=2)
    for sign in (1.0, -1.0):
        prev = sign * 0.8 * torch.ones(1, H, DA) + 0.1 * torch.randn(1, H, DA)
        out = rti_denoise(pol, cond, prev, 1, cfg)
        assert out.nfe == 2
        assert float((out.x0 - sign * 0.8).abs().max()) < 0.3, out.x0
    rt = RTIRuntime(pol, cfg)
    obs = {"obs.state": np.zeros((2, 3), np.float32)}
    a = [rt.infer(obs, shift=1).actions for _ in range(3)]
    assert rt.nfe_history == [pol.config.num_inference_steps, 2, 2]
    assert all(x.shape == (H, DA) and np.isfinite(x).all() for x in a)
    energy = rt.infer(obs, shift=1).extras["energy"]  # the uncertainty signal reaches the caller
    assert isinstance(energy, float) and np.isfinite(energy)
