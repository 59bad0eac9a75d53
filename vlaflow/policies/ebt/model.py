"""EBT-Policy (arXiv 2510.27545) on Energy-Based Transformers (arXiv 2507.02092).

Shapes: B batch, To observation steps, H action chunk length, Da action dim, Nc condition tokens, D width.

A transformer reads [energy token ; observation tokens (Nc) ; action-chunk tokens (H)] and outputs one
scalar energy per sample, ``E(cond, a)`` (B,); lower = more compatible. Actions come from a few gradient
steps ``a <- a - alpha * dE/da`` from Gaussian noise, with ``alpha = softplus(raw_alpha)`` learned and kept
positive. Training backpropagates MSE to the expert chunk *through the unrolled descent*
(``create_graph=True``: second-order gradients reach the energy weights and ``alpha``), with the paper's
regularizers: Langevin noise, per-sample step size uniform in [alpha/2, 2 alpha], a random number of steps,
and a replay buffer of past predictions used as starting points.

At inference the descent optionally stops early per sample when its energy stops decreasing (capped at
``num_inference_steps``); several candidates may be descended, keeping the lowest final energy; the final
energy is returned as an uncertainty signal (:meth:`EBTPolicy.sample_with_energy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlaflow.keys as K
from vlaflow.data.normalize import Normalizer
from vlaflow.errors import VlaflowError
from vlaflow.policies.contract import DenoisingPolicy, Generation, check_stats
from vlaflow.policies.denoising import GenerativeModule
from vlaflow.policies.ebt.config import EBTConfig
from vlaflow.policies.nets.encoders import ObsEncoder


class _Block(nn.Module):
    """Pre-norm transformer block with explicit attention (twice differentiable on every backend)."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d_h)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class EnergyTransformer(nn.Module):
    """(cond (B, Nc, Fc), actions (B, H, Da)) -> energy (B,)."""

    def __init__(self, cond_dim: int, n_cond: int, action_dim: int, horizon: int, cfg: EBTConfig):
        super().__init__()
        d = cfg.d_model
        self.cond_in = nn.Linear(cond_dim, d)
        self.act_in = nn.Linear(action_dim, d)
        self.energy_token = nn.Parameter(torch.zeros(1, 1, d))
        # optional token telling the energy how far from the data the descent started (its noise level)
        self.level_in = (
            nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d)) if cfg.level_token else None
        )
        n_level = 1 if cfg.level_token else 0
        self.pos = nn.Parameter(torch.randn(1, 1 + n_level + n_cond + horizon, d) * 0.02)
        self.type_emb = nn.Parameter(torch.randn(3, d) * 0.02)  # energy / observation / action token types
        self.blocks = nn.ModuleList(_Block(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 1)

    def forward(self, cond: Tensor, actions: Tensor, level: Tensor | None = None) -> Tensor:
        b = actions.shape[0]
        parts = [(self.energy_token + self.type_emb[0]).expand(b, -1, -1)]
        if self.level_in is not None:
            if level is None:
                raise VlaflowError("this energy reads the start's noise level: pass level (B,)")
            parts.append(self.level_in(level.view(b, 1, 1).to(actions.dtype)) + self.type_emb[0])
        parts += [self.cond_in(cond) + self.type_emb[1], self.act_in(actions) + self.type_emb[2]]
        tokens = torch.cat(parts, dim=1)  # (B, 1 [+ 1] + Nc + H, D)
        x = tokens + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.out(self.norm(x[:, 0])).squeeze(-1)  # (B,)


@dataclass
class DescentResult:
    x: Tensor  # (B, H, Da) final chunk, normalized units
    energy: Tensor  # (B,) energy at x (the uncertainty signal)
    steps_used: Tensor  # (B,) accepted descent steps per sample
    energies: list[Tensor] = field(default_factory=list)  # (B,) energy after each step (index 0 = start)
    xs: list[Tensor] = field(default_factory=list)  # (B, H, Da) chunk after each step (index 0 = start)
    path: list[Tensor] = field(default_factory=list)  # (B, H, Da) chunks after each step, graph kept


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class EBTPolicy(GenerativeModule):
    """Energy transformer + encoders + normalizer; actions by gradient descent on the energy."""

    config_class = EBTConfig
    config: EBTConfig
    # Observation handling is the denoising families' (same keys, normalization, language token).
    _obs_window = DenoisingPolicy._obs_window
    _task_texts = DenoisingPolicy._task_texts
    encode = DenoisingPolicy.encode
    unnormalize_action = DenoisingPolicy.unnormalize_action

    def __init__(self, config: EBTConfig, stats: dict):
        super().__init__()
        check_stats(config, stats)
        self.config = config
        self.normalizer = Normalizer(stats, config.norm_modes())
        self.obs_encoder = ObsEncoder(config.obs_shapes, config.encoder)
        cond_dim, n_tokens = self.obs_encoder.out_dim, config.n_obs_steps
        self.text_encoder = None
        if config.encoder.language.enabled:
            from vlaflow.policies.nets.language import TextEncoder

            self.text_encoder = TextEncoder(config.encoder.language)
            self.lang_proj = nn.Linear(self.text_encoder.out_dim, cond_dim)
            n_tokens += 1
        self.energy_net = EnergyTransformer(cond_dim, n_tokens, config.action_dim, config.horizon, config)
        self.raw_alpha = nn.Parameter(torch.tensor(_inverse_softplus(config.alpha_init)))
        # Replay buffer of past predictions (normalized chunks); not saved: it is training scratch.
        replay = torch.zeros(config.replay_size, config.horizon, config.action_dim)
        self.register_buffer("replay", replay, persistent=False)
        self._replay_count = 0
        self.spec = config.runtime_spec(language=config.encoder.language.enabled)

    @property
    def alpha(self) -> Tensor:
        """The learned descent step size, softplus(raw) > 0."""
        return F.softplus(self.raw_alpha)

    def energy(self, cond: Tensor, x: Tensor, level: Tensor | None = None) -> Tensor:
        """Scalar energy (B,) of normalized chunks x (B, H, Da) under condition tokens (B, Nc, Fc); ``level``
        (B,): the descent's starting noise level, read only with ``level_token``."""
        return self.energy_net(cond, x, level)

    # -- descent -----------------------------------------------------------------------------------
    def descend(
        self,
        cond: Tensor,
        x_init: Tensor,
        num_steps: int,
        *,
        step_scale: Tensor | None = None,
        langevin_std: float = 0.0,
        early_stop: bool = False,
        tol: float = 0.0,
        create_graph: bool = False,
        generator: torch.Generator | None = None,
        record: bool = False,
        keep_path: bool = False,
        level: Tensor | None = None,
    ) -> DescentResult:
        """``num_steps`` steps ``x <- x - alpha * scale * dE/dx (+ Langevin noise)`` from x_init (B, H, Da).

        ``create_graph=True`` keeps the graph through every gradient (training: the loss reaches the energy
        weights and alpha through dE/dx). ``early_stop``: a sample stops once its energy drops by less than
        ``tol``; a step that raises the energy is rejected.
        """
        b, clip = x_init.shape[0], self.config.clip_actions
        scale = self.alpha * (torch.ones(b, device=x_init.device) if step_scale is None else step_scale)
        scale = scale.view(b, 1, 1)
        x = x_init if create_graph and x_init.requires_grad else x_init.detach().requires_grad_(True)
        e = self.energy(cond, x, level)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        used = torch.zeros(b, dtype=torch.long, device=x.device)
        xs, energies = ([x.detach()], [e.detach()]) if record else ([], [])
        path: list[Tensor] = []
        for _ in range(num_steps):
            (g,) = torch.autograd.grad(e.sum(), x, create_graph=create_graph)
            x_new = x - scale * g
            if langevin_std > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x_new = x_new + langevin_std * z
            if clip > 0:
                x_new = x_new.clamp(-clip, clip)
            if not create_graph:
                x_new = x_new.detach().requires_grad_(True)
            e_new = self.energy(cond, x_new, level)
            if early_stop:
                accept = active & (e_new < e)
                still = accept & ((e - e_new) > tol)
                used += accept.long()
                if not bool(accept.all()):  # rejected / stopped rows keep their chunk
                    x_new = torch.where(accept.view(b, 1, 1), x_new, x)
                    if create_graph:
                        e_new = torch.where(accept, e_new, e)
                    else:  # the next gradient needs E as a function of the merged leaf
                        x_new = x_new.detach().requires_grad_(True)
                        e_new = self.energy(cond, x_new, level)
                active = still
            else:
                used += 1
            x, e = x_new, e_new
            if keep_path:
                path.append(x)
            if record:
                xs.append(x.detach())
                energies.append(e.detach())
            if early_stop and not bool(active.any()):
                break
        return DescentResult(x=x, energy=e, steps_used=used, energies=energies, xs=xs, path=path)

    # -- training ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        return self.compute_loss(batch)

    def _starts(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """Starting chunks (B, H, Da): Gaussian noise; the first rows from the replay buffer of past
        predictions; the last rows from the expert chunk plus noise (``data_start_prob``). MSE from pure
        noise alone is minimized by the conditional *mean*; starts near each demonstrated chunk make every
        mode an attractor of the descent."""
        cfg = self.config
        b, device = target.shape[0], target.device
        x = torch.randn_like(target) * cfg.init_std
        level = torch.full((b,), cfg.init_std, device=device)  # the noise level of each start
        n_rep = int(round(cfg.replay_prob * b)) if self._replay_count >= b else 0
        if n_rep > 0:
            idx = torch.randint(0, min(self._replay_count, cfg.replay_size), (n_rep,), device=device)
            x[:n_rep] = self.replay[idx]
            level[:n_rep] = cfg.warm_level  # past predictions: read like a warm start
        n_data = int(round(cfg.data_start_prob * b))
        if n_data > 0:
            std = torch.rand(n_data, 1, 1, device=device) * cfg.data_start_std
            x[b - n_data :] = target[b - n_data :] + std * torch.randn_like(target[b - n_data :])
            level[b - n_data :] = std.view(-1)
        n_shift = int(round(cfg.shift_start_prob * b))
        if n_shift > 0:  # rows just before the data rows (they win over replay rows if the shares overlap)
            rows = slice(b - n_data - n_shift, b - n_data)
            x[rows], level[rows] = self._shifted_starts(target[rows])
        return x, level

    def _shifted_starts(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """What the RTI runtime hands a later call, built from the expert: the previous call's chunk shifted
        by the s ~ U{1..Ta} steps executed since covers this window's first H - s steps and repeats its
        last action over the s new ones, i.e. the expert chunk with its last s actions replaced by the one
        before them; plus Gaussian noise of per-sample std U[0, shift_start_std]. Returns (starts, stds)."""
        cfg = self.config
        b, h = target.shape[:2]
        s = torch.randint(1, cfg.n_action_steps + 1, (b, 1), device=target.device)
        idx = torch.minimum(torch.arange(h, device=target.device).expand(b, h), h - 1 - s)  # (B, H)
        start = torch.gather(target, 1, idx.unsqueeze(-1).expand_as(target))
        std = torch.rand(b, 1, 1, device=target.device) * cfg.shift_start_std
        return start + std * torch.randn_like(start), std.view(b)

    def _push_replay(self, x: Tensor) -> None:
        n = self.config.replay_size
        if n == 0:
            return
        x = x.detach()[:n]
        pos = (self._replay_count + torch.arange(x.shape[0], device=x.device)) % n
        self.replay[pos] = x
        self._replay_count += x.shape[0]

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """MSE to the expert chunk after the unrolled descent (second order), on a raw-unit batch."""
        cfg = self.config
        action = torch.as_tensor(batch[K.ACTION], device=self.device).float()
        if action.dim() != 3 or action.shape[1] != cfg.horizon or action.shape[2] != cfg.action_dim:
            raise VlaflowError(
                f"batch 'action' has shape {tuple(action.shape)}, "
                f"expected (B, {cfg.horizon}, {cfg.action_dim})"
            )
        target = self.normalize_action(action)
        cond = self.encode(batch)
        b = target.shape[0]
        steps = int(torch.randint(cfg.train_steps_min, cfg.train_steps_max + 1, ()).item())
        scale = (
            torch.empty(b, device=self.device).uniform_(0.5, 2.0)
            if cfg.randomize_step_size
            else torch.ones(b, device=self.device)
        )
        x_init, level = self._starts(target.detach())
        x_init = x_init.requires_grad_(True)
        res = self.descend(
            cond,
            x_init,
            steps,
            step_scale=scale,
            langevin_std=cfg.train_langevin_std,
            create_graph=True,
            keep_path=cfg.loss_on == "all",
            level=level,
        )
        keep = torch.ones(b, cfg.horizon, 1, device=self.device)
        if cfg.mask_pad_loss and K.ACTION_IS_PAD in batch:
            keep = (~torch.as_tensor(batch[K.ACTION_IS_PAD], device=self.device).bool()).unsqueeze(-1).float()
        denom = (keep.sum() * cfg.action_dim).clamp(min=1.0)
        per_step = [((xk - target) ** 2 * keep).sum() / denom for xk in (res.path or [res.x])]
        loss = torch.stack(per_step).mean()  # "all": mean over the steps; "last": the final chunk only
        self._push_replay(res.x)
        mse_last = float(per_step[-1].detach())
        return loss, {
            "loss": float(loss.detach()),
            "mse_last": mse_last,
            "energy_final": float(res.energy.detach().mean()),
            "alpha": float(self.alpha.detach()),
            "steps": float(steps),
        }

    def normalize_action(self, action: Tensor) -> Tensor:
        return self.normalizer.normalize(K.ACTION, action) if K.ACTION in self.normalizer.modes else action

    # -- sampling ----------------------------------------------------------------------------------
    def sample_with_energy(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        num_candidates: int | None = None,
    ) -> tuple[Tensor, DescentResult]:
        """(actions (B, H, Da) raw units, the descent of the kept candidates: final energy, steps used)."""
        # The descent needs gradients in the chunk only: no graph through the encoder. descend_from copies
        # cond out of inference mode (the runtime calls under inference_mode).
        with torch.no_grad():
            cond = self.encode(obs)  # (B, Nc, Fc)
        kept = self.descend_from(cond, noise, sampler, num_steps, generator, num_candidates)
        return self.unnormalize_action(kept.x), kept

    def descend_from(
        self,
        cond: Tensor,
        start: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        num_candidates: int | None = None,
        warm: bool = False,
    ) -> DescentResult:
        """The inference descent in normalized units under condition tokens ``cond`` (B, Nc, Fc), from
        ``start`` (B, H, Da) or (B, K, H, Da) (None: Gaussian noise of std ``init_std``); of K candidates
        the lowest final energy is kept. A warm start (the RTI runtime's shifted previous chunk) is a start
        like any other (``warm=True`` tells a ``level_token`` energy it starts at ``warm_level``, else at
        ``init_std``). Runs with autograd on whatever the caller's grad mode."""
        cfg = self.config
        sampler = sampler or cfg.sampler
        if sampler not in cfg._SAMPLERS:
            raise VlaflowError(f"EBT samplers are {cfg._SAMPLERS}, got {sampler!r}")
        steps = num_steps or cfg.num_inference_steps
        k = num_candidates or cfg.num_candidates
        with torch.inference_mode(False), torch.enable_grad():
            cond = cond.clone()
            b = cond.shape[0]
            shape = (b, k, cfg.horizon, cfg.action_dim)
            if start is None:
                x0 = torch.randn(shape, generator=generator, device=cond.device) * cfg.init_std
            else:
                x0 = torch.as_tensor(start, dtype=torch.float32, device=cond.device).clone()
                if k == 1 and x0.dim() == 3:
                    x0 = x0.unsqueeze(1)
                if tuple(x0.shape) != shape:
                    raise VlaflowError(f"noise has shape {tuple(x0.shape)}, expected {shape} (B, K, H, Da)")
                if generator is None and cfg.langevin_std > 0:
                    generator = torch.Generator(device=cond.device).manual_seed(0)
            cond_k = cond.repeat_interleave(k, dim=0)  # (B*K, Nc, Fc)
            lvl = torch.full((b * k,), cfg.warm_level if warm else cfg.init_std, device=cond.device)
            res = self.descend(
                cond_k,
                x0.reshape(b * k, cfg.horizon, cfg.action_dim),
                steps,
                langevin_std=cfg.langevin_std,
                early_stop=sampler == "descent_es",
                tol=cfg.es_tol,
                generator=generator,
                level=lvl,
            )
        e = res.energy.detach().view(b, k)
        best = e.argmin(dim=1)  # (B,)
        rows = torch.arange(b, device=best.device) * k + best
        return DescentResult(
            x=res.x.detach()[rows], energy=res.energy.detach()[rows], steps_used=res.steps_used[rows]
        )

    def generate(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        record_chain: bool = False,
    ) -> Generation:
        """Actions with the descent's cost (steps of the slowest row) and final energy (B,)."""
        actions, kept = self.sample_with_energy(obs, noise, sampler, num_steps, generator)
        return Generation(actions=actions, nfe=int(kept.steps_used.max()), extras={"energy": kept.energy})
