"""Pieces of the training loop's steps kept out of :mod:`vlaflow.train.loop` so it reads as the steps:
the EMA update, gradient clipping, resume checks, the stop flag (SIGINT/SIGTERM), the DDP replica check."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.train.config import config_diff


class _Ema:
    """``ema <- decay * ema + (1 - decay) * module`` for trained parameters, a copy for the rest -- in a
    handful of ``torch._foreach`` calls instead of two Python-level ops per tensor (bit-identical)."""

    def __init__(self, ema: torch.nn.Module, module: torch.nn.Module):
        pairs = list(zip(ema.parameters(), module.parameters(), strict=True))
        self.avg = ([e for e, m in pairs if m.requires_grad], [m for _, m in pairs if m.requires_grad])
        fixed = [(e, m) for e, m in pairs if not m.requires_grad]
        fixed += list(zip(ema.buffers(), module.buffers(), strict=True))
        self.copy = ([e for e, _ in fixed], [m for _, m in fixed])

    @torch.no_grad()
    def update(self, decay: float) -> None:
        if self.avg[0]:
            torch._foreach_mul_(self.avg[0], decay)
            torch._foreach_add_(self.avg[0], self.avg[1], alpha=1.0 - decay)
        if self.copy[0]:
            torch._foreach_copy_(self.copy[0], self.copy[1])


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients, which are scaled down to ``max_norm`` if it is > 0.

    The same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (per-tensor norms, the norm of their stack,
    one clamped factor) with ``_foreach`` kernels, which that function does not use on the CPU.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def check_resume(config: dict, saved: dict, resumable: frozenset[str]) -> None:
    """A resume may change only bookkeeping fields; anything else would be a different run."""
    diffs = config_diff(saved, config)
    bad = [d for d in diffs if d.split(":")[0] not in resumable and not d.startswith("name:")]
    if bad:
        raise ConfigError(
            "cannot resume: the config differs from the run's saved config in fields that change the "
            "training itself:\n  " + "\n  ".join(bad)
        )


def _check_same_data(state: dict, meta) -> None:
    """A resume must see the data the run started on: every fingerprint field both sides record agree
    (a run saved before the content fingerprint existed is compared on its counts); ``meta``: a RunMeta."""
    saved, now = state.get("data") or {}, meta.data
    diff = {k: (saved[k], now[k]) for k in saved.keys() & now.keys() if saved[k] != now[k]}
    if diff or (saved.keys() ^ now.keys()) - {"fingerprint"}:
        where = (state.get("provenance") or {}).get("data")
        rec = f" (the run recorded {where}, now {meta.provenance.get('data')})" if where else ""
        what = "; ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(
            f"cannot resume: the dataset changed since the run started{rec}: {what or (saved, now)}. "
            "Resume with the store the run trained on, or start a new run (--out)"
        )


class _StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's or torchrun's polite kill) during the steps asks the loop
    to stop after the current step and save checkpoints/last; a second signal interrupts at once. Only in
    the main thread (signal's rule); handlers are restored when the steps end."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        name = signal.Signals(signum).name
        print(f"\n{name}: saving checkpoints/last after this step (again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


def _check_replicas_agree(module: torch.nn.Module) -> None:
    """DDP ranks must hold identical weights after training; a silent desync would be a wrong model."""
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if float(hi - lo) > 1e-6 * max(1.0, abs(float(total))):
        raise VlaflowError(
            f"DDP ranks disagree on the weights after training (sum {float(lo)} vs {float(hi)})"
        )


def _diverged_msg(what: str, step: int, last_saved: int | None, last_dir: Path | None) -> str:
    keep = (
        f"the last good checkpoint is {last_dir} (step {last_saved})"
        if last_saved is not None
        else "no checkpoint had been written yet"
    )
    return (
        f"the training {what} became NaN/inf at step {step}; training stopped, {keep}. "
        "Lower train.lr, set train.grad_clip, or check the data for extreme values."
    )


def _scalar(v) -> bool:
    if torch.is_tensor(v):
        return v.numel() == 1
    return isinstance(v, (int, float))
