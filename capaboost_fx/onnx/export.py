"""`export_onnx`: the public entry. One deploy file per fine-tune goes through the pipeline
(`capaboost_fx.onnx.pipeline`: make → check → choose → commit); ``multi_lora=True`` writes one
base for many fine-tunes (`capaboost_fx.onnx.multi_lora`), which uses the same pipeline.

Example (``cbx`` is ``capaboost_fx``)::

    rep = cbx.export_onnx(cbx.fold(train_model), "model.onnx", example_kwargs=batch)
    rep.fusions          # {"attention": 6, "bias_gelu": 6, "skip_layer_normalization": 12, ...}
    rep.input_shapes     # {"input_ids": ["batch", "sequence"], ...}
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from capaboost_fx.onnx.multi_lora import export_multi_lora
from capaboost_fx.onnx.pipeline import (
    EXTERNAL_DATA_THRESHOLD,
    ExportOptions,
    ExportReport,
    export_file,
)

__all__ = ["EXTERNAL_DATA_THRESHOLD", "ExportOptions", "ExportReport", "export_onnx"]


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = (),
    example_kwargs: Any = None,
    *,
    dynamic_shapes: Any = None,
    options: ExportOptions | None = None,
    **option_fields: Any,
) -> ExportReport:
    """Export `module` to an ONNX file at `path`, optimized, checked and verified before it lands.

    Args:
        module: the deploy module (`fold`'s result, or any ``torch.export(...).module()``), or any
            eager ``nn.Module`` (run in eval mode for the export, its mode restored after).
        path: the .onnx file to write. Written atomically: an existing file stays untouched if
            anything fails, and no temporary files are left behind.
        example_inputs: positional inputs, as the module's forward takes them.
        example_kwargs: keyword inputs; tensor-free ones (``use_cache=False``) are fixed in
            the graph, not inputs of the file.
        dynamic_shapes: as for ``torch.export``. Default: what a captured graph leaves dynamic
            (a capaboost_fx module's own graph, a ``torch.export`` module's placeholders), or
            for an eager module ``Dim.AUTO`` on batch and sequence dims, torch.export keeping
            static what the model fixes. The file names the dims ``batch`` (shared by all
            inputs) and ``sequence``.
        options: an `ExportOptions` (optimize, quantize, verify, tolerances, opset, names,
            external data, providers, timing session).
        **option_fields: any `ExportOptions` field by name, replacing that of `options`
            (``optimize="none"``, ``quantize="int8"``, ``verify=False``, ...).

    Returns:
        An `ExportReport`: the file's inputs, outputs, nodes, fusions and sizes, and how well
        onnxruntime matched PyTorch.

    Example::

        deploy = torch.export.export(model.eval(), (ids,), strict=False).module()
        rep = export_onnx(deploy, "model.onnx", example_inputs=(ids,))
        rep.max_abs_diff < 1e-4, rep.op_histogram, rep.fusions
    """
    opts = ExportOptions.of(options, option_fields)
    if opts.multi_lora:  # one base, adapters switched per run: its own module
        if opts.optimize == "auto":  # its adapters are found in the dynamo exporter's graph
            opts = dataclasses.replace(opts, optimize="ort")
        return export_multi_lora(module, path, example_inputs, example_kwargs,
                                 dynamic_shapes=dynamic_shapes, options=opts)
    return export_file(module, path, example_inputs, example_kwargs,
                       dynamic_shapes=dynamic_shapes, options=opts)
