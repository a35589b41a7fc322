"""Deprecated: onnxruntime sessions live in `capaboost_fx.onnx.runtime` now.

``capaboost_fx.runtime.open_session`` (and every other name here) still works and warns with a
DeprecationWarning; import from ``capaboost_fx.onnx`` instead:

    from capaboost_fx.onnx import open_session, measure_latency
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = sorted(importlib.import_module("capaboost_fx.onnx.runtime").__all__)


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"capaboost_fx.runtime.{name} is deprecated; use capaboost_fx.onnx.runtime.{name} "
        "(also exported by capaboost_fx.onnx)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module("capaboost_fx.onnx.runtime"), name)


def __dir__() -> list[str]:
    return __all__
