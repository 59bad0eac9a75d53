"""The runtime object behind ``vlaflow.load_policy``: numpy obs window in, (H, Da) raw actions out.

Stateless per call (encode once, sample once); action queues and latency handling live in wrappers
(the sim harness, the real-time executor) that use the same ``infer`` / ``reset`` / ``config`` interface.

With ``record_chain=True`` every :class:`~vlaflow.interfaces.InferResult` carries the denoising chain in
``extras["chain"]``, in the form an RL buffer stores (numpy, batch dim dropped, K recorded steps):

- ``x_t``, ``x_next``, ``mean``, ``x0``: (K, H, Da) float32 in *normalized* action units
- ``t``, ``t_next``, ``std``: (K,) float32 path times and the std each step sampled with (0: deterministic)
- ``obs``: the checked observation window ({key: (To, ...)} + ``task``) that re-encodes the condition
- ``sampler``: the sampler's name (its settings: ``policy.sampler_kwargs(sampler)``, updated by
  ``sampler_options``, which the record repeats under ``sampler_options`` when they are given)

``sampler_options`` select the chain RL optimises (stochastic DDIM ``{"eta": 1, "min_std": 0.1}``, DDPM,
flow Euler with ``{"noise_std": 0.1}``); with ``record_chain=True`` a sampler that takes deterministic steps
is refused up front with the list of stochastic options (it has no log-probability to optimise).

:func:`vlaflow.policies.samplers.unstack_chain` turns the arrays back into steps (add a batch dim first)
for :func:`~vlaflow.policies.samplers.rescore_chain` under new weights.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

import vlaflow.keys as K
from vlaflow.errors import VlaflowError
from vlaflow.interfaces import InferResult, RuntimeSpec, obs_window
from vlaflow.policies.samplers import (
    STOCHASTIC_OPTIONS,
    deterministic_message,
    is_stochastic,
    stack_chain,
)


class NonFiniteActions(VlaflowError):
    """An ``infer`` call produced NaN/inf; the message names the stage where it first appeared."""


class PolicyRuntime:
    """Wraps a built policy (in memory, e.g. during training) or a loaded checkpoint."""

    def __init__(
        self,
        policy,
        device: str | torch.device | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        seed: int | None = None,
        record_chain: bool = False,
        sampler_options: dict[str, Any] | None = None,
        require_stochastic: bool = False,
    ):
        self.policy = policy if device is None else policy.to(device)
        self.sampler = sampler
        self.num_steps = num_steps
        self.seed = seed
        self.record_chain = record_chain
        self.sampler_options = dict(sampler_options) if sampler_options else None
        if require_stochastic:
            check_stochastic(self.policy, sampler, self.sampler_options)
        self._generator: torch.Generator | None = None
        self.reset()

    @property
    def config(self) -> RuntimeSpec:
        return self.policy.spec

    def reset(self, seed: int | None = None) -> None:
        """Start of an episode: re-seed the sampling noise from ``seed`` (or the constructor's seed).

        Without either, noise comes from torch's global generator (which the sim harness seeds per episode).
        """
        s = self.seed if seed is None else seed
        if s is not None:
            self._generator = torch.Generator(device=self.policy.device).manual_seed(int(s))

    def infer(
        self, obs: dict[str, Any], *, shift: int | None = None, delay: int | None = None
    ) -> InferResult:
        """obs: arrays with leading To per key (plus optional ``task`` str) -> (H, Da) float32 raw actions.

        ``shift`` / ``delay`` are accepted for the runtime interface and unused: every call samples afresh.
        Never returns NaN/inf: a non-finite observation or chunk raises :class:`NonFiniteActions` naming the
        stage (input key, encode, denoise step k, unnormalize) -- found by replaying the call on the failure
        path only, so a healthy call costs one ``isfinite`` over the chunk.
        """
        window = obs_window(self.config, obs)
        for k, v in window.items():
            if k != K.TASK and np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all():
                raise NonFiniteActions(f"infer: observation {k} holds NaN/inf (stage: input); refused")
        batch = batch_of_one(window)
        rng = self._generator.get_state() if self._generator is not None else torch.get_rng_state()
        # eval() walks every sub-module: only switch (and back) when the policy is training, e.g. rollouts
        # scored during training; a loaded policy stays in eval mode.
        was_training = self.policy.training
        if was_training:
            self.policy.eval()
        try:
            with torch.inference_mode():
                gen = self.policy.generate(
                    batch,
                    sampler=self.sampler,
                    num_steps=self.num_steps,
                    generator=self._generator,
                    record_chain=self.record_chain,
                    **({"sampler_options": self.sampler_options} if self.sampler_options else {}),
                )
        finally:
            if was_training:
                self.policy.train(True)
        if not bool(torch.isfinite(gen.actions).all()):
            raise NonFiniteActions(self._nonfinite_stage(batch, rng))
        extras = {k: v[0].float().cpu().numpy() for k, v in gen.extras.items() if torch.is_tensor(v)}
        if self.record_chain:
            extras["chain"] = self._chain_record(gen.chain, window)
        return InferResult(actions=gen.actions[0].float().cpu().numpy(), nfe=gen.nfe, extras=extras)

    def _nonfinite_stage(self, batch: dict[str, Any], rng: torch.Tensor) -> str:
        """Replay the failed call stage by stage (same noise) and say where NaN/inf first appeared."""
        pol, head = self.policy, "infer produced NaN/inf actions"
        if not (hasattr(pol, "encode") and hasattr(pol, "denoise") and hasattr(pol, "unnormalize_target")):
            return f"{head} (stage: generate of {type(pol).__name__}); check the weights and inputs"
        gen = self._generator
        if gen is not None:
            gen.set_state(rng)
        else:
            torch.set_rng_state(rng)
        was_training = pol.training
        pol.eval()
        try:
            with torch.inference_mode():
                cond = pol.encode(batch)
                if not _all_finite(cond):
                    return f"{head}: the observation encoding is not finite (stage: encode)"
                res = pol.denoise(
                    cond, sampler=self.sampler, num_steps=self.num_steps, generator=gen, return_chain=True
                )
                for i, st in enumerate(res.steps or []):
                    if not bool(torch.isfinite(st.x_next).all()):
                        return f"{head}: first at denoise step {i + 1} of {len(res.steps)} (stage: denoise)"
                if not bool(torch.isfinite(res.x0).all()):
                    return f"{head}: the denoised chunk is not finite (stage: denoise, final x0)"
                if not bool(torch.isfinite(pol.unnormalize_target(res.x0)).all()):
                    return f"{head}: the normalized chunk is finite, the raw one is not (stage: unnormalize)"
        finally:
            pol.train(was_training)
        return f"{head} (not reproduced when replayed stage by stage)"

    def _chain_record(self, steps: list, window: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "obs": window,
            "sampler": self.sampler or self.config.extra.get("sampler", ""),
        }
        if self.sampler_options:  # only then: older readers take every other non-obs key as an array
            record["sampler_options"] = dict(self.sampler_options)
        if steps:  # EBT descends instead of denoising: no Gaussian chain to record
            arrays = stack_chain(steps)
            record.update({k: v[:, 0].float().cpu().numpy() for k, v in arrays.items()})
        return record


def check_stochastic(policy, sampler: str | None = None, options: dict[str, Any] | None = None) -> dict:
    """The effective sampler settings of ``policy`` under ``sampler`` / ``options``; refuses (naming the
    stochastic options) a denoising policy whose chain would be deterministic, or a policy that has no
    Gaussian chain at all (EBT descends, a one-step student has one deterministic step)."""
    name = sampler or getattr(getattr(policy, "config", None), "sampler", "") or ""
    if not hasattr(policy, "sampler_kwargs") or not hasattr(policy, "path"):
        raise VlaflowError(
            f"{type(policy).__name__} has no Gaussian denoising chain to optimise; RL over the chain needs a "
            f"diffusion or flow policy with one of: {'; '.join(STOCHASTIC_OPTIONS)}"
        )
    settings = {**policy.sampler_kwargs(name), **(options or {})}
    kw = {k: float(settings.get(k) or 0.0) for k in ("eta", "min_std", "noise_std")}
    if not is_stochastic(name, **kw):
        raise VlaflowError(deterministic_message(name, **kw))
    return settings


def _all_finite(x: Any) -> bool:
    if torch.is_tensor(x):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_all_finite(v) for v in x)
    return True


def batch_of_one(window: dict[str, Any], device: str | torch.device | None = None) -> dict[str, Any]:
    """A checked runtime window ({key: (To, ...)} + optional ``task``, ``obs_window``) as a batch of one."""
    batch: dict[str, Any] = {}
    for k, v in window.items():
        if k == K.TASK:
            batch[k] = [str(v)]
        else:
            batch[k] = torch.from_numpy(np.ascontiguousarray(v))[None]
            if device is not None:
                batch[k] = batch[k].to(device)
    return batch


def load_policy(
    path: str | os.PathLike, device: str = "cpu", *, fps: float | None = None, **kwargs
) -> PolicyRuntime:
    """Load a checkpoint directory and wrap it; kwargs go to :class:`PolicyRuntime` (sampler, num_steps,
    seed, record_chain). A LeRobot policy directory is converted in memory (``fps`` required, as for
    ``vlaflow import-lerobot``). ``infer`` accepts LeRobot's ``observation.*`` names for the obs keys."""
    from vlaflow.policies.checkpoint import load_checkpoint
    from vlaflow.policies.lerobot_import import import_lerobot_policy, is_lerobot_policy_dir

    if is_lerobot_policy_dir(path):
        policy, _ = import_lerobot_policy(path, fps=fps)
        return PolicyRuntime(policy.to(device), **kwargs)
    return PolicyRuntime(load_checkpoint(path, device=device), **kwargs)
