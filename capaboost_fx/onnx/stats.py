"""What an ONNX file holds, and two files side by side: the one implementation of both.

- `onnx_stats`: node count, operator histogram (``domain.Op`` outside the default domain),
  initializer count / shapes / bytes, file size, inputs and outputs — read without loading
  external weights.
- `compare_onnx` / `CompareReport`: two files' statistics, whether they are the same graph
  (same operators, node count and multiset of initializer shapes) and, optionally, their
  onnxruntime latency measured side by side with `measure_latency`.

Example::

    from capaboost_fx.onnx import compare_onnx, onnx_stats
    onnx_stats("model.onnx").op_histogram.get("com.microsoft.Attention", 0)
    print(compare_onnx("base.onnx", "folded.onnx").to_markdown("base", "folded"))
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from capaboost_fx.errors import ExportError, InputError, OnnxFileNotFoundError
from capaboost_fx.onnx.runtime import LatencyStats, measure_latency, open_session, synthesize_inputs

__all__ = ["CompareReport", "OnnxStats", "compare_onnx", "onnx_stats"]


@dataclass
class OnnxStats:
    """What an ONNX file holds, read without loading its weights."""

    path: str
    opset: int
    node_count: int
    op_histogram: dict[str, int]
    initializer_count: int
    initializer_bytes: int
    initializer_shapes: dict[str, int]  # "float32[32,64]" -> how many initializers have it
    file_bytes: int  # the .onnx file plus its external data files
    external_data: list[str]  # external data file names (relative to the model), if any
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_proto(path: str | os.PathLike):
    import onnx

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxFileNotFoundError(
            f"ONNX file not found: {path}; check the path (export it first with capaboost_fx.export_onnx)."
        )
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ExportError(f"{path} is not a readable ONNX model: {e}") from e


def iter_nodes(graph) -> Iterator[Any]:
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop/Scan bodies are part of the architecture too
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def _dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_info(v) -> dict[str, Any]:
    t = v.type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
    return {"name": v.name, "dtype": _dtype_name(t.elem_type), "shape": dims}


def external_locations(model) -> list[str]:
    import onnx

    locations = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location" and kv.value not in locations:
                    locations.append(kv.value)
    return locations


def onnx_stats(path: str | os.PathLike) -> OnnxStats:
    """Node count, operator histogram, initializers and size of an ONNX file.

    Operators outside the default domain are named ``domain.Op`` (``com.microsoft.Attention``).
    Weights stored as external data are counted from their shapes, never read.

    Example::

        s = onnx_stats("model.onnx")
        s.node_count, s.op_histogram.get("MatMul", 0), s.initializer_bytes
    """
    import onnx

    model = load_proto(path)
    ops: Counter[str] = Counter()
    count = 0
    for node in iter_nodes(model.graph):
        ops[
            f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        ] += 1
        count += 1
    shapes: Counter[str] = Counter()
    nbytes = 0
    for t in model.graph.initializer:
        dtype = _dtype_name(t.data_type)
        shapes[f"{dtype}[{','.join(str(d) for d in t.dims)}]"] += 1
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):  # strings and exotic types: size unknown
            itemsize = 0
        nbytes += math.prod(t.dims) * itemsize
    locations = external_locations(model)
    folder = os.path.dirname(os.fspath(path))
    size = os.path.getsize(path) + sum(
        os.path.getsize(os.path.join(folder, loc))
        for loc in locations
        if os.path.isfile(os.path.join(folder, loc))
    )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxStats(
        path=os.fspath(path),
        opset=int(opset),
        node_count=count,
        op_histogram=dict(sorted(ops.items())),
        initializer_count=len(model.graph.initializer),
        initializer_bytes=int(nbytes),
        initializer_shapes=dict(sorted(shapes.items())),
        file_bytes=int(size),
        external_data=locations,
        inputs=[_value_info(v) for v in model.graph.input],
        outputs=[_value_info(v) for v in model.graph.output],
    )


@dataclass
class CompareReport:
    """Two ONNX files side by side. `same_graph`: same ops, node count and initializer shapes."""

    base: OnnxStats
    other: OnnxStats
    op_diff: dict[str, int]  # other - base, non-zero entries only
    initializer_shapes_only_in_base: dict[str, int]
    initializer_shapes_only_in_other: dict[str, int]
    same_graph: bool
    latency_base: LatencyStats | None = None
    latency_other: LatencyStats | None = None
    batch_size: int | None = None
    seq_len: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self, base_label: str = "base", other_label: str = "other") -> str:
        """A Markdown summary table, then the operator table and shape differences."""
        b, o = self.base, self.other

        def row(what: str, x: Any, y: Any, diff: Any = "") -> str:
            return f"| {what} | {x} | {y} | {diff} |"

        lines = [
            f"| | {base_label} | {other_label} | diff |",
            "| --- | ---: | ---: | ---: |",
            row("file", os.path.basename(b.path), os.path.basename(o.path)),
            row("nodes", b.node_count, o.node_count, o.node_count - b.node_count),
            row("operator types", len(b.op_histogram), len(o.op_histogram)),
            row(
                "initializers",
                b.initializer_count,
                o.initializer_count,
                o.initializer_count - b.initializer_count,
            ),
            row(
                "initializer bytes",
                f"{b.initializer_bytes:,}",
                f"{o.initializer_bytes:,}",
                f"{o.initializer_bytes - b.initializer_bytes:+,}",
            ),
            row(
                "file bytes",
                f"{b.file_bytes:,}",
                f"{o.file_bytes:,}",
                f"{o.file_bytes - b.file_bytes:+,}",
            ),
        ]
        lb, lo = self.latency_base, self.latency_other
        if lb and lo:
            lines += [
                row(
                    f"latency median ms (batch {self.batch_size}, seq {self.seq_len})",
                    f"{lb.median_ms:.3f}",
                    f"{lo.median_ms:.3f}",
                    f"{(lo.median_ms / lb.median_ms - 1) * 100:+.1f}%" if lb.median_ms else "",
                ),
                row(
                    "latency p10-p90 ms",
                    f"{lb.p10_ms:.3f}-{lb.p90_ms:.3f}",
                    f"{lo.p10_ms:.3f}-{lo.p90_ms:.3f}",
                ),
                row(
                    "runs / provider",
                    f"{lb.runs} / {','.join(lb.providers)}",
                    f"{lo.runs} / {','.join(lo.providers)}",
                ),
            ]
        lines += [row("same graph", "", "", "yes" if self.same_graph else "**no**"), ""]
        ops = sorted(set(b.op_histogram) | set(o.op_histogram))
        lines += [
            f"| operator | {base_label} | {other_label} | diff |",
            "| --- | ---: | ---: | ---: |",
        ]
        for op in ops:
            x, y = b.op_histogram.get(op, 0), o.op_histogram.get(op, 0)
            lines.append(row(op, x, y, f"{y - x:+d}" if y != x else ""))
        if self.initializer_shapes_only_in_base or self.initializer_shapes_only_in_other:
            lines += ["", "initializer shapes that differ (shape: count):"]
            for label, shapes in (
                (f"only in {base_label}", self.initializer_shapes_only_in_base),
                (f"only in {other_label}", self.initializer_shapes_only_in_other),
            ):
                if shapes:
                    lines.append(f"- {label}: " + ", ".join(f"{s}: {n}" for s, n in shapes.items()))
        return "\n".join(lines) + "\n"


def compare_onnx(
    base_path: str | os.PathLike,
    other_path: str | os.PathLike,
    latency: bool = True,
    runs: int = 30,
    warmup: int = 3,
    batch_size: int = 1,
    seq_len: int = 128,
    providers: str | Sequence[str] = "auto",
    intra_op_num_threads: int | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> CompareReport:
    """Compare two ONNX files: graph structure, weights' shapes, size and onnxruntime latency.

    Latency (`measure_latency`) runs the two sessions in alternating order, `runs` timed calls
    each after `warmup`, on inputs synthesised from the graph inputs (symbolic dim 0 ->
    `batch_size`, other symbolic dims -> `seq_len`; integer inputs are ones, floats seeded
    normal), or on `inputs` (by input name, numpy or torch) where the graph's symbolic dims
    cannot say what fits.

    Example::

        rep = compare_onnx("base.onnx", "folded.onnx", runs=50)
        assert rep.same_graph
        print(rep.to_markdown("base", "CapaBoost folded"))
    """
    if runs < 1:
        raise InputError(f"runs={runs}; need at least 1 timed run")
    b, o = onnx_stats(base_path), onnx_stats(other_path)
    ops = set(b.op_histogram) | set(o.op_histogram)
    op_diff = {
        op: o.op_histogram.get(op, 0) - b.op_histogram.get(op, 0)
        for op in sorted(ops)
        if o.op_histogram.get(op, 0) != b.op_histogram.get(op, 0)
    }
    sb, so = Counter(b.initializer_shapes), Counter(o.initializer_shapes)
    report = CompareReport(
        base=b,
        other=o,
        op_diff=op_diff,
        initializer_shapes_only_in_base=dict(sorted((sb - so).items())),
        initializer_shapes_only_in_other=dict(sorted((so - sb).items())),
        same_graph=not op_diff and b.node_count == o.node_count and sb == so,
    )
    if latency:
        sessions = [
            open_session(p, providers=providers, intra_op_num_threads=intra_op_num_threads)
            for p in (base_path, other_path)
        ]
        if inputs is not None:
            feeds = {"base": dict(inputs), "other": dict(inputs)}
        else:
            feeds = {
                key: synthesize_inputs(s, batch_size=batch_size, seq_len=seq_len)
                for key, s in zip(("base", "other"), sessions, strict=True)
            }
        timed = measure_latency(
            {"base": sessions[0], "other": sessions[1]}, feeds, runs=runs, warmup=warmup
        )
        report.latency_base, report.latency_other = timed["base"], timed["other"]
        report.batch_size, report.seq_len = batch_size, seq_len
    return report
