"""``vlaflow export CKPT --out DIR``: flags -> :class:`~vlaflow.deploy.export.ExportOptions`, then
:func:`~vlaflow.deploy.export.export_policy` and a parity summary on stdout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlaflow.atomic import OVERWRITE_HELP, check_destination
from vlaflow.deploy.export import EXPORTERS, PARITY, ExportOptions, export_policy
from vlaflow.errors import ConfigError


def _parse_samplers(text: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, steps = part.partition(":")
        if not steps.isdigit():
            raise ConfigError(f"--samplers entries are NAME:STEPS (e.g. ddim:10,ddpm:100), got {part!r}")
        out.append((name, int(steps)))
    return tuple(out)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="policy checkpoint directory (diffusion, flow, consistency, composed, vla, or steered by DSRL)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (written atomically; must not exist, never the checkpoint)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="torch ONNX exporter")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    parser.add_argument(
        "--unrolled", type=int, default=0, metavar="K", help="also write unrolled.onnx with K sampler steps"
    )
    parser.add_argument(
        "--unrolled-sampler", default="", help="ddim or euler (default: the policy's sampler)"
    )
    parser.add_argument(
        "--samplers", default="", help="NAME:STEPS list checked for parity (default: the policy's + ddpm:N)"
    )
    parser.add_argument("--parity-obs", type=int, default=3, help="random observations in the parity check")
    parser.add_argument("--tol-step", type=float, default=1e-4, help="max-abs per denoiser step")
    parser.add_argument("--tol-chunk", type=float, default=1e-3, help="max-abs per chunk (normalized units)")
    parser.add_argument("--min-cosine", type=float, default=0.9999, help="min cosine per step and chunk")


def run_export(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: `vlaflow export --help` stays torch-free

    from vlaflow.policies.checkpoint import load_checkpoint

    check_destination(args.out, overwrite=args.overwrite, sources={"the checkpoint": args.checkpoint})
    torch.set_num_threads(1)
    opts = ExportOptions(
        opset=args.opset,
        exporter=args.exporter,
        unrolled_steps=args.unrolled,
        unrolled_sampler=args.unrolled_sampler,
        samplers=_parse_samplers(args.samplers),
        n_parity_obs=args.parity_obs,
        tol_step=args.tol_step,
        tol_chunk=args.tol_chunk,
        min_cosine=args.min_cosine,
    )
    if _is_world_model(args.checkpoint):
        return _export_world_model(args)
    policy = load_checkpoint(args.checkpoint)
    report = export_policy(policy, args.out, opts, source=str(args.checkpoint))
    print(f"exported {args.checkpoint} -> {args.out} ({opts.exporter}, opset {opts.opset})")
    for row in report["summary"]:
        print(
            f"  {row['what']:<24} max-abs {row['max_abs']:.2e}  min-cosine {row['min_cosine']:.7f}"
            f"  (tol {row['tol']:.0e})"
        )
    print(f"parity report: {Path(args.out) / PARITY}")
    return 0


def _is_world_model(checkpoint: str) -> bool:
    cfg = Path(checkpoint) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("format") == "vlaflow.world_model"


def _export_world_model(args: argparse.Namespace) -> int:
    """A world-model checkpoint (vlaflow train-wm): its per-step denoiser graph, parity-checked."""
    # here, not at the top (as load_checkpoint above): `vlaflow export --help` stays torch-free
    from vlaflow.world_models.checkpoint import load_world_model
    from vlaflow.world_models.export import export_world_model

    man = export_world_model(
        load_world_model(args.checkpoint),
        args.out,
        opset=args.opset,
        exporter=args.exporter,
        n_parity=args.parity_obs,
        tol_step=args.tol_step,
        tol_next=args.tol_chunk,
        min_cosine=args.min_cosine,
        overwrite=args.overwrite,
        source=str(args.checkpoint),
    )
    par = man["parity"]
    print(f"exported world model {args.checkpoint} -> {args.out} ({args.exporter}, opset {args.opset})")
    print(
        f"  denoiser step  max-abs {par['step_max_abs']:.2e}  min-cosine {par['step_min_cosine']:.7f}\n"
        f"  next state     max-abs {par['next_max_abs_normalized']:.2e} (normalized)  "
        f"min-cosine {par['next_min_cosine']:.7f}"
    )
    return 0
