"""TensorRT engines from a ``vlaflow export`` directory, for machines with TensorRT (Jetson, x86 + NVIDIA).

    python -m vlaflow.cli.tensorrt EXPORT_DIR [--fp16] [--workspace-mb 1024]
    # -> EXPORT_DIR/encoder.plan, EXPORT_DIR/denoiser.plan (+ unrolled.plan); manifest["tensorrt"] lists them

TensorRT cannot be installed on the development machines (no NVIDIA driver), so this module imports
``tensorrt`` only inside :func:`build_engines` and raises a :class:`~vlaflow.errors.VlaflowError` naming the
package to install when it is missing; nothing else in vlaflow depends on it. The engines are built from
the same ONNX graphs the parity check validated (static batch 1, shapes fixed at export), so their inputs
and outputs have the manifest's names. Two ways to run on TensorRT:

1. Without this module: ``OnnxPolicy(DIR, providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])``
   lets onnxruntime-gpu build and cache the engines itself (needs onnxruntime-gpu built with TensorRT).
2. With this module: prebuilt ``.plan`` files for a C++/Python TensorRT runtime on the robot (deserialize
   with ``trt.Runtime(logger).deserialize_cuda_engine(open(plan, "rb").read())``); the host-side sampler
   loop stays the numpy one in :mod:`vlaflow.deploy.np_sampling`.

FP16 (``--fp16``) roughly halves the denoiser's latency on tensor cores, but its error is far above the
export's float32 parity thresholds: re-check a chunk's error against the ONNX runtime before deploying it.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlaflow.errors import VlaflowError

GRAPHS = ("encoder", "denoiser", "unrolled", "noise_actor")  # noise_actor: a steered (DSRL) export


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise VlaflowError(
            "building TensorRT engines needs the `tensorrt` Python package and an NVIDIA GPU with its driver "
            "(pip install tensorrt, or JetPack on a Jetson); it is not installed here. Without it, run the "
            "ONNX graphs with onnxruntime's CUDA or TensorRT execution provider instead "
            "(OnnxPolicy(DIR, providers=['cuda']))"
        ) from e
    return trt


def build_engine(onnx_path: Path, plan_path: Path, fp16: bool = False, workspace_mb: int = 1024) -> Path:
    """Parse one ONNX graph and serialize a TensorRT engine for it to ``plan_path``."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT >= 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VlaflowError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise VlaflowError("--fp16 asked for, but this GPU has no fast FP16")
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VlaflowError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    return plan_path


def build_engines(export_dir: str | Path, fp16: bool = False, workspace_mb: int = 1024) -> dict[str, str]:
    """Engines for every graph of an export; recorded in its manifest under ``"tensorrt"``."""
    from vlaflow.deploy.onnx_runtime import MANIFEST, read_manifest

    d = Path(export_dir)
    manifest = read_manifest(d)
    trt = _import_tensorrt()
    built = {}
    composition = manifest.get("composition")
    if composition:  # a GPC composite: its graphs live in one complete export per parent
        for i, parent in enumerate(composition["parents"]):
            sub = build_engines(d / parent["dir"], fp16=fp16, workspace_mb=workspace_mb)
            built.update({f"parents/{i}/{k}": f"{parent['dir']}/{v}" for k, v in sub.items()})
    for name in GRAPHS:
        g = manifest["graphs"].get(name)
        if g is None:
            continue
        plan = d / f"{name}.plan"
        build_engine(d / g["file"], plan, fp16=fp16, workspace_mb=workspace_mb)
        built[name] = plan.name
    manifest["tensorrt"] = {"engines": built, "fp16": fp16, "tensorrt_version": trt.__version__}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return built
