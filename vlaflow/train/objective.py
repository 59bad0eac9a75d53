"""What an objective is to the training loop (:mod:`vlaflow.train.loop`): what is learned, from what.

The loop takes the steps (AdamW, schedule, EMA, clipping, DDP, checkpoints, logs, resume); an objective
says what a step learns. It is one small class per method -- a batch source and a loss -- never a
training loop of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from vlaflow.errors import VlaflowError


class Objective:
    """Base of every objective; subclasses set :attr:`module` and implement :meth:`batch` and :meth:`loss`.

    Everything else has a default that fits a single trained policy (behaviour cloning, distillation).
    """

    #: The module whose trainable parameters the optimiser updates. The loop keeps its EMA, saves its raw
    #: weights for resume (``model/<name>``) and wraps it in DDP. A policy, or an ``nn.ModuleDict`` of a
    #: policy and the critics an RL objective trains beside it.
    module: nn.Module

    #: How :meth:`batch` may run ahead of the step (see :class:`vlaflow.train.process.BatchPipeline`):
    #: "parallel" (a pure function of the step), "sequential" (a source with state, in step order),
    #: "none" (needs this very step's weights: on-policy rollouts).
    prefetch: Literal["parallel", "sequential", "none"] = "none"

    def batch(self, step: int) -> Any:
        """The batch of optimiser step ``step`` (0-based; asked for in increasing order)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Any]]:
        """(scalar loss to minimise, metrics) for ``batch``; metrics are logged (scalars only)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups; a group's ``lr_scale`` multiplies the scheduled learning rate (an RL
        critic that learns faster than its actor). Default: every trainable parameter of :attr:`module`."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad]}]

    def after_step(self, step: int) -> dict[str, Any] | None:
        """Called after optimiser step ``step`` (target-network updates, pool refreshes); returned
        metrics join that step's log row."""
        return None

    def progress(self) -> dict[str, str]:
        """Extra fields for the loop's progress bar (an RL objective: env steps, success, return)."""
        return {}

    def deploy(self, module: nn.Module) -> nn.Module:
        """The policy inside ``module`` (the raw module or its EMA copy) that checkpoints hold and
        evaluations roll out."""
        return module

    def extra_state(self) -> dict[str, Tensor]:
        """Tensors beyond weights and AdamW moments that an exact resume needs (replay buffers, critic
        targets); saved in ``train_state.safetensors`` under ``objective/<name>``."""
        return {}

    def load_extra_state(self, tensors: dict[str, Tensor], where: Path) -> None:
        """Restore :meth:`extra_state` after a resume (``tensors`` without the ``objective/`` prefix)."""
        if tensors:
            raise VlaflowError(
                f"{where}: objective state {sorted(tensors)[:5]} that this objective cannot load"
            )
