"""One torch module -> one checked ONNX graph: the export step every vlaflow ONNX export shares (policies:
:mod:`vlaflow.deploy.export`; world models: :mod:`vlaflow.world_models.export`). torch / onnx are imported
inside the functions (optional heavy dependencies)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from vlaflow.errors import VlaflowError

EXPORTERS = ("dynamo", "torchscript")


def export_graph(
    module, args: tuple, path: Path, inputs: list[str], outputs: list[str], *, opset: int, exporter: str
) -> None:
    """``torch.onnx.export`` of ``module`` (eval mode) at ``args`` to ``path``, then :func:`check_graph`."""
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # A fresh wrapper module is in training mode, and the TorchScript exporter restores the mode it found
    # after exporting - recursively, onto the policy inside: random crops and dropout would then be on.
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs: dict[str, Any] = {"input_names": inputs, "output_names": outputs, "opset_version": opset}
        if exporter == "dynamo":
            kwargs.update(dynamo=True, external_data=False, verbose=False)
        else:
            kwargs.update(dynamo=False)
        try:
            torch.onnx.export(module, args, str(path), **kwargs)
        except Exception as e:
            raise VlaflowError(
                f"ONNX export of {path.name} failed with the {exporter} exporter: {type(e).__name__}: "
                f"{str(e)[:400]} (try --exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'})"
            ) from e
    check_graph(path, opset)


def graph_ops(path: str | os.PathLike) -> dict[str, int]:
    """Op type -> count over the graph and every nested subgraph."""
    import onnx

    counts: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    model = onnx.load(str(path))
    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_graph(path: Path, opset: int) -> None:
    """The exported graph is valid, at opset >= 17, and has no Loop/Scan (the sampler loop is the host's)."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if version < 17:
        raise VlaflowError(f"{path.name}: opset {version} < 17 (asked for {opset})")
    loops = {k: v for k, v in graph_ops(path).items() if k in ("Loop", "Scan", "If")}
    if loops:
        raise VlaflowError(
            f"{path.name}: the graph has control flow {loops}; the sampler loop belongs on the host"
        )
