"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen network's linear layers.

``y = W x + (alpha / r) * B A x`` with ``A`` (r, in) Kaiming-initialised and ``B`` (out, r) zero, so an
adapted network starts as the frozen one. Only ``A`` and ``B`` train; ``W`` stays as loaded (its weights
keep their names under ``.base``).
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_b = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> Tensor:  # what code reading ``proj.weight`` (dtype / device / shape) expects
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + ((x @ self.lora_a.t()) @ self.lora_b.t()) * self.scale


def apply_lora(module: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> int:
    """Replace every ``nn.Linear`` under ``module`` whose attribute name is in ``targets`` by a
    :class:`LoRALinear`; returns how many were adapted (an error when none: a wrong target name)."""
    found = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                found.append((parent, name, child))
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora_targets {list(targets)} match no linear layer; the backbone's are {names}")
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, rank, alpha))
    return len(found)
