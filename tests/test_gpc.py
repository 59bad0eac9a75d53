"""GPC composition: exact parent reproduction, analytic Gaussian parents across paths, space invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlaflow.policies.base_config import NetConfig, UNetConfig
from vlaflow.policies.checkpoint import load_checkpoint, save_checkpoint
from vlaflow.policies.compose import gpc_sample
from vlaflow.policies.composed.model import compose_policies
from vlaflow.policies.diffusion.config import DiffusionConfig
from vlaflow.policies.flow.config import FlowConfig
from vlaflow.policies.path import RectifiedFlowPath, VPCosinePath
from vlaflow.policies.registry import build_policy, policy_config_from_dict
from vlaflow.policies.runtime import PolicyRuntime

H, DA = 4, 2


class GaussianParent:
    """Exact denoiser for data N(mu, s^2 I) on ``path``: E[x0 | x_t], E[eps | x_t] in closed form."""

    def __init__(self, mu: float, s: float, path, parameterization: str):
        self.mu, self.s, self.path, self.parameterization = mu, s, path, parameterization

    def predict(self, x, t, cond):
        b = x.shape[0]
        a = self.path.alpha(t).view(b, 1, 1)
        sg = self.path.sigma(t).view(b, 1, 1)
        var = a * a * self.s**2 + sg * sg  # Var(x_t)
        resid = x - a * self.mu
        eps = sg * resid / var
        x0 = self.mu + a * self.s**2 * resid / var
        return eps if self.parameterization == "eps" else eps - x0


@pytest.mark.parametrize("reference, sampler", [(0, "ddim"), (1, "euler")])
def test_gaussian_vp_and_flow_parents_compose_to_weighted_mean(reference, sampler):
    mu1, mu2, s, w = 1.0, -0.5, 0.3, 0.3
    parents = [
        GaussianParent(mu1, s, VPCosinePath(100), "eps"),
        GaussianParent(mu2, s, RectifiedFlowPath(), "velocity"),
    ]
    noise = torch.randn(3000, H, DA, generator=torch.Generator().manual_seed(0))
    out = gpc_sample(
        parents, [None, None], [w, 1 - w], noise, reference=reference, sampler=sampler, num_steps=50
    ).x0
    mean, var = float(out.mean()), float(out.var())
    assert abs(mean - (w * mu1 + (1 - w) * mu2)) < 0.02, mean
    assert abs(var - s**2) < 0.1 * s**2, var
    # each parent alone, through the composer, samples its own Gaussian
    solo = gpc_sample(parents, [None, None], [1.0, 0.0], noise, reference=0, sampler="ddim", num_steps=50).x0
    assert abs(float(solo.mean()) - mu1) < 0.02


def test_complementary_partial_views_compose_better_than_either_parent():
    """A sees only the goal's x (its y is wide), B only its y: an interior weight beats both parents."""
    gen = torch.Generator().manual_seed(3)
    goals = torch.rand(8, DA, generator=gen) * 1.6 - 0.8
    small, wide = 0.05, 0.6
    weights = [0.0, 0.25, 0.5, 0.75, 1.0]
    err = np.zeros(len(weights))
    for g in goals:
        pa = GaussianParent(
            torch.stack([g[0], g.new_tensor(0.0)]), torch.tensor([small, wide]), VPCosinePath(100), "eps"
        )
        pb = GaussianParent(
            torch.stack([g.new_tensor(0.0), g[1]]),
            torch.tensor([wide, small]),
            RectifiedFlowPath(),
            "velocity",
        )
        noise = torch.randn(256, H, DA, generator=gen)
        for i, w in enumerate(weights):
            out = gpc_sample(
                [pa, pb], [None, None], [w, 1 - w], noise, reference=0, sampler="ddim", num_steps=20
            ).x0
            err[i] += float(((out - g) ** 2).mean()) / len(goals)
    best = int(np.argmin(err))
    assert 0 < best < len(weights) - 1, err  # an interior weight
    assert err[best] < 0.25 * min(err[0], err[-1]), err  # and clearly better than either parent alone


