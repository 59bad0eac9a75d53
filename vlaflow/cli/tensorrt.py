"""``python -m vlaflow.cli.tensorrt EXPORT_DIR [--fp16] [--workspace-mb 1024]``: TensorRT engines for a
``vlaflow export`` directory (:func:`vlaflow.deploy.tensorrt_engine.build_engines`).

Not a ``vlaflow`` sub-command: it only runs on machines with TensorRT (see that module's docstring).
"""

from __future__ import annotations

import argparse
import sys

from vlaflow.deploy.tensorrt_engine import build_engines
from vlaflow.errors import VlaflowError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build TensorRT engines for a `vlaflow export` directory.")
    ap.add_argument("export_dir")
    ap.add_argument("--fp16", action="store_true", help="allow FP16 kernels (re-check accuracy)")
    ap.add_argument("--workspace-mb", type=int, default=1024)
    args = ap.parse_args(argv)
    try:
        built = build_engines(args.export_dir, fp16=args.fp16, workspace_mb=args.workspace_mb)
    except VlaflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"built {built} in {args.export_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
