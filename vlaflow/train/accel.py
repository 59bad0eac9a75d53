"""Using an accelerator well, as options of the one loop: mixed precision, gradient accumulation, compile.

* ``train.amp=bf16|fp16|off``: the objective's loss (forward) runs under ``torch.autocast`` in that
  dtype; weights, gradients, AdamW and the EMA stay float32. fp16 adds a ``GradScaler`` (its scale is part
  of the resume state): a step whose scaled gradients overflow is skipped and the scale halved, which is
  the scaler's normal working, not divergence. bf16 needs no scaler (float32's exponent range).
* ``train.grad_accum=N``: each step's batch (``train.batch_size`` over all ranks) is cut into N equal
  micro-batches, each backward adds ``loss / N``; for a loss that is a mean over samples this is the
  gradient of the whole batch (the masked action loss averages over the valid steps of each micro-batch,
  so a micro-batch with more edge padding weighs a little more). Under DDP only the last micro-batch
  all-reduces (``no_sync``). Memory per micro-batch: ``batch_size / (world * N)`` samples.
* ``train.compile=true``: ``torch.compile`` of the objective's loss call (the module's weights and
  checkpoint keys are unchanged). If compiling fails (no C++ compiler for inductor on the CPU, an
  unsupported op), the first step says why and the run continues eager. Inductor draws random numbers
  with its own generator (seeded from torch's; exact repeat/resume of compiled runs is not tested), which
  makes a compiled run's noise -- and so its losses -- differ from an eager run's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from vlaflow.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast + (fp16) gradient scaling for one run on ``device``."""

    def __init__(self, amp: str, device: torch.device):
        if amp not in ("off", *AMP_DTYPES):
            raise ConfigError(f"train.amp must be off|bf16|fp16, got {amp!r}")
        self.amp, self.device = amp, device
        self.dtype = AMP_DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Gradients back in true units before clipping (fp16)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> bool:
        """AdamW's step (skipped by the scaler on an fp16 overflow); True if the weights were updated."""
        if self.scaler is None:
            opt.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale only drops after an overflow (a skip)

    def state(self) -> dict[str, torch.Tensor]:
        """The scaler's state for an exact resume (empty without fp16)."""
        if self.scaler is None:
            return {}
        sd = self.scaler.state_dict()
        return {
            "amp/scale": torch.tensor([float(sd["scale"])], dtype=torch.float64),
            "amp/growth_tracker": torch.tensor([int(sd["_growth_tracker"])], dtype=torch.int64),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.scaler is None or "amp/scale" not in tensors:
            return
        sd = self.scaler.state_dict()
        sd["scale"] = float(tensors["amp/scale"][0])
        sd["_growth_tracker"] = int(tensors["amp/growth_tracker"][0])
        self.scaler.load_state_dict(sd)


def split_batch(batch: Any, n: int) -> list[Any]:
    """``batch`` cut into ``n`` equal parts along its first axis: tensors, arrays and lists (a batch's
    task strings) inside dicts / tuples; other values are shared by every part."""
    if n == 1:
        return [batch]
    size = _batch_len(batch)
    if size is None:
        raise ConfigError("train.grad_accum > 1 needs a batch of tensors (dict/list/tuple) to split")
    if size % n:
        raise ConfigError(
            f"train.grad_accum={n} must divide the batch of each rank ({size} samples): choose a "
            "train.batch_size that is a multiple of grad_accum x the number of ranks"
        )
    m = size // n
    return [_slice(batch, i * m, (i + 1) * m, size) for i in range(n)]


def _batch_len(b: Any) -> int | None:
    if torch.is_tensor(b) or hasattr(b, "shape"):
        return int(b.shape[0]) if len(b.shape) else None
    if isinstance(b, dict):
        lens = [n for v in b.values() if (n := _batch_len(v)) is not None]
        return lens[0] if lens else None
    if isinstance(b, (list, tuple)) and b and any(torch.is_tensor(v) for v in b):
        lens = [n for v in b if (n := _batch_len(v)) is not None]
        return lens[0] if lens else None
    return None


def _slice(b: Any, lo: int, hi: int, size: int) -> Any:
    if (torch.is_tensor(b) or hasattr(b, "shape")) and len(b.shape) and b.shape[0] == size:
        return b[lo:hi]
    if isinstance(b, dict):
        return {k: _slice(v, lo, hi, size) for k, v in b.items()}
    if isinstance(b, list) and len(b) == size and not any(torch.is_tensor(v) for v in b):
        return b[lo:hi]  # per-sample strings (the batch's instructions)
    if isinstance(b, (list, tuple)) and any(torch.is_tensor(v) for v in b):
        return type(b)(_slice(v, lo, hi, size) for v in b)
    return b


class Compiled:
    """``torch.compile(fn)`` that falls back to ``fn`` (with one message naming the error) if compiling or
    the first compiled call fails; later failures are real errors."""

    def __init__(self, fn, enabled: bool, main: bool = True):
        self.fn, self.eager, self.main = fn, fn, main
        self.checked = not enabled
        if enabled:
            try:
                self.fn = torch.compile(fn)
            except Exception as e:  # noqa: BLE001 (the fallback is the point: say why, run eager)
                self._fallback(e)

    def _fallback(self, e: BaseException) -> None:
        if self.main:
            print(
                f"note: train.compile=true but torch.compile failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); training continues eager"
            )
        self.fn, self.checked = self.eager, True

    def __call__(self, *args, **kwargs):
        if self.checked:
            return self.fn(*args, **kwargs)
        try:
            out = self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._fallback(e)
            return self.fn(*args, **kwargs)
        self.checked = True
        return out
