"""Issue 12, security and bounds: a checkpoint is untrusted input.

Crafted checkpoints (copies of the tiny golden diffusion checkpoint, then edited) must never reach an
unpickler (a pickle payload that would create a marker file proves it), never make the loader follow a
path out of the checkpoint, be refused before allocation when the config asks for an absurd network, and
be refused when weights or statistics are not finite. ``PolicyRuntime.infer`` never returns NaN silently.
The distillation teacher cache is safetensors, and a pickle at its path is refused, not loaded.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from vlaflow.errors import VlaflowError  # noqa: E402
from vlaflow.policies import load_checkpoint  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_v1" / "diffusion"
OBS = {"obs.keypoint": np.zeros((2, 3, 2), np.float32), "obs.agent_pos": np.zeros((2, 2), np.float32)}


class _Payload:
    """Unpickling this creates ``marker``: the test's proof that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(GOLDEN, d)
    return d


def _edit_config(d: Path, edit) -> None:
    meta = json.loads((d / "config.json").read_text())
    edit(meta["config"])
    (d / "config.json").write_text(json.dumps(meta))


def _with_language(d: Path, path: str) -> None:
    def edit(c):
        c["encoder"]["language"].update(enabled=True, pretrained_path=path)

    _edit_config(d, edit)


def test_pickled_weights_in_text_encoder_are_refused_not_loaded(tmp_path):
    d = _ckpt(tmp_path)
    _with_language(d, "/home/someone/bert")
    (d / "text_encoder").mkdir()
    (d / "text_encoder" / "config.json").write_text("{}")
    marker = tmp_path / "unpickled"
    (d / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(VlaflowError, match=r"pytorch_model\.bin.*only tokenizer and architecture files"):
        load_checkpoint(d)
    assert not marker.exists()


def test_a_user_text_model_with_pickled_weights_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from vlaflow.policies.base_config import LanguageConfig
    from vlaflow.policies.nets.language import TextEncoder

    src = tmp_path / "bert"
    src.mkdir()
    marker = tmp_path / "unpickled"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="pickled weights"):
        TextEncoder(LanguageConfig(enabled=True, pretrained_path=str(src)))
    assert not marker.exists()


