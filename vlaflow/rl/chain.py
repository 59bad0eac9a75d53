"""The denoising chain as a policy: batched stochastic sampling with recorded steps, and their re-scoring.

Shapes: B batch (envs x decisions), K sampler steps, K' = ``finetune_last`` recorded (fine-tuned) steps,
H chunk length, Da action dim; everything in *normalized* action units.

A chunk is drawn by K reverse steps. The first K - K' use a frozen copy of the imitation policy (DPPO's
"fine-tune only the last K' steps"), the last K' use the trained actor and are recorded as
``(x_t, t, t_next, x_next)`` with their Gaussian log-density. Diffusion samples with stochastic DDIM
(eta = 1) or DDPM, the per-step std floored at ``min_std`` (DPPO and RL-100 both floor it, ~0.1); flow
samples with Euler steps plus injected noise of scale ``noise_std`` (ReinFlow), optionally a learned scale
(:class:`NoiseScale`). Re-scoring (:func:`rescore`) rebuilds each recorded step's Gaussian under the current
weights through :func:`vlaflow.policies.samplers.reverse_step` and scores the recorded ``x_next``: under the
weights that sampled it, that is the recorded log-density (the PPO ratio is 1 at the first update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlaflow.errors import ConfigError
from vlaflow.policies.runtime import check_stochastic
from vlaflow.policies.samplers import gaussian_log_prob, reverse_step

DIFFUSION_SAMPLERS = ("ddim", "ddpm")
FLOW_SAMPLERS = ("euler", "heun")
# How a denoising step's Gaussian is scored: "sum" over the whole chunk's H x Da dims (the exact
# log-density), or "mean_executed": the mean per-dimension log-density over the Ta executed actions (a
# tempered density whose ratio moves ~H x Da / (Ta x Da_exec) times less per update, see rl/README.md)
LOGPROBS = ("sum", "mean_executed")


@dataclass(frozen=True)
class ChainConfig:
    """How the chain samples during RL (defaults: DPPO / RL-100 for diffusion, ReinFlow for flow)."""

    sampler: str = ""  # "" = the policy's own ("ddim" for diffusion, "euler" for flow); or ddim|ddpm|heun
    num_steps: int = 0  # sampler steps K (0 = the policy's num_inference_steps)
    eta: float = 1.0  # DDIM stochasticity (1 = DDPM variance; RL-100's eta = 1)
    # floor of the per-step std, for sampling and scoring. DPPO uses 0.1; on PushT that chain succeeds
    # 7.8% vs 32.8% deterministic (benchmarks/results/rl_chain_noise.md), so RL explored around a much
    # worse policy than it deploys; 0.03 keeps rollout success (43.8%) at 3x the std of 0.01
    min_std: float = 0.03
    noise_std: float = 0.1  # flow: std of the noise injected into each Euler step (ReinFlow)
    learn_noise_std: bool = False  # flow: learn the injected std (per action dim) with the actor
    noise_clip: float = 3.0  # clip drawn noise to +-noise_clip (DPPO's 3)
    finetune_last: int = 0  # K': fine-tune (and record) only the last K' steps (0 = all K)

    def __post_init__(self):
        if self.sampler not in ("", *DIFFUSION_SAMPLERS, *FLOW_SAMPLERS):
            names = ("", *DIFFUSION_SAMPLERS, *FLOW_SAMPLERS)
            raise ConfigError(f"chain.sampler must be one of {names}, got {self.sampler!r}")
        for name in ("num_steps", "finetune_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"chain.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.eta <= 1:
            raise ConfigError(f"chain.eta must be in [0, 1], got {self.eta}")
        if self.min_std < 0 or self.noise_std < 0 or self.noise_clip <= 0:
            raise ConfigError(
                f"chain.min_std / noise_std must be >= 0 and noise_clip > 0, got "
                f"{self.min_std} / {self.noise_std} / {self.noise_clip}"
            )


class NoiseScale(nn.Module):
    """A learned per-action-dim std of the flow noise injection (ReinFlow's noise, state-independent)."""

    def __init__(self, init_std: float, action_dim: int, min_std: float = 0.01):
        super().__init__()
        self.min_std = float(min_std)
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(max(init_std, self.min_std))))

    def forward(self) -> Tensor:  # (1, 1, Da): broadcasts over (B, H, Da), never read as per-sample
        return self.log_std.exp().clamp(min=self.min_std).view(1, 1, -1)


@dataclass(frozen=True)
class Chain:
    """The resolved chain of one policy: sampler name, K, K' and the sampler options it runs with."""

    sampler: str
    num_steps: int
    finetune_last: int
    options: dict[str, Any]  # reverse_step keywords (eta, min_std, noise_std, noise_clip, clip_x0)
    learned_std: bool
    logprob: str = "sum"  # one of LOGPROBS
    executed: int = 0  # Ta: the executed actions "mean_executed" scores (0 = the whole chunk)

    @property
    def flow(self) -> bool:
        return self.sampler in FLOW_SAMPLERS


