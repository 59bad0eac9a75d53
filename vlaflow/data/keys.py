"""Key names of the episode store, defined once.

Every array in a store lives at ``data/<key>`` and is concatenated along time. Observations start
with ``obs.``; cameras are ``obs.image.<camera>`` (uint8, HWC). Language lives per episode in
``meta/`` (see :mod:`vlaflow.data.store`), not per step.
"""

from __future__ import annotations

ACTION = "action"
OBS_PREFIX = "obs."
OBS_STATE = "obs.state"
IMAGE_PREFIX = "obs.image."

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
