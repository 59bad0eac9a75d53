"""Training configs: what a run is (preset + policy + train + data + eval), and ``field=value`` overrides.

A :class:`RunConfig` is plain data: frozen dataclasses validated at construction, serialised to JSON in
every checkpoint so a run can be resumed (and a mismatch reported field by field). Overrides address
fields by dotted name (``train.steps=2000``, ``policy.net.unet.down_dims=[128,256]``, ``data.horizon=16``)
and are parsed against the field's declared type; a bad name suggests the nearest (searching nested
sections too: ``policy.down_dims`` suggests ``policy.net.unet.down_dims``), a bad value names both.

The observation/action windows To / H / Ta (``n_obs_steps``, ``horizon``, ``n_action_steps``) are one
value each: the policy config carries them (its checkpoint and RuntimeSpec do), and ``data.*`` is the same
value under the name the window sampler reads. ``policy.horizon=32`` and ``data.horizon=32`` both set it;
giving both with different values is an error, and so is a config whose two copies disagree.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from vlaflow.errors import ConfigError
from vlaflow.train.trackers import parse_logger


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, EMA, checkpointing and logging of one training run."""

    steps: int = 10000  # optimiser steps in total (the cosine schedule spans them)
    # global batch: the samples of one optimiser step over all DDP ranks (each rank takes batch_size /
    # world of them) and all grad_accum micro-batches (each batch_size / (world * grad_accum) samples)
    batch_size: int = 256
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 1e-6  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.95, 0.999)  # AdamW betas (diffusion_policy's)
    warmup_steps: int = 500  # linear warm-up from 0 to lr
    schedule: Literal["cosine", "constant"] = "cosine"  # learning-rate decay after warm-up
    ema: bool = True  # keep an exponential moving average of the weights (evaluated and exported)
    ema_power: float = 0.75  # EMA warm-up: decay = 1 - (1 + step) ** -power
    ema_max: float = 0.9999  # EMA decay ceiling
    ema_min: float = 0.0  # EMA decay floor
    grad_clip: float = 10.0  # max global gradient norm (0 = no clipping)
    # AdamW's fused kernel: ~3% faster CPU steps, last-bit float differences (the PushT preset's 300-step
    # loss curve: 290 of 300 values equal at 6 digits, max relative difference 1.7e-6); off = bit-exact
    fused_adamw: bool = False
    eval_every: int = 0  # rollout-evaluate the EMA policy every N steps (0 = only at the end)
    eval_episodes: int = 10  # rollouts per periodic evaluation
    eval_at_end: bool = True  # rollout-evaluate after the last step too
    ckpt_every: int = 1000  # write checkpoints/last (and a step checkpoint) every N steps
    keep_step_ckpts: bool = True  # also keep checkpoints/step_NNNNNNN at every ckpt_every
    log_every: int = 50  # CSV/TensorBoard row every N steps
    seed: int = 0  # seeds weights, the batch order and the noise (per step: derived from (seed, step))
    num_workers: int = 1  # background threads preparing the next batches (0 = inline)
    num_threads: int = 0  # torch intra-op threads (0 = all CPU cores / world size)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    max_minutes: float = 0.0  # stop after this much training wall time (0 = no limit); resumable
    progress: bool = True  # tqdm progress bar (rank 0)
    # experiment trackers beside log.csv: tensorboard|wandb|mlflow|none, or a comma list (wandb and mlflow
    # are optional extras; WANDB_MODE=offline / the file store RUN/mlruns need no network)
    logger: str = "tensorboard"
    amp: str = "off"  # mixed precision of the forward: off|bf16|fp16 (fp16 with a GradScaler)
    grad_accum: int = 1  # micro-batches per step (same gradient as one batch of batch_size, less memory)
    compile: bool = False  # torch.compile the loss call (falls back to eager with a note if it fails)
    # frozen pretrained cameras train on cached trunk features (vlaflow/train/feature_cache.py); off = online
    feature_cache: bool = True
    feature_cache_dir: str = ""  # where the feature caches live ("" = $VLAFLOW_CACHE or ~/.cache/vlaflow)

    def __post_init__(self):
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"train.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            self.schedule in ("cosine", "constant"), f"train.schedule: cosine|constant, got {self.schedule!r}"
        )
        _check(self.ema_power > 0, f"train.ema_power must be > 0, got {self.ema_power}")
        _check(
            0 <= self.ema_min <= self.ema_max < 1,
            f"train.ema_min/ema_max need 0 <= min <= max < 1, got {self.ema_min}, {self.ema_max}",
        )
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        for name in ("eval_every", "ckpt_every", "log_every", "num_workers", "num_threads"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.eval_episodes >= 1, f"train.eval_episodes must be >= 1, got {self.eval_episodes}")
        _check(self.max_minutes >= 0, f"train.max_minutes must be >= 0, got {self.max_minutes}")
        _check(self.amp in ("off", "bf16", "fp16"), f"train.amp must be off|bf16|fp16, got {self.amp!r}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(
            self.batch_size % self.grad_accum == 0,
            f"train.batch_size={self.batch_size} must be a multiple of train.grad_accum={self.grad_accum}",
        )
        parse_logger(self.logger)