def resolve_chain(policy, cfg: ChainConfig, logprob: str = "sum", executed: int = 0) -> Chain:
    """The chain ``policy`` samples under ``cfg``; refuses a deterministic one naming the sampler options.

    ``logprob`` / ``executed``: how each step is scored (:data:`LOGPROBS`; ``executed`` = Ta)."""
    if logprob not in LOGPROBS:
        raise ConfigError(f"logprob must be one of {LOGPROBS}, got {logprob!r}")
    sampler = cfg.sampler or getattr(policy.config, "sampler", "")
    k = cfg.num_steps or int(policy.config.num_inference_steps)
    if sampler in FLOW_SAMPLERS:
        opts = {"noise_std": cfg.noise_std, "noise_clip": cfg.noise_clip}
    elif sampler in DIFFUSION_SAMPLERS:
        opts = {"eta": cfg.eta, "min_std": cfg.min_std, "noise_clip": cfg.noise_clip}
    else:
        opts = {}
    settings = check_stochastic(policy, sampler, opts)  # raises for deterministic / chain-less samplers
    kp = cfg.finetune_last or k
    if kp > k:
        raise ConfigError(f"chain.finetune_last={kp} exceeds the chain's {k} steps")
    keep = ("eta", "min_std", "noise_std", "noise_clip", "clip_x0")
    opts = {n: settings[n] for n in keep if n in settings}
    return Chain(sampler, k, kp, opts, cfg.learn_noise_std, logprob, int(executed))


def step_log_prob(chain: Chain, x: Tensor, mean: Tensor, std) -> Tensor:
    """(B,) the score of one recorded step under ``chain.logprob``: the Gaussian log-density summed over
    the chunk ("sum"), or its mean per dimension over the first ``chain.executed`` actions."""
    min_std = chain.options.get("min_std", 0)
    if chain.logprob == "sum":
        return gaussian_log_prob(x, mean, std, min_std)
    ta = chain.executed or x.shape[1]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    s = (s.view(-1, *([1] * (x.dim() - 1))) if s.dim() == 1 else s).expand_as(x)
    lp = gaussian_log_prob(x[:, :ta], mean[:, :ta], s[:, :ta], min_std)
    return lp / float(x[:, :ta].flatten(1).shape[1])


def _step(policy, chain: Chain, cond, x, t, t_next, generator, draw, noise_std=None):
    opts = dict(chain.options)
    if noise_std is not None:
        opts["noise_std"] = noise_std
    return reverse_step(
        lambda x_, t_: policy.predict(x_, t_, cond),
        policy.path,
        x,
        t,
        t_next,
        parameterization=policy.parameterization,
        sampler=chain.sampler,
        generator=generator,
        draw_noise=draw,
        **opts,
    )


@torch.no_grad()
def sample_chain(
    actor,
    frozen,
    chain: Chain,
    cond: Tensor,
    generator: torch.Generator | None = None,
    noise_scale: NoiseScale | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One chunk per condition row: (x0 (B, H, Da) normalized, record of the last K' steps).

    Record: ``x_t``, ``x_next`` (B, K', H, Da); ``t``, ``t_next`` (K',); ``logp`` (B, K') the per-step
    Gaussian log-densities. ``frozen`` runs the first K - K' steps (pass ``actor`` to train every step).
    """
    b = cond.shape[0]
    ts = actor.default_timesteps(chain.num_steps)
    x = torch.randn((b, *actor.target_shape), generator=generator, device=cond.device)
    first = chain.num_steps - chain.finetune_last
    rec: dict[str, list] = {"x_t": [], "x_next": [], "t": [], "t_next": [], "logp": []}
    for i in range(chain.num_steps):
        pol = frozen if i < first else actor
        learned = noise_scale is not None and chain.flow and i >= first
        if learned:  # sample with the learned std, per action dim: draw the ODE step, add the noise here
            st = _step(pol, chain, cond, x, ts[i], ts[i + 1], generator, draw=False, noise_std=0.0)
            z = torch.randn(st.mean.shape, generator=generator, device=x.device)
            z = z.clamp(-chain.options["noise_clip"], chain.options["noise_clip"])
            st.std = noise_scale()
            st.x_next = st.mean + st.std * z
        else:
            st = _step(pol, chain, cond, x, ts[i], ts[i + 1], generator, draw=True)
        if i >= first:
            rec["x_t"].append(x)
            rec["x_next"].append(st.x_next)
            rec["t"].append(ts[i])
            rec["t_next"].append(ts[i + 1])
            rec["logp"].append(step_log_prob(chain, st.x_next, st.mean, st.std))
        x = st.x_next
    out = {k: torch.stack(v, dim=1 if k in ("x_t", "x_next", "logp") else 0) for k, v in rec.items()}
    return x, out


def rescore(
    actor, chain: Chain, cond: Tensor, record: dict[str, Tensor], noise_scale: NoiseScale | None = None
) -> Tensor:
    """Per-step log-probabilities (B, K') of recorded steps under the actor's current weights.

    All B x K' transitions go through one batched network call (per-sample times). ``record`` as from
    :func:`sample_chain` (``t`` / ``t_next`` (K',) or per sample (B, K')).
    """
    x_t, x_next = record["x_t"], record["x_next"]
    b, kp = x_t.shape[:2]
    # per-sample times live with the samples (a (B,) CPU tensor cannot broadcast against CUDA ones)
    t = (record["t"].expand(b, kp) if record["t"].dim() == 1 else record["t"]).to(x_t.device)
    tn = (record["t_next"].expand(b, kp) if record["t_next"].dim() == 1 else record["t_next"]).to(x_t.device)
    cond_k = cond.unsqueeze(1).expand(b, kp, *cond.shape[1:]).reshape(b * kp, *cond.shape[1:])
    flat = x_t.reshape(b * kp, *x_t.shape[2:])
    learned = noise_scale is not None and chain.flow
    st = _step(
        actor, chain, cond_k, flat, t.reshape(-1), tn.reshape(-1), None, False, 0.0 if learned else None
    )
    std = noise_scale() if learned else st.std
    lp = step_log_prob(chain, x_next.reshape(b * kp, *x_next.shape[2:]), st.mean, std)
    return lp.view(b, kp)