def test_paths_in_a_checkpoint_config_are_not_followed_outside_it(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    d = _ckpt(tmp_path)
    _with_language(d, str(outside))  # absolute
    with pytest.raises(VlaflowError, match="paths outside a checkpoint are never followed"):
        load_checkpoint(d)
    _with_language(d, "../elsewhere")  # relative escape
    with pytest.raises(VlaflowError, match="never followed"):
        load_checkpoint(d)
    (d / "text_encoder").symlink_to(outside, target_is_directory=True)  # a link out of the checkpoint
    with pytest.raises(VlaflowError, match="leads outside the checkpoint directory"):
        load_checkpoint(d)
    d2 = _ckpt(tmp_path / "b")
    (d2 / "normalizer.json").rename(outside / "normalizer.json")
    (d2 / "normalizer.json").symlink_to(outside / "normalizer.json")
    with pytest.raises(VlaflowError, match=r"normalizer\.json.*leads outside"):
        load_checkpoint(d2)


def test_an_absurd_network_is_refused_before_allocation(tmp_path, monkeypatch):
    d = _ckpt(tmp_path)

    def huge(c):  # ~10^13 parameters: allocating it would take tens of terabytes
        c["net"]["unet"]["down_dims"] = [1_000_000, 2_000_000]
        c["net"]["unet"]["n_groups"] = 1

    _edit_config(d, huge)
    with pytest.raises(VlaflowError, match=r"network of [\d,]+ parameters, over the limit of 1,000,000,000"):
        load_checkpoint(d)
    d2 = _ckpt(tmp_path / "deep")

    def deep(c):  # 10^9 layers: tiny weights each, but a billion module objects to construct
        c["net"]["transformer"]["n_layers"] = 10**9

    _edit_config(d2, deep)
    with pytest.raises(VlaflowError, match=r"net\.transformer\.n_layers=1000000000 is over the limit"):
        load_checkpoint(d2)
    # the limit is an env var or an argument; a normal checkpoint under a tiny limit is refused too
    monkeypatch.setenv("VLAFLOW_MAX_PARAMS", "1000")
    with pytest.raises(VlaflowError, match="over the limit of 1,000"):
        load_checkpoint(GOLDEN)
    assert load_checkpoint(GOLDEN, max_params=10**6).config.family == "diffusion"


def test_non_finite_weights_or_statistics_are_refused(tmp_path):
    d = _ckpt(tmp_path)
    w = load_file(str(d / "model.safetensors"))
    name = next(k for k, v in w.items() if v.is_floating_point() and v.numel() > 1)
    w[name] = w[name].clone()
    w[name].view(-1)[0] = float("nan")
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(VlaflowError, match=f"weight {name} has 1 NaN/inf"):
        load_checkpoint(d)
    d2 = _ckpt(tmp_path / "b")
    norm = json.loads((d2 / "normalizer.json").read_text())
    key = next(iter(norm["stats"]))
    stat = next(iter(norm["stats"][key]))
    arr = np.asarray(norm["stats"][key][stat], np.float64)
    arr.reshape(-1)[0] = np.inf
    norm["stats"][key][stat] = arr.tolist()
    (d2 / "normalizer.json").write_text(json.dumps(norm).replace("Infinity", "Infinity"))
    with pytest.raises(VlaflowError, match=f"statistic {key}.{stat} is not finite"):
        load_checkpoint(d2)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_infer_never_returns_nan_and_names_the_stage():
    from vlaflow.policies.runtime import NonFiniteActions, PolicyRuntime

    rt = PolicyRuntime(load_checkpoint(GOLDEN), seed=0)
    assert np.isfinite(rt.infer(OBS).actions).all()
    bad = dict(OBS, **{"obs.agent_pos": np.full((2, 2), np.nan, np.float32)})
    with pytest.raises(NonFiniteActions, match=r"observation obs\.agent_pos.*stage: input"):
        rt.infer(bad)
    # a NaN weight in the denoiser: the first denoising step is named
    pol = load_checkpoint(GOLDEN)
    with torch.no_grad():
        last = [p for n, p in pol.named_parameters() if "final" in n or "out" in n] or list(pol.parameters())
        last[-1].fill_(float("nan"))
    with pytest.raises(NonFiniteActions, match=r"denoise step 1 of \d+ \(stage: denoise\)"):
        PolicyRuntime(pol, seed=0).infer(OBS)
    # huge action statistics: the normalized chunk is fine, the raw one overflows
    from vlaflow.data.normalize import Normalizer

    pol = load_checkpoint(GOLDEN)
    stats = {k: dict(v) for k, v in pol.normalizer.stats.items()}
    act = stats["action"]
    stats["action"] = {**act, "min": np.full_like(act["min"], -3e38), "max": np.full_like(act["max"], 3e38)}
    pol.normalizer = Normalizer(stats, pol.normalizer.modes)
    with pytest.raises(NonFiniteActions, match=r"stage: unnormalize"):
        PolicyRuntime(pol, seed=0).infer(OBS)


def test_teacher_cache_is_safetensors_and_a_pickle_there_is_refused(tmp_path):
    from vlaflow.errors import ConfigError
    from vlaflow.train.objectives.distill import teacher_set

    meta = {"teacher": "t", "teacher_sha256": "0" * 64, "data": "d", "sampler": "ddim", "steps": 10}

    def fresh(k):
        g = torch.Generator().manual_seed(k)
        obs = {"obs.state": torch.randn(k, 2, 5, generator=g), "task": [f"task {i}" for i in range(k)]}
        return (
            obs,
            *(torch.randn(k, 8, 3, generator=g) for _ in range(2)),
            torch.rand(k),
            torch.randn(k, 8, 3),
        )

    cache = tmp_path / "pairs.safetensors"
    made, cached = teacher_set(fresh, 6, str(cache), meta, chunk=4, progress=False)
    assert not cached and cache.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    again, cached = teacher_set(fresh, 5, str(cache), meta, progress=False)
    assert cached and again[0]["task"] == made[0]["task"][:5]
    for a, b in zip(again[1:], made[1:], strict=True):
        assert torch.equal(a, b[:5])
    assert torch.equal(again[0]["obs.state"], made[0]["obs.state"][:5])
    with pytest.raises(ConfigError, match="was made by"):
        teacher_set(fresh, 5, str(cache), {**meta, "steps": 11}, progress=False)
    marker = tmp_path / "unpickled"
    cache.write_bytes(pickle.dumps({"meta": meta, "pairs": _Payload(marker)}))  # an old torch.save cache
    with pytest.raises(ConfigError, match="not a safetensors teacher set.*not unpickled"):
        teacher_set(fresh, 5, str(cache), meta, progress=False)
    assert not marker.exists()
