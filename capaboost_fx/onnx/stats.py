"""What an ONNX file holds, and two files side by side: the one implementation of both.

- `onnx_stats`: node count, operator histogram (``domain.Op`` outside the default domain),
  initializer count / shapes / bytes, file size, inputs and outputs — read without loading
  external weights.
- `compare_onnx` / `CompareReport`: two files' statistics; the same graph (operators, node
  count, multiset of initializer shapes) or the same up to initializers the exporter folded
  away in one of them (an all-zero bias dropped, identical ones merged: named, node by node);
  optionally their onnxruntime latency side by side (`measure_latency`), a difference inside
  the spread of the interleaved rounds called noise (`compare_latency`).

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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from capaboost_fx.errors import ExportError, InputError, OnnxFileNotFoundError
from capaboost_fx.onnx.runtime import open_session, synthesize_inputs
from capaboost_fx.onnx.timing import (
    LatencyComparison,
    LatencyStats,
    compare_latency,
    measure_latency,
)

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


def _op_name(node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _shape_key(t) -> str:
    return f"{_dtype_name(t.data_type)}[{','.join(str(d) for d in t.dims)}]"


@dataclass
class GraphMatch:
    """Two graphs node by node (`match_graphs`). `folded_in_base`: initializers of the other
    file that the base file's exporter folded away (an optional input the base node omits,
    such as an all-zero bias, or several identical initializers the base reads as one);
    `folded_in_other` the reverse; `differences`: what makes them different graphs (empty when
    they match up to those folded initializers)."""

    folded_in_base: list[str]
    folded_in_other: list[str]
    differences: list[str]


def _node_inputs(nb, no, ib, io, diffs: list[str]) -> tuple[list, list, list]:
    """Initializer inputs of aligned nodes: pairs read by both, and those only one side reads."""
    pairs, only_base, only_other = [], [], []
    for i, (x, y) in enumerate(zip(nb, no, strict=True)):
        if (x.domain, x.op_type) != (y.domain, y.op_type):
            diffs.append(f"node {i} is {_op_name(x)} in base, {_op_name(y)} in other")
            continue
        for j in range(max(len(x.input), len(y.input))):
            a = x.input[j] if j < len(x.input) else ""
            b = y.input[j] if j < len(y.input) else ""
            if a in ib and b in io:
                pairs.append((a, b))
            elif a in ib and not b:
                only_base.append(a)
            elif b in io and not a:
                only_other.append(b)
            elif a in ib or b in io:
                diffs.append(f"node {i} ({_op_name(x)}) input {j} is "
                             f"{'an initializer' if a in ib else 'computed'} in base, "
                             f"{'an initializer' if b in io else 'computed'} in other")
    return pairs, only_base, only_other


def match_graphs(base_model, other_model) -> GraphMatch:
    """Align two ONNX graphs node by node (same order, same operators) and account for their
    initializers: which differ only because one exporter folded constant ones away."""
    ib = {t.name: t for t in base_model.graph.initializer}
    io = {t.name: t for t in other_model.graph.initializer}
    nb, no = list(iter_nodes(base_model.graph)), list(iter_nodes(other_model.graph))
    if len(nb) != len(no):
        return GraphMatch([], [], [f"node count {len(nb)} in base, {len(no)} in other"])
    diffs: list[str] = []
    pairs, only_base, only_other = _node_inputs(nb, no, ib, io, diffs)
    to_other: dict[str, set[str]] = {}
    to_base: dict[str, set[str]] = {}
    for a, b in pairs:
        if _shape_key(ib[a]) != _shape_key(io[b]):
            diffs.append(f"initializer {a} is {_shape_key(ib[a])} in base, {b} is "
                         f"{_shape_key(io[b])} in other")
        to_other.setdefault(a, set()).add(b)
        to_base.setdefault(b, set()).add(a)
    folded_in_base = [b for b in dict.fromkeys(only_other) if b not in to_base]
    folded_in_other = [a for a in dict.fromkeys(only_base) if a not in to_other]
    for a, bs in to_other.items():  # the base reads one initializer where the other reads k
        if len(bs) > 1:
            if any(len(to_base[b]) > 1 for b in bs):
                diffs.append(f"initializers {a} and {sorted(bs)} are shared differently")
            folded_in_base += sorted(bs)[1:]
    for as_ in to_base.values():
        if len(as_) > 1 and all(len(to_other[a]) == 1 for a in as_):
            folded_in_other += sorted(as_)[1:]
    left_b = Counter(_shape_key(t) for t in ib.values())
    left_o = Counter(_shape_key(t) for t in io.values())
    left_b.subtract(_shape_key(ib[n]) for n in folded_in_other)
    left_o.subtract(_shape_key(io[n]) for n in folded_in_base)
    if +left_b != +left_o:
        diffs.append(f"initializer shapes beyond the folded ones: only in base "
                     f"{dict(left_b - left_o)}, only in other {dict(left_o - left_b)}")
    return GraphMatch(folded_in_base, folded_in_other, diffs[:8])


@dataclass
class CompareReport:
    """Two ONNX files side by side.

    `same_graph`: the same operators, node count and initializer shapes.
    `same_graph_up_to_folding`: `same_graph`, or the same operators node by node with
    initializers that differ only because one file's exporter folded constant ones away
    (`folded_in_base`: names in the other file the base lacks, e.g. a fresh model's all-zero
    bias the exporter dropped; `folded_in_other` the reverse). `graph_differences`: what else
    differs. `latency_comparison`: the difference of the medians and whether it is inside the
    spread of the interleaved rounds (noise). `graph_summary()` and `summary()` say it in words.
    """

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
    same_graph_up_to_folding: bool = False
    folded_in_base: list[str] = field(default_factory=list)
    folded_in_other: list[str] = field(default_factory=list)
    graph_differences: list[str] = field(default_factory=list)
    latency_comparison: LatencyComparison | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def graph_summary(self, base_label: str = "base", other_label: str = "other") -> str:
        """"same graph: yes (...)", "same graph up to N initializers the exporter folded away:
        <names> (...)" or "same graph: NO (...)", naming what "same" compared."""
        b, o = self.base, self.other
        same = (f"same operators ({sum(b.op_histogram.values())} nodes of "
                f"{len(b.op_histogram)} types), node count and initializer shapes")
        if self.same_graph:
            return f"same graph: yes ({same})"
        if self.same_graph_up_to_folding:
            folded = [(n, other_label, base_label) for n in self.folded_in_base]
            folded += [(n, base_label, other_label) for n in self.folded_in_other]
            names = ", ".join(f"{n} (in {kept}, folded away in {gone})" for n, kept, gone in folded)
            return (f"same graph up to {len(folded)} initializer{'s' if len(folded) != 1 else ''}"
                    f" the exporter folded away: {names}; otherwise same operators node by node"
                    " and the same initializer shapes")
        why = []
        if self.op_diff:
            why.append("operators differ (" + ", ".join(
                f"{op} {n:+d}" for op, n in self.op_diff.items()) + f" in {other_label})")
        if b.node_count != o.node_count:
            why.append(f"{b.node_count} nodes in {base_label}, {o.node_count} in {other_label}")
        for label, shapes in ((base_label, self.initializer_shapes_only_in_base),
                              (other_label, self.initializer_shapes_only_in_other)):
            if shapes:
                why.append(f"initializer shapes only in {label}: "
                           + ", ".join(f"{k} ×{v}" for k, v in shapes.items()))
        why += self.graph_differences[: 1 if why else 3]
        return "same graph: NO (" + "; ".join(why) + ")"

    def latency_summary(self, base_label: str = "base", other_label: str = "other") -> str:
        """E.g. "latency other vs base: +3.0 % (within the ±8.0 % spread of 20 interleaved
        rounds: noise)"; empty without latency."""
        if self.latency_comparison is None:
            return ""
        return f"latency {other_label} vs {base_label}: {self.latency_comparison.describe()}"

    def summary(self, base_label: str = "base", other_label: str = "other") -> str:
        """The graph verdict and, when timed, the latency verdict, one per line."""
        lines = [self.graph_summary(base_label, other_label),
                 self.latency_summary(base_label, other_label)]
        return "\n".join(line for line in lines if line) + "\n"

    def to_markdown(self, base_label: str = "base", other_label: str = "other") -> str:
        """A Markdown summary table, then the operator table and shape differences (one row
        per line, in the table's order: long, and flat on purpose)."""
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
        folded = len(self.folded_in_base) + len(self.folded_in_other)
        same = ("yes" if self.same_graph else f"up to {folded} folded initializer(s)"
                if self.same_graph_up_to_folding else "**no**")
        lines += [row("same graph", "", "", same), ""]
        lines += [f"- {line}" for line in self.summary(base_label, other_label).splitlines()]
        lines += [""]
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


