"""Key names, defined once: the episode store's arrays, training batches and runtime observations.

Every array in a store lives at ``data/<key>`` and is concatenated along time. Observations start
with ``obs.``; cameras are ``obs.image.<camera>`` (uint8, HWC). Language lives per episode in
``meta/`` (see :mod:`vlaflow.data.store`), not per step; a batch or a runtime observation carries it as
``task`` (text) or ``task_index`` (into the store's task list).

Torch-free and at the bottom of the package: the store, the policies, the torch-free ONNX runtime and the
robot node all speak these names.
"""

from __future__ import annotations

ACTION = "action"
OBS_PREFIX = "obs."
OBS_STATE = "obs.state"
IMAGE_PREFIX = "obs.image."

# Training batches and runtime observations (beside the store keys above).
TASK = "task"  # instruction text: a str (runtime) or a list of B str (batch)
TASK_INDEX = "task_index"  # (B,) int index into the store's / the policy config's task list
ACTION_IS_PAD = "action_is_pad"  # (B, H) bool: the action step lies past the episode end (edge padding)

# Store layout.
DATA_GROUP = "data"
META_GROUP = "meta"
EPISODE_ENDS = "meta/episode_ends"
EPISODE_TASK = "meta/episode_task_index"
EPISODE_SUCCESS = "meta/episode_success"
EPISODE_SOURCE = "meta/episode_source_index"

FORMAT_NAME = "vlaflow.episode_store"
FORMAT_VERSION = 1

# Roles recorded in the schema for each key.
ROLE_ACTION = "action"
ROLE_STATE = "state"
ROLE_IMAGE = "image"
ROLE_OBS = "observation"
ROLE_OTHER = "other"


def image_key(camera: str) -> str:
    return f"{IMAGE_PREFIX}{camera}"


def is_image(key: str) -> bool:
    return key.startswith(IMAGE_PREFIX)


def camera_of(key: str) -> str:
    if not is_image(key):
        raise ValueError(f"{key!r} is not an image key (expected '{IMAGE_PREFIX}<camera>')")
    return key[len(IMAGE_PREFIX) :]


def default_role(key: str) -> str:
    if key == ACTION:
        return ROLE_ACTION
    if is_image(key):
        return ROLE_IMAGE
    if key == OBS_STATE:
        return ROLE_STATE
    if key.startswith(OBS_PREFIX):
        return ROLE_OBS
    return ROLE_OTHER