def episode_range(spec: str) -> tuple[int, int]:
    """``"START:STOP"`` (``data.episodes``) as ``(start, stop)``, 0 <= start < stop; else a ConfigError."""
    parts = spec.split(":")
    try:
        start, stop = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = stop = None
    _check(
        start is not None and stop is not None and 0 <= start < stop,
        f"data.episodes must be a half-open range START:STOP of episode indices with 0 <= START < STOP "
        f"(e.g. 0:103), got {spec!r}",
    )
    return start, stop


@dataclass(frozen=True)
class DataConfig:
    """Which store keys the policy reads and how training windows are cut."""

    obs_keys: tuple[str, ...] = ("obs.state",)  # observation keys of the store fed to the policy
    n_obs_steps: int = 2  # To: observation steps per window (the last one is the current step)
    horizon: int = 16  # H: actions per predicted chunk
    n_action_steps: int = 8  # Ta: actions executed per replan (evaluation and deployment)
    val_ratio: float = 0.0  # fraction of episodes held out (by episode) from training
    max_episodes: int = 0  # train on the first N episodes only (0 = all)
    # train on episodes START..STOP-1 only, a half-open range "START:STOP" of store episode indices
    # ("" = all; excludes max_episodes): two policies on disjoint halves of the demonstrations
    episodes: str = ""
    # share of every batch drawn from windows at an episode's first `start_steps` steps (0 = uniform): where
    # one scene is demonstrated under several instructions, the state gives the target away after a step or
    # two, and those few windows are the only ones that teach the policy to read the instruction
    start_fraction: float = 0.0
    start_steps: int = 3
    # action dims normalized to 1/action_scale_factor of their range: RTI-DP's "scale" remedy for a
    # discrete gripper (a few low-noise RTI steps from a warm start can flip it from +-1/10, not from +-1);
    # the scaled statistics travel in the checkpoint's normalizer, so inference needs no other setting
    action_scale_dims: tuple[int, ...] = ()
    action_scale_factor: float = 10.0

    def __post_init__(self):
        _check(len(self.obs_keys) >= 1, "data.obs_keys must name at least one observation key")
        for k in self.obs_keys:
            _check(k.startswith("obs."), f"data.obs_keys: {k!r} is not an observation key (obs.*)")
        _check(self.n_obs_steps >= 1, f"data.n_obs_steps must be >= 1, got {self.n_obs_steps}")
        _check(self.horizon >= 1, f"data.horizon must be >= 1, got {self.horizon}")
        _check(
            1 <= self.n_action_steps <= self.horizon,
            f"data.n_action_steps must be in [1, horizon={self.horizon}], got {self.n_action_steps}",
        )
        _check(0 <= self.val_ratio < 1, f"data.val_ratio must be in [0, 1), got {self.val_ratio}")
        _check(self.max_episodes >= 0, f"data.max_episodes must be >= 0, got {self.max_episodes}")
        if self.episodes:
            episode_range(self.episodes)  # raises ConfigError on a malformed range
            _check(
                self.max_episodes == 0,
                f"data.episodes={self.episodes!r} and data.max_episodes={self.max_episodes} both select "
                "episodes: set one of them (data.episodes=0:N is data.max_episodes=N)",
            )
        _check(
            0 <= self.start_fraction < 1, f"data.start_fraction must be in [0, 1), got {self.start_fraction}"
        )
        _check(self.start_steps >= 1, f"data.start_steps must be >= 1, got {self.start_steps}")
        _check(
            self.action_scale_factor > 0,
            f"data.action_scale_factor must be > 0, got {self.action_scale_factor}",
        )
        _check(
            len(set(self.action_scale_dims)) == len(self.action_scale_dims)
            and all(d >= 0 for d in self.action_scale_dims),
            f"data.action_scale_dims must be distinct action dims >= 0, got {list(self.action_scale_dims)}",
        )


