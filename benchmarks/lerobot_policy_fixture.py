"""LeRobot's side of the ``vlaflow import-lerobot`` parity check: a DiffusionPolicy saved as LeRobot saves it,
and its action chunks for fixed observations and fixed initial noise.

Runs inside LeRobot's own venv (never imports vlaflow)::

    LR=/work/venvs/lerobot/bin/python
    $LR benchmarks/lerobot_policy_fixture.py small tests/data/lerobot_policy_diffusion
    $LR benchmarks/lerobot_policy_fixture.py pusht /tmp/lr_pusht

``small``: the committed test fixture (a few hundred kB): ``down_dims`` (32, 64), step embedding 32, low-dim
PushT-like inputs (``observation.state`` 2-D agent position, ``observation.environment_state`` 18-D
keypoints, ``action`` 2-D), To = 2, H = 16, Ta = 8, DDPM with 100 training steps (squared cosine, epsilon,
clip 1.0) -- LeRobot's defaults for the scheduler. ``pusht``: the same at LeRobot's / Diffusion Policy's
real PushT low-dim sizes (``down_dims`` (64, 128, 256), step embedding 128; 4,559,554 parameters), not
committed (benchmarks/lerobot_import.py writes it to a temporary directory).

Weights are LeRobot's random init under ``torch.manual_seed(seed)``, with N(0, 0.1^2) added to every
vector (biases, GroupNorm scales and shifts: left at 0 / 1 they would hide two swapped tensors); the
chunks stay mostly inside the clip range (a saturated chunk equals the clip bound whatever the weights).
Normalisation statistics are set by hand (min/max for state and env in pixels, mean/std for the action to
exercise both modes), and the policy is written with ``save_pretrained`` plus its pre- and post-processor
(``policy_preprocessor.json``, ``policy_postprocessor.json`` and their ``.safetensors`` statistics).
``chunk_inside_clip`` in fixture_info.json is the fraction of normalised chunk values inside (-0.99, 0.99).

``expected.safetensors`` beside it holds, for B observation windows:

* ``state`` (B, To, 2), ``env`` (B, To, 18): raw observations (oldest first), fed step by step through
  the preprocessor into the policy's queues, as ``select_action`` would;
* ``noise`` (B, H, 2): the initial noise given to ``predict_action_chunk``;
* ``chunk_ddpm`` (B, Ta, 2): the un-normalised chunk of ``predict_action_chunk`` with the saved DDPM
  scheduler, after ``torch.manual_seed(ddpm_seed)`` (DDPM's per-step noise comes from torch's global
  generator, since LeRobot passes no generator);
* ``chunk_ddim`` (B, Ta, 2): the same weights with ``noise_scheduler_type="DDIM"`` and 10 steps
  (deterministic given the initial noise).

Prints one JSON line (versions, parameter count, sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

STATE, ENV, ACTION = "observation.state", "observation.environment_state", "action"
STATE_DIM, ENV_DIM, ACTION_DIM = 2, 18, 2
TO, H, TA = 2, 16, 8
SIZES = {
    "small": {"down_dims": (32, 64), "diffusion_step_embed_dim": 32},
    "pusht": {"down_dims": (64, 128, 256), "diffusion_step_embed_dim": 128},
    # LeRobot's lerobot/diffusion_pusht image policy: its defaults (down_dims 512/1024/2048), one 96x96
    # camera named observation.image, no env state
    "pusht_image": {"down_dims": (512, 1024, 2048), "diffusion_step_embed_dim": 128},
    "small_image": {"down_dims": (32, 64), "diffusion_step_embed_dim": 32},  # one camera, env state too
}
SINGLE_IMAGE = ("pusht_image", "small_image")  # sizes with the one camera observation.image
IMG_HW, CROP = (96, 96), (84, 84)  # PushT's camera and Diffusion Policy's crop


def camera_names(n: int, single: bool = False) -> list[str]:
    return (
        ["observation.image"] if single else [f"observation.images.{c}" for c in ("top", "wrist", "side")[:n]]
    )


def make_config(
    size: str,
    scheduler: str = "DDPM",
    inference_steps: int | None = None,
    cameras: int = 0,
    separate: bool = False,
):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    single = size in SINGLE_IMAGE
    cameras = 1 if single else cameras
    images = {n: PolicyFeature(FeatureType.VISUAL, (3, *IMG_HW)) for n in camera_names(cameras, single)}
    env = {} if size == "pusht_image" else {ENV: PolicyFeature(FeatureType.ENV, (ENV_DIM,))}
    return DiffusionConfig(
        n_obs_steps=TO,
        horizon=H,
        n_action_steps=TA,
        input_features={
            STATE: PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
            **images,  # between state and env on purpose: LeRobot's condition order is (state, cameras, env)
            **env,
        },
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        normalization_mapping={
            "VISUAL": NormalizationMode.MEAN_STD,
            "STATE": NormalizationMode.MIN_MAX,
            "ENV": NormalizationMode.MIN_MAX,
            "ACTION": NormalizationMode.MEAN_STD,
        },
        crop_shape=CROP if cameras else None,
        use_separate_rgb_encoder_per_camera=separate,
        kernel_size=5,
        n_groups=8,
        use_film_scale_modulation=True,
        noise_scheduler_type=scheduler,
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        num_inference_steps=inference_steps,
        device="cpu",
        push_to_hub=False,
        **SIZES[size],
    )


def stats(cameras: int = 0, single: bool = False) -> dict:
    cams = {
        n: {
            "mean": torch.tensor([0.40, 0.50, 0.60]).view(3, 1, 1) + 0.05 * i,
            "std": torch.tensor([0.20, 0.25, 0.30]).view(3, 1, 1) + 0.02 * i,
        }
        for i, n in enumerate(camera_names(cameras, single))
    }
    return {
        **cams,
        STATE: {"min": torch.tensor([3.0, 7.0]), "max": torch.tensor([505.0, 499.0])},
        ENV: {"min": torch.linspace(0.0, 40.0, ENV_DIM), "max": torch.linspace(470.0, 512.0, ENV_DIM)},
        ACTION: {"mean": torch.tensor([256.0, 240.0]), "std": torch.tensor([90.0, 110.0])},
    }


def build(
    size: str,
    seed: int,
    scheduler: str = "DDPM",
    inference_steps: int | None = None,
    cameras: int = 0,
    separate: bool = False,
):
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors

    cfg = make_config(size, scheduler, inference_steps, cameras, separate)
    torch.manual_seed(seed)
    policy = DiffusionPolicy(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # GroupNorm's 1 / 0 and zero biases would hide two swapped vectors
        for p in policy.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    single = size in SINGLE_IMAGE
    pre, post = make_diffusion_pre_post_processors(cfg, dataset_stats=stats(1 if single else cameras, single))
    return policy.eval(), pre, post


def chunks(policy, pre, post, state, env, noise, seed: int | None, images=None) -> torch.Tensor:
    """Raw-unit (B, Ta, Da) chunk: obs steps through the preprocessor into the queues (cameras as float
    (B, 3, h, w) in [0, 1], stacked into observation.images as select_action does), then
    predict_action_chunk with ``noise``, then the postprocessor."""
    from lerobot.policies.utils import populate_queues

    images = images or {}
    policy.reset()
    for s in range(state.shape[1]):
        cams = {n: img[:, s].permute(0, 3, 1, 2).float() / 255.0 for n, img in images.items()}
        batch = pre({STATE: state[:, s], ENV: env[:, s], **cams})
        batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        if images:
            batch["observation.images"] = torch.stack([batch[n] for n in images], dim=-4)
        policy._queues = populate_queues(policy._queues, batch)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = policy.predict_action_chunk(batch, noise=noise.clone())
    return post(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("size", choices=sorted(SIZES))
    ap.add_argument("out", help="directory to write (must not exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=3, help="observation windows")
    ap.add_argument("--ddpm-seed", type=int, default=123)
    ap.add_argument("--cameras", type=int, default=0, help="96x96 cameras (top, wrist, side), crop 84x84")
    ap.add_argument("--separate", action="store_true", help="one ResNet-18 per camera")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    from safetensors.torch import save_file

    cam_args = {"cameras": args.cameras, "separate": args.separate}
    policy, pre, post = build(args.size, args.seed, **cam_args)
    out.mkdir(parents=True)
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)

    g = torch.Generator().manual_seed(args.seed + 2)
    b = args.batch
    state = torch.rand(b, TO, STATE_DIM, generator=g) * 500 + 5
    env = torch.rand(b, TO, ENV_DIM, generator=g) * 470 + 20
    noise = torch.randn(b, H, ACTION_DIM, generator=g)
    single = args.size in SINGLE_IMAGE
    images = {
        n: torch.randint(0, 256, (b, TO, *IMG_HW, 3), generator=g, dtype=torch.uint8)
        for n in camera_names(1 if single else args.cameras, single)
    }
    ddpm = chunks(policy, pre, post, state, env, noise, args.ddpm_seed, images)
    ddim_policy, _, _ = build(args.size, args.seed, "DDIM", 10, **cam_args)
    ddim = chunks(ddim_policy, pre, post, state, env, noise, None, images)
    expected = {
        **images,  # uint8 (B, To, h, w, 3) under their LeRobot names
        "state": state,
        "env": env,
        "noise": noise,
        "chunk_ddpm": ddpm,
        "chunk_ddim": ddim,
        "ddpm_seed": torch.tensor([args.ddpm_seed]),
    }
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
    import diffusers
    import lerobot

    act = stats()[ACTION]
    inside = float((((ddim - act["mean"]) / act["std"]).abs() < 0.99).float().mean())

    info = {
        "size": args.size,
        "cameras": list(images),
        "separate_encoders": args.separate,
        "parameters": sum(p.numel() for p in policy.parameters()),
        "chunk_inside_clip": inside,
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir())},
        "versions": {
            "lerobot": getattr(lerobot, "__version__", "?"),
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
    }
    (out / "fixture_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
