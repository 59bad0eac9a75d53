"""Where a training process runs: its rank under torchrun, its device, its CPU threads, its batch pipeline.

Kept apart from :mod:`vlaflow.train.loop` so the loop reads as the steps of training, not as setup.
"""

from __future__ import annotations

import gc
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vlaflow.errors import ConfigError, VlaflowError


@dataclass(frozen=True)
class Process:
    """This process's place in a (possibly distributed) run."""

    rank: int = 0  # global rank under torchrun (0 alone)
    world: int = 1  # number of ranks
    local_rank: int = 0  # rank on this machine (selects the GPU)
    device: torch.device = torch.device("cpu")  # where the trained module lives

    @property
    def main(self) -> bool:
        """Rank 0 logs, evaluates and saves."""
        return self.rank == 0


def start_process(device: str = "auto", num_threads: int = 0) -> Process:
    """Join the torchrun group (gloo on CPU, nccl on CUDA) if WORLD_SIZE > 1, pick the device, and set the
    CPU intra-op threads (see :func:`cpu_threads`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = 0, 0
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, world, local)
    proc = Process(rank, world, local, dev)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads(num_threads, proc))
    return proc


def end_process(*, barrier: bool = True) -> None:
    """Leave the torchrun group, if this process joined one, while the interpreter is still whole.

    Without this, gloo's worker threads can outlive the group into interpreter shutdown and abort the rank
    ("terminate called without an active exception", SIGABRT): seen about once in ten 2-rank runs on a
    loaded 2-core machine, after training had finished. The barrier (skipped after an error, when a peer
    may be gone) keeps one rank from tearing down while the other still talks to it; the collection frees
    the DDP wrapper's reducer, which holds the group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def cpu_threads(requested: int, proc: Process) -> int:
    """Intra-op threads: as asked, else all cores shared among the ranks -- but 1 on a machine whose cores
    are already busy, where OpenMP threads spin against other processes (measured 4-5x slower with 2
    threads than with 1 on a loaded 2-core machine)."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    n = max(1, cores // proc.world)
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    if busy and n > 1:
        if proc.main:
            print(
                f"note: load average >= {cores} cores; training with 1 torch thread (set train.num_threads)"
            )
        n = 1
    return n


def _resolve_device(name: str, world: int, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world > 1:
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu")
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (dict / list / tuple, nested) moved to ``device``; on the CPU the batch itself."""
    if device.type == "cpu":
        return batch
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(torch.is_tensor(v) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class BatchPipeline:
    """Batches of steps ``start, start+1, ...`` from ``make(step)``, prepared ahead on background threads.

    ``mode`` is the batch source's promise: "parallel" (a pure function of the step: ``workers`` threads
    may prepare several at once), "sequential" (ahead of time, but strictly in step order on one thread:
    a source with state, such as a refreshed pool), "none" (on the loop's thread when the step asks: a
    source that needs the weights of this very step, such as on-policy rollouts). Keeping ``2 * workers``
    batches ready takes batch assembly off the optimiser's critical path.
    """

    def __init__(self, make: Callable[[int], Any], start: int, stop: int | None, mode: str, workers: int):
        if mode not in ("parallel", "sequential", "none"):
            raise VlaflowError(f"batch prefetch mode must be parallel|sequential|none, got {mode!r}")
        self.make, self.stop = make, stop
        self.workers = 0 if mode == "none" else workers
        self.depth = 2 * self.workers
        self.pool = None
        if self.workers > 0:
            threads = self.workers if mode == "parallel" else 1
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="vlaflow-batch")
        self.ahead: deque[Future] = deque()
        self.next_step = start  # the next step to queue
        self.expect = start  # the next step the loop must ask for
        self._fill()

    def _fill(self) -> None:
        while self.pool is not None and len(self.ahead) < self.depth:
            if self.stop is not None and self.next_step >= self.stop:
                return
            self.ahead.append(self.pool.submit(self.make, self.next_step))
            self.next_step += 1

    def get(self, step: int) -> Any:
        """The batch of ``step`` (steps are asked for in order)."""
        if step != self.expect:
            raise VlaflowError(f"batch of step {step} asked for, but the pipeline is at step {self.expect}")
        self.expect += 1
        if self.pool is None:
            return self.make(step)
        if not self.ahead:  # a step count without an end ran past what was queued
            self._fill()
        batch = self.ahead.popleft().result()
        self._fill()
        return batch

    def close(self) -> None:
        if self.pool is not None:
            for f in self.ahead:
                f.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None
