"""torchrun worker of tests/test_accel.py: the Regression objective under DDP with gradient accumulation.

Each rank takes its strided half of the step's global batch; rank 0 writes the final weights (safetensors)
to argv[1]. Run alone (WORLD_SIZE unset) it trains on the whole batch in one process.
"""

from __future__ import annotations

import sys

from safetensors.torch import save_file
from test_accel import Regression

from vlaflow.train.loop import LoopConfig, TrainingLoop
from vlaflow.train.process import end_process


class Sharded(Regression):
    def __init__(self, batch_size: int, rank: int, world: int):
        super().__init__(batch_size)
        self.rank, self.world = rank, world

    def batch(self, step):
        b = super().batch(step)
        return {k: v[self.rank :: self.world] for k, v in b.items()}


def main() -> None:
    out, accum = sys.argv[1], int(sys.argv[2])
    cfg = LoopConfig(
        steps=4, batch_size=16, lr=3e-2, grad_clip=0.5, progress=False, num_threads=1, workers=0,
        device="cpu", logger="none", grad_accum=accum,
    )  # fmt: skip
    loop = TrainingLoop(cfg)
    obj = Sharded(16, loop.process.rank, loop.process.world)
    loop.run(obj)
    if loop.process.main:
        save_file({k: v.detach().contiguous() for k, v in obj.module.state_dict().items()}, out)
    end_process()  # as `vlaflow` does after every command: no rank aborts in interpreter shutdown


if __name__ == "__main__":
    main()