def test_eps_space_and_velocity_space_give_the_same_trajectory():
    parents = [
        GaussianParent(0.7, 0.4, VPCosinePath(100), "eps"),
        GaussianParent(-0.2, 0.4, RectifiedFlowPath(), "velocity"),
    ]
    noise = torch.randn(64, H, DA, generator=torch.Generator().manual_seed(1))
    runs = [
        gpc_sample(
            parents,
            [None, None],
            [0.4, 0.6],
            noise,
            reference=0,
            space=sp,
            num_steps=10,
            sampler="ddim",
            return_chain=True,
        )
        for sp in ("eps", "velocity", "x0")
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0].steps, other.steps, strict=True):
            torch.testing.assert_close(a.x_next, b.x_next, atol=1e-4, rtol=1e-4)


def _stats():
    def st(n):
        return {
            k: np.full(n, v, np.float32)
            for k, v in (("min", -1), ("max", 1), ("mean", 0), ("std", 1), ("q01", -1), ("q99", 1))
        }

    return {"action": st(DA), "obs.state": st(3), "obs.extra": st(2)}


def _tiny_parents():
    torch.manual_seed(0)
    net = NetConfig(kind="unet", unet=UNetConfig(down_dims=(16, 32), n_groups=4, step_embed_dim=16))
    common = dict(horizon=H, n_action_steps=2, action_dim=DA, net=net, num_inference_steps=8)
    diff = build_policy(DiffusionConfig(obs_shapes={"obs.state": (3,)}, **common), _stats())
    flow = build_policy(
        FlowConfig(obs_shapes={"obs.state": (3,), "obs.extra": (2,)}, n_obs_steps=1, **common), _stats()
    )
    return diff.eval(), flow.eval()


def test_weights_zero_one_reproduce_each_parent_and_checkpoint_loads(tmp_path):
    diff, flow = _tiny_parents()
    g = torch.Generator().manual_seed(3)
    obs = {"obs.state": torch.randn(4, 2, 3, generator=g), "obs.extra": torch.randn(4, 2, 2, generator=g)}
    noise = torch.randn(4, H, DA, generator=g)
    with torch.no_grad():
        for w, parent in (((1.0, 0.0), diff), ((0.0, 1.0), flow)):
            comp = compose_policies([diff, flow], w)
            assert torch.equal(comp.sample(obs, noise=noise), parent.sample(obs, noise=noise))
        comp = compose_policies([diff, flow], (0.5, 0.5), parent_paths=("a", "b"))
        mixed = comp.sample(obs, noise=noise)
        assert not torch.allclose(mixed, diff.sample(obs, noise=noise))
        assert not torch.allclose(mixed, flow.sample(obs, noise=noise))
    save_checkpoint(tmp_path / "gpc", comp)
    loaded = load_checkpoint(tmp_path / "gpc")
    assert loaded.config.family == "composed" and loaded.config.weights == (0.5, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(obs, noise=noise), mixed)
    rt = PolicyRuntime(loaded)
    assert rt.config.n_obs_steps == 2 and set(rt.config.obs_shapes) == {"obs.state", "obs.extra"}
    one = {"obs.state": obs["obs.state"][0].numpy(), "obs.extra": obs["obs.extra"][0].numpy()}
    out = rt.infer(one).actions
    assert out.shape == (H, DA) and np.isfinite(out).all()


def test_parents_with_different_action_normalization_are_refused():
    diff, flow = _tiny_parents()
    st = _stats()
    st["action"]["max"] = st["action"]["max"] * 2
    other = build_policy(flow.config, st)
    from vlaflow.errors import VlaflowError

    with pytest.raises(VlaflowError, match="normalization"):
        compose_policies([diff, other], (0.5, 0.5))