@dataclass(frozen=True)
class EvalConfig:
    """Rollout evaluation through the sim harness (periodic during training and at the end), or without a
    task held-out validation on the episodes data.val_ratio keeps out."""

    task: str = ""  # sim task name (vlaflow.sim.tasks.TASKS); "" = no rollout evaluation
    obs_mode: str = "lowdim"  # the task's observation mode ("lowdim", "image", ...)
    seed_start: int = 100000  # first evaluation seed; episodes use seed_start, seed_start+1, ...
    max_steps: int = 0  # episode step limit (0 = the task's own limit)
    n_workers: int = 1  # parallel rollout workers
    final_episodes: int = 0  # rollouts of the final evaluation (0 = train.eval_episodes)
    # without a task: held-out windows scored per validation (data.val_ratio > 0 holds episodes out;
    # vlaflow.train.validation), 0 = all of them
    val_windows: int = 256

    def __post_init__(self):
        _check(self.max_steps >= 0, f"eval.max_steps must be >= 0, got {self.max_steps}")
        _check(self.n_workers >= 1, f"eval.n_workers must be >= 1, got {self.n_workers}")
        _check(self.final_episodes >= 0, f"eval.final_episodes must be >= 0, got {self.final_episodes}")
        _check(self.val_windows >= 0, f"eval.val_windows must be >= 0, got {self.val_windows}")