def _match_folded(report: CompareReport, base_path, other_path) -> None:
    """Same operators and node count, other initializers: which did an exporter fold away?"""
    match = match_graphs(load_proto(base_path), load_proto(other_path))
    report.graph_differences = match.differences
    report.folded_in_base, report.folded_in_other = match.folded_in_base, match.folded_in_other
    report.same_graph_up_to_folding = not match.differences


def _time_both(sessions: dict[str, Any], inputs: Mapping[str, Any] | None, batch_size: int,
               seq_len: int, runs: int, warmup: int) -> dict[str, Any]:
    """`measure_latency` of both sessions in alternating order on the same inputs (`inputs`,
    or synthesised at batch_size x seq_len). Both files loaded, so a failure now is the
    inputs': an `InputError` saying how to pass ones the model accepts."""
    if inputs is not None:
        feeds = {key: dict(inputs) for key in sessions}
        for key, session in sessions.items():  # a size a file fixes: said as such
            session.check_feeds(feeds[key])
    else:
        feeds = {key: synthesize_inputs(s, batch_size=batch_size, seq_len=seq_len)
                 for key, s in sessions.items()}
    try:
        return measure_latency(sessions, feeds, runs=runs, warmup=warmup)
    except Exception as e:  # noqa: BLE001 - re-raised, as the caller's inputs to fix
        shapes = {k: list(getattr(v, "shape", ())) for k, v in feeds["base"].items()}
        raise InputError(
            f"the files cannot run the timing inputs {shapes} ({type(e).__name__}: "
            f"{str(e).strip()[:300]}). Pass seq_len= and batch_size= the model accepts "
            "(a decoder's position limit: config.max_position_embeddings), or inputs={...} "
            "by input name; latency=False compares the graphs only."
        ) from e


