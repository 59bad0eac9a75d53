"""Tiny random backbones of the real architectures for the VLA tests, saved like a user's local model dirs.

Each ``save_*`` writes ``config.json`` + ``model.safetensors`` + tokenizer files of a randomly initialised
model (seeded) of that architecture: SmolVLM (Idefics3 / SmolVLM2), PaliGemma (SigLIP + Gemma) and a Llama
LM (SmolLM2's architecture) for the assembled backbone. The tokenizer is a word-level one built with
``tokenizers`` (no download); ``words`` changes its vocabulary (the mismatch test).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = tuple("push pick the red blue cube block stack place move to left right on a of and".split())
VOCAB = 64  # embedding rows (>= the tokenizer's ids)
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32)


def save_tokenizer(directory: Path, words: tuple[str, ...] = WORDS) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, "<image>": 4}
    vocab.update({w: i + len(vocab) for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.save_pretrained(directory)


def _save(model, directory: Path, words) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, words)
    return directory


def save_tiny_llama(directory: Path, words: tuple[str, ...] = WORDS, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(LlamaConfig(**TEXT)), directory, words)


def save_tiny_smolvlm(directory: Path, model_type: str = "idefics3", seed: int = 0) -> Path:
    import transformers as T

    torch.manual_seed(seed)
    cls = {"idefics3": (T.Idefics3Config, T.Idefics3ForConditionalGeneration)}
    cls["smolvlm"] = (T.SmolVLMConfig, T.SmolVLMForConditionalGeneration)
    config_cls, model_cls = cls[model_type]
    cfg = config_cls(
        vision_config=dict(VISION, patch_size=8),
        text_config=dict(TEXT, model_type="llama"),
        scale_factor=2,
        image_token_id=4,
    )
    return _save(model_cls(cfg), directory, WORDS)


def save_tiny_paligemma(directory: Path, seed: int = 0) -> Path:
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.PaliGemmaConfig(
        vision_config=dict(VISION, model_type="siglip_vision_model", patch_size=8, projection_dim=32),
        text_config=dict(TEXT, model_type="gemma", head_dim=8, num_key_value_heads=1),
        projection_dim=32,
        image_token_id=4,
    )
    return _save(T.PaliGemmaForConditionalGeneration(cfg), directory, WORDS)
