"""The denoising contract over a target that is not the action (a (4, 3) next state), and the runtime's
recorded chain re-scored from what ``InferResult.extras["chain"]`` holds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from vlaflow.data.normalize import Normalizer
from vlaflow.errors import VlaflowError
from vlaflow.policies import DiffusionConfig, PolicyRuntime, build_policy
from vlaflow.policies.base_config import MLPConfig, NetConfig, UNetConfig
from vlaflow.policies.denoising import DenoisingModel, make_head
from vlaflow.policies.diffusion.model import DiffusionFamily
from vlaflow.policies.flow.model import FlowFamily
from vlaflow.policies.samplers import chain_log_prob, rescore_chain, unstack_chain

L, D = 4, 3  # target: the next L states of a D-dim system


@dataclass(frozen=True)
class NextStateConfig:
    sampler: str = "ddim"
    num_inference_steps: int = 10
    num_train_steps: int = 100  # DiffusionFamily
    ddim_eta: float = 0.0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    time_scale: float = 100.0  # FlowFamily
    time_beta_a: float = 1.5
    time_beta_b: float = 1.0
    time_min: float = 0.001


def _stats(shape, lo, hi):
    return {"min": np.full(shape, lo, np.float32), "max": np.full(shape, hi, np.float32)}


class _NextState(DenoisingModel):
    """p(next states (L, D) | state (D,)): the condition is one token from the current state."""

    def __init__(self, config):
        norm = Normalizer({"next": _stats((D,), -2, 2), "obs.state": _stats((D,), -1, 1)}, {"next": "minmax"})
        super().__init__(
            config, target_key="next", target_shape=(L, D), normalizer=norm, mask_key="next_is_pad"
        )
        self.state_proj = nn.Linear(D, 16)
        self.head = make_head(
            NetConfig(kind="mlp", mlp=MLPConfig(width=64, n_blocks=2, step_embed_dim=16)), (L, D), 16, 1
        )

    def encode(self, obs):
        return self.state_proj(torch.as_tensor(obs["obs.state"]).float()).unsqueeze(1)  # (B, 1, 16)


class DiffusionNextState(DiffusionFamily, _NextState):
    pass


class FlowNextState(FlowFamily, _NextState):
    pass


def _rollout(state):  # (B, D) -> (B, L, D): a deterministic linear system, the truth to learn
    steps = [state * (0.8 ** (k + 1)) + 0.1 * (k + 1) for k in range(L)]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("cls", [DiffusionNextState, FlowNextState], ids=["diffusion", "flow"])
def test_a_denoising_model_with_a_non_action_target_trains_and_samples(cls):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = cls(NextStateConfig(sampler="ddim" if cls is DiffusionNextState else "euler"))
    assert model.target_key == "next" and model.target_shape == (L, D)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(400):
        state = torch.rand(128, D, generator=g) * 2 - 1
        loss, metrics = model.compute_loss({"obs.state": state, "next": _rollout(state)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["loss"])
    model.eval()
    state = torch.rand(64, D, generator=g) * 2 - 1
    with torch.no_grad():
        gen = model.generate(
            {"obs.state": state}, generator=torch.Generator().manual_seed(2), record_chain=True
        )
    torch.set_num_threads(threads)
    assert gen.actions.shape == (64, L, D) and gen.nfe == 10 and len(gen.chain) == 10
    err = float((gen.actions - _rollout(state)).abs().mean())
    baseline = float((_rollout(state) - _rollout(state).mean(0)).abs().mean())  # ignore the condition
    print(f"loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}; err {err:.3f} vs {baseline:.3f}")
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert err < 0.25 * baseline, (err, baseline)


def test_the_target_key_shape_and_pad_mask_are_the_models_own():
    torch.manual_seed(0)
    model = DiffusionNextState(NextStateConfig())
    state = torch.zeros(2, D)
    with pytest.raises(VlaflowError, match=r"batch 'next' has shape \(2, 5, 3\), expected \(B, 4, 3\)"):
        model.compute_loss({"obs.state": state, "next": torch.zeros(2, 5, D)})
    with pytest.raises(VlaflowError, match="batch has no 'next'"):
        model.compute_loss({"obs.state": state, "action": torch.zeros(2, L, D)})
    with pytest.raises(VlaflowError, match=r"noise has shape \(2, 16, 2\), expected \(2, 4, 3\)"):
        model.denoise(model.encode({"obs.state": state}), noise=torch.zeros(2, 16, 2))
    # padded rows leave the loss: a batch whose every row is padded except row 0 of the target
    batch = {"obs.state": state, "next": torch.zeros(2, L, D)}
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[:, 0] = False
    torch.manual_seed(3)
    masked, _ = model.compute_loss({**batch, "next_is_pad": pad})
    torch.manual_seed(3)
    _, m = model.compute_loss(batch)
    assert masked.item() != pytest.approx(m["loss"])


def _stats_pusht():
    def st(shape, lo, hi):
        lo_a, hi_a = np.full(shape, lo, np.float32), np.full(shape, hi, np.float32)
        return {
            "min": lo_a,
            "max": hi_a,
            "mean": (lo_a + hi_a) / 2,
            "std": hi_a - lo_a,
            "q01": lo_a,
            "q99": hi_a,
        }

    return {
        "action": st((2,), 12, 511),
        "obs.keypoint": st((9, 2), 0, 512),
        "obs.agent_pos": st((2,), 0, 512),
    }


@pytest.mark.parametrize("sampler,steps", [("ddpm", 6), ("ddim", 4)])
def test_runtime_records_the_chain_and_it_rescores_from_the_record(sampler, steps):
    net = NetConfig(
        kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, step_embed_dim=16)
    )
    torch.manual_seed(0)
    policy = build_policy(DiffusionConfig(net=net, ddim_eta=1.0), _stats_pusht())
    rng = np.random.default_rng(0)
    obs = {
        "obs.keypoint": rng.uniform(0, 512, (3, 9, 2)).astype(np.float32),  # one step more than To = 2
        "obs.agent_pos": rng.uniform(0, 512, (3, 2)).astype(np.float32),
    }
    plain = PolicyRuntime(policy, sampler=sampler, num_steps=steps, seed=5).infer(obs)
    res = PolicyRuntime(policy, sampler=sampler, num_steps=steps, seed=5, record_chain=True).infer(obs)
    np.testing.assert_array_equal(res.actions, plain.actions)  # recording does not change the sample
    assert "chain" not in plain.extras
    chain = res.extras["chain"]
    assert chain["sampler"] == sampler
    assert chain["x_t"].shape == chain["x_next"].shape == chain["mean"].shape == (steps, 16, 2)
    assert chain["t"].shape == chain["t_next"].shape == chain["std"].shape == (steps,)
    assert all(isinstance(v, np.ndarray) for k, v in chain.items() if k not in ("obs", "sampler"))
    np.testing.assert_array_equal(chain["t"], policy.path.timesteps(steps)[:-1].numpy())
    np.testing.assert_array_equal(chain["x_t"][1:], chain["x_next"][:-1])  # consecutive steps link up
    for k in ("obs.keypoint", "obs.agent_pos"):
        np.testing.assert_array_equal(chain["obs"][k], obs[k][-2:])  # the window that re-encodes
    final = policy.unnormalize_action(torch.from_numpy(chain["x_next"][-1]))
    np.testing.assert_allclose(final.numpy(), res.actions, rtol=1e-6, atol=1e-4)
    # re-score from the record alone: re-encode the window, re-predict every step, sum the densities
    steps_ = unstack_chain({k: v[:, None] for k, v in chain.items() if k not in ("obs", "sampler")})
    with torch.no_grad():
        cond = policy.encode({k: torch.from_numpy(v)[None] for k, v in chain["obs"].items()})
        kw = {
            "parameterization": policy.parameterization,
            "sampler": sampler,
            **policy.sampler_kwargs(sampler),
        }
        rescored = rescore_chain(lambda x, t: policy.predict(x, t, cond), policy.path, steps_, **kw)
    torch.testing.assert_close(rescored, chain_log_prob(steps_), rtol=1e-5, atol=1e-3)
