"""``vlaflow import-lerobot DIR --out CKPT``: a LeRobot policy directory -> a vlaflow checkpoint.

The conversion is :func:`vlaflow.policies.lerobot_import.import_lerobot_policy` (safetensors + JSON only);
this module holds its argparse lines, the destination rule and the summary on stdout.
"""

from __future__ import annotations

import argparse

from vlaflow.atomic import OVERWRITE_HELP, check_destination


def add_import_lerobot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir",
        help="LeRobot policy directory (config.json, model.safetensors, policy_preprocessor.json, "
        "policy_postprocessor.json and their .safetensors statistics), e.g. a save_pretrained output",
    )
    parser.add_argument(
        "--out", required=True, help="checkpoint directory to write (atomically; must not exist, never DIR)"
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument(
        "--fps",
        type=float,
        required=True,
        help="control rate of the data the policy was trained on (LeRobot's policy config does not "
        "record it; PushT 10, SO-101 30, ALOHA 50)",
    )


def run_import_lerobot(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: `vlaflow import-lerobot --help` stays torch-free

    from vlaflow.policies.checkpoint import save_checkpoint
    from vlaflow.policies.lerobot_import import import_lerobot_policy

    check_destination(args.out, overwrite=args.overwrite, sources={"the LeRobot policy": args.dir})
    torch.set_num_threads(1)
    policy, provenance = import_lerobot_policy(args.dir, fps=args.fps)
    save_checkpoint(args.out, policy, extra_json={"lerobot_import": provenance})
    cfg, spec = policy.config, policy.spec
    print(f"imported LeRobot {provenance['lerobot_type']} policy {args.dir} -> {args.out}")
    print(
        f"  {policy.num_parameters():,} parameters; inputs {list(cfg.obs_shapes)}; "
        f"action dim {cfg.action_dim}"
    )
    print(
        f"  To {cfg.n_obs_steps}, chunk {spec.horizon} from the current step (LeRobot horizon {cfg.horizon}, "
        f"{cfg.action_offset} past row(s) dropped), Ta {cfg.n_action_steps}, {cfg.fps:g} fps"
    )
    print(
        f"  sampler {cfg.sampler} x {cfg.num_inference_steps} steps (of {cfg.num_train_steps}); "
        f"normalisation {dict(policy.normalizer.modes)} from the {provenance['statistics_from']}"
    )
    return 0
