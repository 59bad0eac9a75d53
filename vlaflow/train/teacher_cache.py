"""The distillation teacher set on disk: safetensors + JSON metadata, never a pickle.

A teacher set is ``(obs, noise, mid, mid_t, x0)``: ``obs`` maps keys to tensors (or, for ``task``, lists of
instruction strings); the rest are tensors. Tensors are stored as ``obs/<key>`` and ``pair/<i>``; strings
and the set's provenance (``meta``: teacher, its weights' hash, store, sampler, steps) go in the safetensors
header's metadata as JSON. A file that is not such a safetensors file (e.g. a cache written by
``torch.save`` before this format) is refused, not unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlaflow.errors import ConfigError

FORMAT = "vlaflow.teacher_pairs"


def save_teacher_set(path: str | os.PathLike, pairs: tuple, meta: dict) -> None:
    """Write ``pairs`` with ``meta`` to ``path`` (through a temp file, so a kill leaves no half file)."""
    obs, *rest = pairs
    tensors = {f"obs/{k}": v.detach().cpu().contiguous() for k, v in obs.items() if torch.is_tensor(v)}
    texts = {k: [str(x) for x in v] for k, v in obs.items() if not torch.is_tensor(v)}
    tensors.update({f"pair/{i}": t.detach().cpu().contiguous() for i, t in enumerate(rest, start=1)})
    header = {
        "format": FORMAT,
        "meta": json.dumps(meta),
        "texts": json.dumps(texts),
        "n_rest": str(len(rest)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=header)
    os.chmod(tmp, 0o644)  # safetensors writes 0600; the set is no secret
    os.replace(tmp, path)


def load_teacher_set(path: str | os.PathLike) -> tuple[tuple, dict]:
    """(pairs, meta) of a file written by :func:`save_teacher_set`; anything else is a ConfigError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ConfigError(
                    f"--teacher-cache {path}: not a {FORMAT} safetensors file (format "
                    f"{header.get('format')!r}); give another file or delete it"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ConfigError:
        raise
    except Exception as e:  # not safetensors at all (an old torch.save pickle, a truncated file, ...)
        raise ConfigError(
            f"--teacher-cache {path}: not a safetensors teacher set ({type(e).__name__}: {e}); it is not "
            "unpickled. Delete it (or give another file) to regenerate the pairs"
        ) from None
    obs = {k[len("obs/") :]: v for k, v in tensors.items() if k.startswith("obs/")}
    obs.update(json.loads(header.get("texts", "{}")))
    rest = tuple(tensors[f"pair/{i}"] for i in range(1, int(header.get("n_rest", "0")) + 1))
    return (obs, *rest), json.loads(header.get("meta", "{}"))
