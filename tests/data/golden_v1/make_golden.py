"""How the golden checkpoints beside this file were made (run once, at commit d3264fd, before the
architecture refactor of issue 11; kept as the record of what the files are, not re-run by the tests).

One tiny checkpoint per registered family (diffusion, flow, consistency, ebt, composed), saved by that
commit's ``save_checkpoint``, and ``expected.json``: for each, an observation window, an initial noise and
the action chunk that commit's ``policy.sample`` returned for them (plus a stochastic DDPM chunk for the
VP families). ``tests/test_golden_checkpoints.py`` loads the files with today's code and must reproduce
those chunks: the checkpoint format stays readable and the maths stays the same.

    python tests/data/golden_v1/make_golden.py      # writes next to itself
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from vlaflow.policies import DiffusionConfig, FlowConfig, build_policy, save_checkpoint
from vlaflow.policies.base_config import MLPConfig, NetConfig, UNetConfig
from vlaflow.policies.composed.model import compose_policies
from vlaflow.policies.consistency.config import ConsistencyConfig
from vlaflow.policies.ebt.config import EBTConfig

HERE = Path(__file__).resolve().parent
TO, H, DA = 2, 8, 2
OBS = {"obs.keypoint": (3, 2), "obs.agent_pos": (2,)}
UNET = NetConfig(kind="unet", unet=UNetConfig(down_dims=(8, 16), kernel_size=3, n_groups=4, step_embed_dim=8))
MLP = NetConfig(kind="mlp", mlp=MLPConfig(width=16, n_blocks=1, step_embed_dim=8))


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


STATS = {
    "action": _stats((DA,), 12.0, 511.0),
    "obs.keypoint": _stats((3, 2), 0.0, 512.0),
    "obs.agent_pos": _stats((2,), 0.0, 512.0),
}
COMMON = dict(n_obs_steps=TO, horizon=H, n_action_steps=4, obs_shapes=OBS, action_dim=DA, fps=10.0)


def _perturbed(policy, seed):
    # fresh inits have zeroed output layers in places; move off them so the golden outputs depend on all
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy.eval()


def main() -> None:
    torch.manual_seed(0)
    diffusion = _perturbed(
        build_policy(DiffusionConfig(**COMMON, net=UNET, num_inference_steps=4, sampler="ddim"), STATS), 1
    )
    flow = _perturbed(build_policy(FlowConfig(**COMMON, net=MLP, num_inference_steps=4), STATS), 2)
    consistency = _perturbed(
        build_policy(
            ConsistencyConfig(
                **COMMON,
                net=UNET,
                teacher_family="flow",
                start_time=1.0,
                parameterization="velocity",
            ),
            STATS,
        ),
        3,
    )
    ebt = _perturbed(
        build_policy(EBTConfig(**COMMON, d_model=16, n_layers=1, n_heads=2, num_inference_steps=2), STATS), 4
    )
    composed = compose_policies([diffusion, flow], [0.6, 0.4]).eval()
    policies = {
        "diffusion": diffusion,
        "flow": flow,
        "consistency": consistency,
        "ebt": ebt,
        "composed": composed,
    }
    g = torch.Generator().manual_seed(7)
    obs = {
        "obs.keypoint": (torch.rand((1, TO, 3, 2), generator=g) * 512).tolist(),
        "obs.agent_pos": (torch.rand((1, TO, 2), generator=g) * 512).tolist(),
    }
    noise = torch.randn((1, H, DA), generator=g)
    expected = {"obs": obs, "noise": noise.tolist(), "families": {}}
    batch = {k: torch.tensor(v) for k, v in obs.items()}
    for name, pol in policies.items():
        d = HERE / name
        if d.exists():
            shutil.rmtree(d)
        save_checkpoint(d, pol)
        with torch.no_grad():
            row = {"sample": pol.sample(batch, noise=noise.clone()).tolist()}
            if name in ("diffusion", "composed"):
                row["sample_ddpm"] = pol.sample(batch, noise=noise.clone(), sampler="ddpm").tolist()
        expected["families"][name] = row
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
