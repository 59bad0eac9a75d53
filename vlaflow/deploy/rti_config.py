"""RTI-DP's settings, defined once for the PyTorch runtime (:mod:`vlaflow.deploy.rti`) and the torch-free ONNX
runtime (:mod:`vlaflow.deploy.onnx_rti`), so the two cannot drift apart (they once did: the ONNX runtime
snapped gripper dims whenever ``gripper_dims`` was set, the PyTorch one only with ``gripper_mode="clip"``).

Torch-free (numpy is not needed either): the robot-side ONNX runtime imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlaflow.errors import ConfigError

WARM_MODES = ("place", "noised")
GRIPPER_MODES = ("none", "clip")
RTI_SAMPLERS = ("ddpm", "ddim", "euler", "heun")  # the multi-step samplers of policies.samplers (tested)


def default_warm_steps(num_steps: int) -> int:
    """RTI-DP's default tail length on a ``num_steps`` grid: 20 on a 100-step grid, half a short grid
    (the measurement behind the number: :class:`RTIConfig`'s docstring)."""
    return min(20, max(1, int(num_steps) // 2))


@dataclass(frozen=True)
class RTIConfig:
    """How RTI-DP samples: a DDPM-100 grid, the last 20 steps after the warm start.

    The paper runs only [2, 1, 0] on low-dim PushT (3 steps). On our PushT diffusion policy (Ta = 8 of
    H = 16, so half of every warm start is the repeated last action) 3 steps scored 0.258, 10 steps 0.838,
    20 steps 0.957 and 30 steps 0.955 against 0.953 for full DDPM-100 (50 seeds each,
    ``benchmarks/results/realtime.md``): 20 is the default on a 100-step grid (2.8 network evaluations
    per control step), half the grid on shorter ones.

    Replanning at every control tick (the executor's ``exec_horizon=1``, RTI-DP's own regime) each chunk
    is refined on every tick before it runs, so fewer steps suffice: on a 3000-step PushT checkpoint,
    5 warm steps scored 0.950 (3: 0.916, 2: 0.829) against 0.954 for full DDPM-100 on the same 50 seeds.
    Pass ``n_warm_steps=5`` there (``vlaflow bench latency --rti-warm 5 --rti-exec-horizon 1``).
    """

    sampler: str = "ddpm"  # sampler on the grid ("ddpm" | "ddim" | "euler" | "heun"; ONNX: not heun)
    num_steps: int = 100  # the full grid (first call runs all of it; later calls only its tail)
    n_warm_steps: int = 0  # reverse steps after the warm start (0: min(20, num_steps // 2); paper: 3)
    warm_mode: str = "place"  # "place": x_t0 = alpha x_prev | "noised": + sigma eps (fixed eps)
    gripper_dims: tuple[int, ...] = ()  # action dims that are discrete (open/close)
    # "clip": binarize the warm start's gripper dims to +-1 | "none" (the default, and the better one when
    # 2-5 warm steps: clip discards the partial move a flip builds over successive calls; pick_place success
    # 1% with it vs 70% without every tick, 0% vs 52% every Ta, benchmarks/results/rti_gripper.md)
    gripper_mode: str = "none"
    seed: int = 0  # seeds the fixed warm-start eps and stochastic sampler noise (reset(seed) overrides)

    def __post_init__(self):
        object.__setattr__(self, "gripper_dims", tuple(int(d) for d in self.gripper_dims))
        if self.sampler not in RTI_SAMPLERS:
            raise ConfigError(f"RTIConfig.sampler must be one of {RTI_SAMPLERS}, got {self.sampler!r}")
        if self.num_steps < 1:
            raise ConfigError(f"RTIConfig.num_steps must be >= 1, got {self.num_steps}")
        if self.n_warm_steps == 0:  # auto: 20 on a 100-step grid, half of a short grid
            object.__setattr__(self, "n_warm_steps", default_warm_steps(self.num_steps))
        if not 1 <= self.n_warm_steps <= self.num_steps:
            raise ConfigError(
                f"RTIConfig.n_warm_steps must be in 1..num_steps={self.num_steps}, got {self.n_warm_steps}"
            )
        if self.warm_mode not in WARM_MODES:
            raise ConfigError(f"RTIConfig.warm_mode must be one of {WARM_MODES}, got {self.warm_mode!r}")
        if self.gripper_mode not in GRIPPER_MODES:
            raise ConfigError(
                f"RTIConfig.gripper_mode must be one of {GRIPPER_MODES}, got {self.gripper_mode!r}"
            )
        if self.gripper_mode != "none" and not self.gripper_dims:
            raise ConfigError("RTIConfig.gripper_mode='clip' needs gripper_dims (the discrete action dims)")

    @property
    def binarized_dims(self) -> tuple[int, ...]:
        """The action dims a warm start snaps to +-1: ``gripper_dims`` under ``gripper_mode="clip"``, else
        none (``gripper_dims`` alone only names the discrete dims)."""
        return self.gripper_dims if self.gripper_mode == "clip" else ()

    def warm_timesteps(self, grid):
        """The tail of the sampler's time ``grid`` (torch or numpy, noisy to clean) a warm start runs:
        its first entry is t0, then ``n_warm_steps`` steps."""
        return grid[-(self.n_warm_steps + 1) :]
