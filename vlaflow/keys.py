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


# LeRobot's feature names, accepted as aliases of the keys above: by ``load_policy(...).infer`` (and every
# runtime that checks its observation with ``interfaces.obs_window``), by ``vlaflow import-lerobot`` and by
# the LeRobot dataset ingest / export. ``observation.images.<cam>`` <-> ``obs.image.<cam>``, the older
# single-camera ``observation.image`` -> ``obs.image.main`` (or a policy's only camera),
# ``observation.<x>`` <-> ``obs.<x>`` (``observation.state`` -> ``obs.state``), ``action`` -> ``action``.
LEROBOT_OBS_PREFIX = "observation."
LEROBOT_IMAGES_PREFIX = "observation.images."
LEROBOT_SINGLE_IMAGE = "observation.image"
LEROBOT_SINGLE_CAMERA = "main"  # camera name given to ``observation.image``


def from_lerobot(name: str) -> str:
    """LeRobot feature name -> vlaflow key (names that are not LeRobot observations pass unchanged)."""
    if name.startswith(LEROBOT_IMAGES_PREFIX):
        return image_key(name[len(LEROBOT_IMAGES_PREFIX) :])
    if name == LEROBOT_SINGLE_IMAGE:
        return image_key(LEROBOT_SINGLE_CAMERA)
    if name.startswith(LEROBOT_OBS_PREFIX):
        return OBS_PREFIX + name[len(LEROBOT_OBS_PREFIX) :]
    return name


def to_lerobot(key: str) -> str:
    """vlaflow key -> LeRobot feature name (inverse of :func:`from_lerobot`)."""
    if is_image(key):
        return LEROBOT_IMAGES_PREFIX + camera_of(key)
    if key.startswith(OBS_PREFIX):
        return LEROBOT_OBS_PREFIX + key[len(OBS_PREFIX) :]
    return key


def lerobot_aliases(key: str, n_cameras: int = 0) -> tuple[str, ...]:
    """The LeRobot names that stand for ``key`` (``observation.image`` only for a policy with one camera)."""
    names = (to_lerobot(key),) if to_lerobot(key) != key else ()
    if is_image(key) and n_cameras == 1:
        names += (LEROBOT_SINGLE_IMAGE,)
    return names


def resolve_aliases(obs, needed) -> dict:
    """``obs`` with each needed key that is missing taken from its LeRobot alias (a shallow copy; other
    entries untouched). A key given under both names, or under two aliases, is ambiguous: ValueError."""
    needed = list(needed)
    n_cameras = sum(1 for k in needed if is_image(k))
    out = dict(obs)
    for k in needed:
        found = [a for a in lerobot_aliases(k, n_cameras) if a in obs]
        if k in obs and found:
            raise ValueError(f"observation gives {k!r} twice: as {k!r} and as its LeRobot alias {found[0]!r}")
        if len(found) > 1:
            raise ValueError(f"observation gives {k!r} twice, as {found[0]!r} and {found[1]!r}")
        if found:
            out[k] = obs[found[0]]
    return out
