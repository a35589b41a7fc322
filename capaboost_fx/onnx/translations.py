"""ONNX translations for ATen ops that torch.onnx lacks and Hugging Face models emit, passed to
``torch.onnx.export(custom_translation_table=...)``.

- transformers' own table (what its ONNX exporter passes): the MoE experts'
  ``transformers.grouped_mm_fallback`` / ``aten._grouped_mm`` (one MatMul per expert), ...
- ``aten._is_all_true`` (a multimodal model's input checks, e.g. LLaVA's image-token count):
  ``all(x)`` as ``ReduceMin`` over the input cast to int32.
"""

from __future__ import annotations

from typing import Any

import torch

_INT32, _BOOL = 6, 9  # onnx.TensorProto data types


def _aten_is_all_true(self: Any) -> Any:
    from onnxscript.onnx_opset import opset18 as op

    return op.Cast(op.ReduceMin(op.Cast(self, to=_INT32), keepdims=0), to=_BOOL)


def translation_table() -> dict[Any, Any]:
    """The table for ``custom_translation_table``: transformers' own (when installed and
    providing one) plus ours."""
    table: dict[Any, Any] = {}
    try:
        from transformers.exporters.exporter_onnx import _ONNX_TRANSLATION_TABLE

        table.update(_ONNX_TRANSLATION_TABLE)
    except ImportError:  # no transformers, or a version without the table
        pass
    table[torch.ops.aten._is_all_true.default] = _aten_is_all_true
    return table
