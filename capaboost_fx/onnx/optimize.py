"""Graph optimizations applied to an exported model: onnxruntime fusions and int8 quantization.

- `fuse_for_ort`: ``onnxscript.rewriter.ort_fusions.optimize_for_ort`` on the dynamo exporter's
  graph: SDPA -> MultiHeadAttention -> Attention, SkipLayerNormalization, BiasGelu, rotary
  embeddings, ... (onnxruntime contrib operators). `export_onnx` applies it by default.
- `quantize_int8`: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations
  quantized at run time): MatMul -> MatMulInteger / DynamicQuantizeLinear.
- `ort_optimizer`: ``onnxruntime.transformers.optimizer`` for the TorchScript exporter's graphs
  (on dynamo-exported graphs it misses Attention, which `fuse_for_ort` finds).

Example::

    from capaboost_fx.onnx import export_onnx
    export_onnx(deploy, "model.onnx", example_kwargs=batch)                     # fused
    export_onnx(deploy, "model.int8.onnx", example_kwargs=batch, quantize="int8")
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

from capaboost_fx.errors import (
    ExportError,
    InputError,
    MissingDependencyError,
)
from capaboost_fx.onnx.stats import onnx_stats

# Weights above this go to an external data file next to the model. Protobuf cannot serialise a
# message over 2 GiB; torch's exporter switches at the same 1.5 GiB to leave room for the graph.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024

OPTIMIZE = ("auto", "ort", "none", "fastest", "torchscript", "torchscript+ort")
QUANTIZE = (None, "int8")

__all__ = ["OPTIMIZE", "QUANTIZE", "fuse_for_ort", "quantize_int8"]


def check_options(optimize: Any, quantize: Any) -> tuple[str, str | None]:
    """Normalise `optimize` / `quantize` of `export_onnx` (True -> "ort", False -> "none")."""
    if optimize is True:
        optimize = "ort"
    elif optimize is False or optimize is None:
        optimize = "none"
    if optimize not in OPTIMIZE:
        raise InputError(f"optimize={optimize!r}; use one of {list(OPTIMIZE)}")
    if quantize in ("none", False):
        quantize = None
    if quantize not in QUANTIZE:
        raise InputError(f"quantize={quantize!r}; use None or 'int8'")
    return optimize, quantize


def fuse_for_ort(model: Any) -> tuple[Any, dict[str, int]]:
    """Apply onnxruntime's fusions to an ``onnx_ir.Model`` in place; return it and what fused.

    The counts are per rewrite rule, non-zero ones only (``{"attention": 2,
    "skip_layer_normalization": 4, "bias_gelu": 2, ...}``). A base model and its fold must give
    the same counts: the fold changes weights, never the graph.

    Example::

        program = torch.onnx.export(model, (ids,), dynamo=True)
        model, fused = fuse_for_ort(program.model)
    """
    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"onnxscript's ort_fusions are not available ({e}); pip install 'onnxscript>=0.5' "
            "or export with optimize='none'"
        ) from e
    with quiet_loggers("onnxscript", "onnx_ir"):
        fused, counts = optimize_for_ort(model)
    _gemm_on_rank2(fused.graph)
    return fused, {k: int(v) for k, v in counts.items() if v}


def _gemm_on_rank2(graph: Any) -> int:
    """Turn a ``Gemm`` whose first input is not a matrix back into ``MatMul`` + ``Add``.

    A linear layer written as ``addmm`` on a flattened view (GPT-2's ``Conv1D``) exports as
    Reshape(2-D) -> Gemm -> Reshape; the attention fusion replaces the attention block
    including that first Reshape, so the Gemm receives the 3-D attention output, which
    onnxruntime refuses to load ("Gemm: Input 0 expected to have rank 2"). The fused node's
    output keeps the 2-D shape recorded before fusion, so the test is: a Gemm fed by a fused
    (non-ONNX-domain) operator, or by a value recorded with another rank. MatMul broadcasts
    over leading dims and the Reshape after it restores the layout, so the result is the same
    (`export_onnx` verifies it against PyTorch)."""
    import onnx_ir as ir

    fixed = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = node.inputs[0], node.inputs[1]
        attrs = {k: v.value for k, v in node.attributes.items()}
        if a is None or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0:
            continue
        producer = a.producer()
        fused_input = producer is not None and producer.domain not in ("", "ai.onnx")
        if not fused_input and (a.shape is None or len(a.shape) == 2):
            continue
        if fused_input:
            a.shape = None  # the stale 2-D record: onnxruntime infers the fused op's shape
        new = []
        if attrs.get("transB", 0):
            new.append(ir.node("Transpose", [b], attributes={"perm": [1, 0]}))
            b = new[-1].outputs[0]
        new.append(ir.node("MatMul", [a, b]))
        out = new[-1].outputs[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            new.append(ir.node("Add", [out, node.inputs[2]]))
            out = new[-1].outputs[0]
        out.name, out.dtype = node.outputs[0].name, node.outputs[0].dtype
        graph.insert_before(node, new)
        ir.convenience.replace_all_uses_with(node.outputs[0], out)
        if node.outputs[0] in graph.outputs:
            graph.outputs[graph.outputs.index(node.outputs[0])] = out
        graph.remove(node, safe=True)
        fixed += 1
    return fixed


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def quantize_int8(
    src: str | os.PathLike, dst: str | os.PathLike, external_data: bool = False
) -> dict[str, int]:
    """Dynamically quantize `src` to int8 weights (``quantize_dynamic``), write `dst`.

    Weights of MatMul/Gemm (and embedding Gathers) become int8 with one scale per tensor;
    activations are quantized at run time. Returns the quantized operators of the result
    (``{"MatMulInteger": 8, "DynamicQuantizeLinear": 8, ...}``). With `external_data`, weights
    go to ``<dst name>.data``.

    Example::

        quantize_int8("model.onnx", "model.int8.onnx")
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(f"onnxruntime.quantization is not available: {e}") from e
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)  # quantize_dynamic logs this on the root logger for every model
    try:
        quantize_dynamic(
            os.fspath(src),
            os.fspath(dst),
            weight_type=QuantType.QInt8,
            use_external_data_format=external_data,
        )
    except Exception as e:
        raise ExportError(f"int8 quantization of {src} failed: {type(e).__name__}: {e}") from e
    finally:
        root.removeFilter(hint)
    ops = onnx_stats(dst).op_histogram
    quantized = ("Integer", "Quantize", "Dequantize", "QAttention", "QGemm")
    return {op: n for op, n in ops.items() if any(q in op for q in quantized)}


def ort_optimizer() -> tuple[dict, Any]:
    """``(MODEL_TYPES, optimize_model)`` of ``onnxruntime.transformers.optimizer``, or
    `MissingDependencyError`. Its modules import each other as top-level modules from their
    own folder, so that folder is on ``sys.path`` while they import and run, and only then."""
    import sys

    try:
        import onnxruntime.transformers as ort_transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(f"onnxruntime.transformers is not available: {e}") from e
    folder = os.path.dirname(ort_transformers.__file__)

    @contextlib.contextmanager
    def on_path() -> Iterator[None]:
        added = folder not in sys.path
        if added:
            sys.path.append(folder)
        try:
            yield
        finally:
            if added and folder in sys.path:
                sys.path.remove(folder)

    with on_path():
        from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    @functools.wraps(optimize_model)
    def optimize(*args: Any, **kwargs: Any) -> Any:
        with on_path():
            return optimize_model(*args, **kwargs)

    return MODEL_TYPES, optimize
