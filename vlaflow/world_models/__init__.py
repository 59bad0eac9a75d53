"""Diffusion world models and the imagined env (issue 14: World4RL / DIAMOND). See README.md.

Above ``vlaflow.rl`` and ``vlaflow.policies`` (whose denoising contract and samplers it uses), beside
``vlaflow.train``: it imports neither the simulators nor the training loop.

- :mod:`~vlaflow.world_models.twohot`     -- two-hot action encoding on fixed bins
- :mod:`~vlaflow.world_models.edm`        -- EDM preconditioning on the Gaussian path, EDM's path / grid
- :mod:`~vlaflow.world_models.config`     -- WorldModelConfig and presets (``pusht_lowdim``)
- :mod:`~vlaflow.world_models.model`      -- DiffusionWorldModel (a DenoisingModel over next observations)
- :mod:`~vlaflow.world_models.data`       -- transition windows from episodes / stores, a bounded fit
- :mod:`~vlaflow.world_models.checkpoint` -- save / load (JSON + safetensors)
- :mod:`~vlaflow.world_models.reward`     -- PushT coverage from a state (no sim), success classifier
- :mod:`~vlaflow.world_models.env`        -- WorldModelEnv behind the RL's ChunkVecEnv protocol
- :mod:`~vlaflow.world_models.gate`       -- WorldModelDynamics: the model as RL-100's gate model
"""

from vlaflow.world_models.checkpoint import load_world_model, save_world_model
from vlaflow.world_models.config import PRESETS, WorldModelConfig
from vlaflow.world_models.env import WorldModelEnv
from vlaflow.world_models.model import DiffusionWorldModel

__all__ = [
    "PRESETS",
    "DiffusionWorldModel",
    "WorldModelConfig",
    "WorldModelEnv",
    "load_world_model",
    "save_world_model",
]