def compare_onnx(
    base_path: str | os.PathLike,
    other_path: str | os.PathLike,
    # Ten parameters: two files, then the latency measurement's settings (each defaulted, each
    # one knob of how the files are timed: rounds, inputs, providers, threads).
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

    "Same graph" compares operators, node count and the shapes of the initializers; where only
    initializers differ, the graphs are aligned node by node and initializers one exporter
    folded away (an all-zero bias dropped from a Gemm, identical constants merged into one) are
    named (`same_graph_up_to_folding`, `folded_in_base`, `folded_in_other`).

    Latency (`measure_latency`) runs the two sessions in alternating order, `runs` timed calls
    each after `warmup`, on inputs synthesised from the graph inputs (symbolic dim 0 ->
    `batch_size`, other symbolic dims -> `seq_len`; integer inputs are ones, floats seeded
    normal), or on `inputs` (by input name, numpy or torch) where the graph's symbolic dims
    cannot say what fits. `latency_comparison` (`compare_latency`) calls the difference of the
    medians noise when it is inside the spread of the per-round ratios (half their p10-p90
    range): rounds that disagree on which file is faster by that much say nothing.

    Example::

        rep = compare_onnx("base.onnx", "folded.onnx", runs=50)
        assert rep.same_graph_up_to_folding
        print(rep.summary("base", "folded"))   # same graph ..., latency ...: noise or not
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
    report.same_graph_up_to_folding = report.same_graph
    if not report.same_graph and not op_diff and b.node_count == o.node_count:
        _match_folded(report, base_path, other_path)
    if latency:
        sessions = {key: open_session(p, providers=providers,
                                      intra_op_num_threads=intra_op_num_threads)
                    for key, p in (("base", base_path), ("other", other_path))}
        timed = _time_both(sessions, inputs, batch_size, seq_len, runs, warmup)
        report.latency_base, report.latency_other = timed["base"], timed["other"]
        report.latency_comparison = compare_latency(timed["base"], timed["other"])
        report.batch_size, report.seq_len = batch_size, seq_len
    return report