@dataclass(frozen=True)
class RunConfig:
    """One training run: a named preset's policy, training, data and evaluation settings."""

    name: str  # preset name this run started from
    family: str  # policy family ("diffusion", "flow", ...)
    policy: Any  # the family's config dataclass (DiffusionConfig, FlowConfig, ...)
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation and bookkeeping
    data: DataConfig = field(default_factory=DataConfig)  # keys and windows
    eval: EvalConfig = field(default_factory=EvalConfig)  # rollout evaluation

    def __post_init__(self):
        _check(
            dataclasses.is_dataclass(self.policy), f"policy must be a config dataclass, got {self.policy!r}"
        )
        bad = [
            f"policy.{k}={getattr(self.policy, k)} but data.{k}={getattr(self.data, k)}"
            for k in window_fields(self.policy)
            if getattr(self.policy, k) != getattr(self.data, k)
        ]
        _check(
            not bad,
            "the run config gives two values for one window size (To/H/Ta live in one place; policy.X and "
            "data.X name the same value): " + "; ".join(bad),
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "policy": policy_config_to_dict(self.policy),
            "train": dataclasses.asdict(self.train),
            "data": dataclasses.asdict(self.data),
            "eval": dataclasses.asdict(self.eval),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The config of ``to_dict`` output (a run_config.json, an edited ``--print-config``); a policy and
        data section that disagree on To/H/Ta are an error (:func:`upgrade_run_config_dict` reconciles a
        run saved before they were one value)."""
        from vlaflow.policies import policy_config_from_dict

        missing = [k for k in ("name", "family", "policy") if k not in d]
        _check(not missing, f"run config is missing {missing}; it has {sorted(d)}")
        try:
            return cls(
                name=d["name"],
                family=d["family"],
                policy=policy_config_from_dict(d["policy"]),
                train=_section_from_dict(TrainConfig, d.get("train", {}), "train"),
                data=_section_from_dict(DataConfig, d.get("data", {}), "data"),
                eval=_section_from_dict(EvalConfig, d.get("eval", {}), "eval"),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad run config: {e}") from e


WINDOW_FIELDS = ("n_obs_steps", "horizon", "n_action_steps")  # To, H, Ta: one value, two names


def window_fields(policy: Any) -> tuple[str, ...]:
    """The window fields the policy config carries (all of them for the denoising families)."""
    names = {f.name for f in dataclasses.fields(policy)}
    return tuple(k for k in WINDOW_FIELDS if k in names)


def upgrade_run_config_dict(d: dict) -> dict:
    """A saved run config with the data copy of To/H/Ta written into the policy section where the two
    disagree: before they were one value, the data copy won (it is what the run trained with)."""
    pol, data = d.get("policy"), d.get("data")
    if not isinstance(pol, dict) or not isinstance(data, dict):
        return d
    fixed = {k: data[k] for k in WINDOW_FIELDS if k in pol and k in data and pol[k] != data[k]}
    return {**d, "policy": {**pol, **fixed}} if fixed else d


def policy_config_to_dict(cfg: Any) -> dict:
    """JSON-safe dict of a policy config (uses the family's own ``to_dict`` when it has one)."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _section_from_dict(cls: type, d: dict, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    _check(not unknown, f"{section}: unknown field(s) {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kw = {k: _from_json(v, hints[k]) for k, v in d.items()}
    return cls(**kw)


def _from_json(v: Any, tp: Any) -> Any:
    """JSON lists back to tuples where the field is a tuple."""
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(v, list):
        return tuple(v)
    return v


# ---------------------------------------------------------------------------------------------------------
# Dotted-name overrides


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Return ``cfg`` with each ``section.field=value`` applied (types checked, validation re-run).

    A window size (``policy.horizon`` or ``data.horizon``, ...) sets the one value both names share; two
    overrides giving it different values are an error naming both."""
    windows: dict[str, tuple[int, str]] = {}  # field -> (value, the override that set it)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected FIELD=VALUE, e.g. train.steps=2000")
        path, raw = item.split("=", 1)
        path = path.strip()
        if not path:
            raise ConfigError(f"override {item!r}: empty field name")
        parts = path.split(".")
        if len(parts) == 2 and parts[0] in ("policy", "data") and parts[1] in window_fields(cfg.policy):
            value = parse_value(raw.strip(), int, path)
            prev = windows.get(parts[1])
            if prev is not None and prev[0] != value:
                raise ConfigError(
                    f"overrides {prev[1]} and {item} disagree: policy.{parts[1]} and data.{parts[1]} are "
                    "one value (To/H/Ta live in one place); give it once"
                )
            windows[parts[1]] = (value, item)
            continue
        cfg = _set_path(cfg, parts, raw.strip(), path)
    if windows:
        cfg = _set_windows(cfg, {k: v for k, (v, _) in windows.items()}, [i for _, i in windows.values()])
    # one JSON round trip: nested values given as JSON (lists, dicts) take the field types (tuples)
    return RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) if overrides else cfg


def _set_windows(cfg: RunConfig, values: dict[str, int], items: list[str]) -> RunConfig:
    """Set To/H/Ta in the policy and data sections together (one replace each, so the checks see the new
    window whole, e.g. a larger horizon before a larger n_action_steps)."""
    try:
        data = dataclasses.replace(cfg.data, **values)
        policy = dataclasses.replace(cfg.policy, **values)
        return dataclasses.replace(cfg, policy=policy, data=data)
    except ConfigError as e:
        raise ConfigError(f"override {' '.join(items)}: {e}") from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"override {' '.join(items)}: invalid value: {e}") from e


def _leaf_paths(obj: Any, prefix: str = "") -> list[str]:
    """Every settable dotted field below the dataclass ``obj`` (nested sections expanded)."""
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.extend(_leaf_paths(v, f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _suggest(obj: Any, parts: list[str], prefix: str) -> str | None:
    """The nearest field to the unknown ``parts`` below ``obj``: a sibling with a close name, else a nested
    field whose own name is (or is close to) the last part (``down_dims`` -> ``net.unet.down_dims``)."""
    close = difflib.get_close_matches(parts[0], _field_names(obj), n=1)
    leaves = _leaf_paths(obj)
    want = parts[-1]
    exact = [p for p in leaves if p.split(".")[-1] == want]
    if exact:  # the field exists, one section deeper than written
        return prefix + min(exact, key=len)
    if close and len(parts) == 1:
        return prefix + close[0]
    tails = {p.split(".")[-1]: p for p in sorted(leaves, key=len, reverse=True)}
    near = difflib.get_close_matches(want, list(tails), n=1)
    if near:
        return prefix + tails[near[0]]
    return prefix + close[0] if close else None


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _set_path(obj: Any, parts: list[str], raw: str, full: str) -> Any:
    name = parts[0]
    names = _field_names(obj)
    if name not in names:
        prefix = full[: len(full) - len(".".join(parts))]
        close = _suggest(obj, parts, prefix)
        hint = f" Did you mean '{close}'?" if close else ""
        raise ConfigError(
            f"override {full}={raw}: unknown field '{prefix}{name}'.{hint} Fields: {', '.join(names)}"
        )
    current = getattr(obj, name)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"override {full}={raw}: '{name}' is a value, not a section")
        new_value = _set_path(current, parts[1:], raw, full)
    else:
        if dataclasses.is_dataclass(current):
            sub = ", ".join(_field_names(current))
            raise ConfigError(f"override {full}={raw}: '{full}' is a section; set one of its fields: {sub}")
        tp = typing.get_type_hints(type(obj)).get(name, Any)
        new_value = parse_value(raw, tp, full)
    try:
        return dataclasses.replace(obj, **{name: new_value})
    except ConfigError as e:
        raise ConfigError(f"override {full}={raw}: {e}") from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"override {full}={raw}: invalid value: {e}") from e


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_value(raw: str, tp: Any, name: str = "value") -> Any:
    """Parse the text ``raw`` as a value of type ``tp`` (bool, int, float, str, Literal, tuple/list, dict,
    Optional/Union); raises ConfigError naming ``name``, the expected type and the text."""

    def fail(why: str = "") -> ConfigError:
        return ConfigError(
            f"{name}: expected {_type_name(tp)}, got {raw!r}{(' (' + why + ')') if why else ''}"
        )

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(raw, a, name)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        for a in args:
            if str(a) == raw or (isinstance(a, str) and _unquote(raw) == a):
                return a
        raise fail(f"choose one of {', '.join(map(str, args))}")
    if tp is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise fail()
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            try:
                f = float(raw)
            except ValueError:
                raise fail() from None
            if f.is_integer():
                return int(f)
            raise fail("not an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise fail() from None
    if tp is str:
        return _unquote(raw)
    if origin in (tuple, list) or tp in (tuple, list):
        items = _split_list(raw)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise fail(f"needs exactly {len(args)} items")
            return tuple(parse_value(s, a, name) for s, a in zip(items, args, strict=True))
        elem = args[0] if args else Any
        vals = [parse_value(s, elem, name) for s in items]
        return tuple(vals) if (origin is tuple or tp is tuple) else vals
    if origin is dict or tp is dict:
        try:
            v = json.loads(raw)
        except json.JSONDecodeError:
            raise fail("give a JSON object") from None
        if not isinstance(v, dict):
            raise fail("give a JSON object")
        return v
    raise fail("this field cannot be set from the command line")


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _split_list(raw: str) -> list[str]:
    s = raw.strip()
    if s.startswith("[") and s.endswith("]") or s.startswith("(") and s.endswith(")"):
        s = s[1:-1]
    if not s.strip():
        return []
    return [p.strip() for p in s.split(",")]


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts: ``field: a -> b``."""
    out = []
    for k in sorted(set(a) | set(b)):
        name = f"{prefix}{k}"
        if k not in a:
            out.append(f"{name}: (absent) -> {b[k]!r}")
        elif k not in b:
            out.append(f"{name}: {a[k]!r} -> (absent)")
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            out.extend(config_diff(a[k], b[k], name + "."))
        elif _jsonable(a[k]) != _jsonable(b[k]):
            out.append(f"{name}: {a[k]!r} -> {b[k]!r}")
    return out
