"""Deprecated: the ONNX tools live in `capaboost_fx.onnx` now.

``capaboost_fx.onnx_export.export_onnx`` (and every other name here) still works and warns
with a DeprecationWarning; import from ``capaboost_fx.onnx`` (or ``capaboost_fx``) instead:

    from capaboost_fx.onnx import export_onnx, verify_onnx, compare_onnx, onnx_stats
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOME = {
    "CompareReport": "stats",
    "OnnxStats": "stats",
    "compare_onnx": "stats",
    "onnx_stats": "stats",
    "ExportReport": "export",
    "export_onnx": "export",
    "EXTERNAL_DATA_THRESHOLD": "optimize",
    "optimize_transformer": "optimize",
    "VerifyResult": "verify",
    "verify_onnx": "verify",
    "DEFAULT_RTOL": "verify",
    "DEFAULT_ATOL": "verify",
    "LatencyStats": "runtime",
    "auto_dynamic_shapes": "shapes",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = f"capaboost_fx.onnx.{_HOME[name]}"
    warnings.warn(
        f"capaboost_fx.onnx_export.{name} is deprecated; use {home}.{name} "
        f"(also exported by capaboost_fx.onnx)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return __all__