def test_compose_cli_smoke_on_pusht(tmp_path):
    """`vlaflow compose` end to end: 2 tiny parents, 2 weights, 1 short episode each, best checkpoint."""
    import argparse
    import json

    pytest.importorskip("gym_pusht")
    from vlaflow.cli.compose import add_compose_arguments, run_compose
    from vlaflow.policies.runtime import load_policy

    def st(n, lo, hi):
        return {
            k: np.full(n, v, np.float32)
            for k, v in (("min", lo), ("max", hi), ("mean", 0), ("std", 1), ("q01", lo), ("q99", hi))
        }

    stats = {"action": st(2, 0, 512), "obs.keypoint": st((9, 2), 0, 512), "obs.agent_pos": st(2, 0, 512)}
    torch.manual_seed(0)
    net = NetConfig(kind="unet", unet=UNetConfig(down_dims=(16, 32), n_groups=4, step_embed_dim=16))
    common = dict(horizon=8, n_action_steps=4, action_dim=2, net=net, num_inference_steps=4)
    paths = []
    for name, cfg in (
        ("d", DiffusionConfig(obs_shapes={"obs.keypoint": (9, 2), "obs.agent_pos": (2,)}, **common)),
        ("f", FlowConfig(obs_shapes={"obs.keypoint": (9, 2)}, **common)),
    ):
        save_checkpoint(tmp_path / name, build_policy(cfg, {k: stats[k] for k in cfg.norm_modes()}))
        paths.append(str(tmp_path / name))
    parser = argparse.ArgumentParser()
    add_compose_arguments(parser)
    args = parser.parse_args(
        [
            "--parents",
            *paths,
            "--weights",
            "0,0.5",
            "--episodes",
            "1",
            "--max-steps",
            "8",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert run_compose(args) == 0
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [r["weights"] for r in table["rows"]] == [[0.0, 1.0], [0.5, 0.5]]
    for r in table["rows"]:  # per-seed results, for paired comparisons between weights
        assert [e["seed"] for e in r["episodes"]] == [100000]
        assert r["success_rate"] == sum(e["success"] for e in r["episodes"]) / len(r["episodes"])
        assert r["mean_score"] == pytest.approx(sum(e["score"] for e in r["episodes"]) / len(r["episodes"]))
    assert (tmp_path / "out" / "score_vs_weight.png").stat().st_size > 0
    rt = load_policy(tmp_path / "out" / "best")
    assert rt.config.extra["family"] == "composed"


def test_weight_search_is_pure_and_picks_the_best_mix():
    """The search needs no simulator: a closed-form score peaked at w = 0.3 must win, as a true mix."""
    from vlaflow.errors import ConfigError
    from vlaflow.policies.composed.search import gpc_table, search_weights, table_markdown, weight_grid

    grid = weight_grid(2, [0.0, 0.3, 0.6, 1.0], 0.25)
    assert grid == [(0.0, 1.0), (0.3, 0.7), (0.6, 0.4), (1.0, 0.0)]
    seen = []

    def score(w):
        return {"mean_score": 1 - (w[0] - 0.3) ** 2, "success_rate": 0.5, "n_episodes": 3, "n_errors": 0}

    rows = search_weights(grid, score, on_row=seen.append)
    assert seen == rows and [r["weights"] for r in rows] == [list(w) for w in grid]
    table = gpc_table(rows, parents=["a", "b"], parent_names=["A", "B"], task="t", episodes=3, first_seed=7)
    assert table["best"]["weights"] == [0.3, 0.7] and table["best_beats_every_parent"] is True
    assert table["seeds"] == [7, 9]
    assert "best: [0.3, 0.7] (1.000); beats every parent: True" in table_markdown(table)
    vertex = gpc_table(
        search_weights(grid, lambda w: {"mean_score": w[0], "success_rate": 0.0}),
        parents=["a", "b"], parent_names=["A", "B"], task="t", episodes=1, first_seed=0,
    )  # fmt: skip
    assert vertex["best"]["weights"] == [1.0, 0.0] and vertex["best_beats_every_parent"] is False
    assert len(weight_grid(3, None, 0.5)) == 6  # (1,0,0) (0.5,0.5,0) ... on the 2-simplex
    with pytest.raises(ConfigError, match="mean_score"):
        search_weights(grid, lambda w: {"score": 1.0})


def test_composite_is_a_policy_on_the_denoising_contract():
    """path / parameterization / packed encode / predict / denoise: what RTI, RTC, export and RL use."""
    from vlaflow.errors import VlaflowError
    from vlaflow.policies.compose import mix_predictions
    from vlaflow.policies.contract import DenoisingPolicyContract

    diff, flow = _tiny_parents()
    comp = compose_policies([diff, flow], (0.3, 0.7))
    assert isinstance(comp, DenoisingPolicyContract)
    assert comp.reference == 1 and comp.path == flow.path and comp.parameterization == "velocity"
    assert comp.config.sampler == "euler" and comp.sampler_kwargs("ddim") == flow.sampler_kwargs("ddim")
    g = torch.Generator().manual_seed(0)
    obs = {"obs.state": torch.randn(2, 2, 3, generator=g), "obs.extra": torch.randn(2, 2, 2, generator=g)}
    with torch.no_grad():
        cond = comp.encode(obs)
        own = [diff.encode(obs), flow.encode({"obs.state": obs["obs.state"], "obs.extra": obs["obs.extra"]})]
        assert cond.shape == (2, comp.cond_width) == (2, sum(c[0].numel() for c in own))
        for got, want in zip(comp.split_cond(cond), own, strict=True):
            assert torch.equal(got, want)
        x, t = torch.randn(2, H, DA, generator=g), torch.full((2,), 0.5)
        want = mix_predictions([diff, flow], own, (0.3, 0.7), 1, "velocity", x, t)
        assert torch.equal(comp.predict(x, t, cond), want)
        assert torch.equal(comp.predict(x, torch.tensor(0.5), cond), want)  # a scalar time broadcasts
        noise = torch.randn(2, H, DA, generator=g)
        tail = comp.path.timesteps(8)[-4:]  # a warm start's partial grid
        res = comp.denoise(cond, noise=noise, timesteps=tail, return_chain=True)
        assert res.nfe == 3 and len(res.steps) == 3
        gen = comp.generate(obs, noise=noise, record_chain=True)
        assert gen.nfe == 8 and len(gen.chain) == 8
        assert torch.equal(gen.actions, comp.sample(obs, noise=noise))
    with pytest.raises(VlaflowError, match="packed"):
        comp.split_cond(cond[:, :-1])


def test_composed_config_resolves_the_reference_sampler_and_checks_parents():
    from vlaflow.errors import ConfigError
    from vlaflow.policies.composed.config import ComposedConfig

    diff, flow = _tiny_parents()
    pc = (diff.config.to_dict(), flow.config.to_dict())
    base = dict(horizon=H, n_action_steps=2, action_dim=DA, obs_shapes={"obs.state": (3,)}, parent_configs=pc)
    assert ComposedConfig(weights=(0.6, 0.4), **base).sampler == "ddim"  # the heaviest parent's
    assert ComposedConfig(weights=(0.6, 0.4), reference=1, **base).sampler == "euler"
    assert ComposedConfig(weights=(0.6, 0.4), sampler="ddpm", **base).sampler == "ddpm"
    cfg = ComposedConfig(weights=(0.5, 0.5), **base)
    assert policy_config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="denoising parents"):
        ComposedConfig(weights=(0.5, 0.5), **{**base, "parent_configs": (pc[0], {**pc[1], "family": "ebt"})})


def test_load_parents_refuses_a_non_denoising_checkpoint(tmp_path):
    from vlaflow.errors import VlaflowError
    from vlaflow.policies.checkpoint import load_parents
    from vlaflow.policies.ebt.config import EBTConfig

    diff, _ = _tiny_parents()
    save_checkpoint(tmp_path / "d", diff)
    ebt = build_policy(
        EBTConfig(horizon=H, n_action_steps=2, action_dim=DA, obs_shapes={"obs.state": (3,)}, d_model=16,
                  n_layers=1, n_heads=2, replay_size=4),
        _stats(),
    )  # fmt: skip
    save_checkpoint(tmp_path / "e", ebt)
    (loaded,) = load_parents([tmp_path / "d"])
    assert loaded.config == diff.config
    with pytest.raises(VlaflowError, match="'ebt' checkpoint; GPC parents must be"):
        load_parents([tmp_path / "d", tmp_path / "e"])
    with pytest.raises(VlaflowError, match="not a policy checkpoint"):
        load_parents([tmp_path / "nowhere"])
