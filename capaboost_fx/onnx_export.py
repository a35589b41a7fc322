"""Export a (folded) model to ONNX, prove the file computes what PyTorch computes, compare files.

The fold leaves a model with exactly the base architecture, so its ONNX graph must equal the base
model's graph op for op, with other weights. This module makes that checkable:

- `export_onnx` runs ``torch.onnx.export(..., dynamo=True)`` (the torch.export based exporter) with
  dynamic batch and sequence dims, checks the file with ``onnx.checker``, runs it in onnxruntime
  on the example inputs *and* on a second input of another batch size and sequence length, and
  only then moves it onto `path` (atomically; external weight data included).
- `verify_onnx` is that comparison on its own: ONNX in onnxruntime vs the module in PyTorch.
- `compare_onnx` puts two files side by side: node count, operator histogram, initializer
  shapes, size and onnxruntime latency; `same_graph` says whether the graphs are the same
  architecture (same ops, same node count, same multiset of initializer shapes).
- `optimize_transformer` applies onnxruntime's transformer fusions and returns the fused ops.

Example::

    import torch
    from capaboost_fx.onnx_export import export_onnx, compare_onnx

    deploy = torch.export.export(model.eval(), (ids,), strict=False).module()  # or cbx.fold(...)
    report = export_onnx(deploy, "folded.onnx", example_inputs=(ids,))
    report.max_abs_diff, report.op_histogram["MatMul"]
    print(compare_onnx("base.onnx", "folded.onnx").to_markdown())
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from capaboost_fx.errors import (
    ExportError,
    InputError,
    OnnxFileNotFoundError,
    VerificationError,
)
from capaboost_fx.runtime import Session, open_session, synthesize_inputs

logger = logging.getLogger(__name__)

# Weights above this go to an external data file next to the model. Protobuf cannot serialise a
# message over 2 GiB; torch's exporter switches at the same 1.5 GiB to leave room for the graph.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4

__all__ = [
    "CompareReport",
    "ExportReport",
    "LatencyStats",
    "OnnxStats",
    "VerifyResult",
    "auto_dynamic_shapes",
    "compare_onnx",
    "export_onnx",
    "onnx_stats",
    "optimize_transformer",
    "verify_onnx",
]


# --------------------------------------------------------------------------- statistics


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


def _load_proto(path: str | os.PathLike):
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


def _iter_nodes(graph) -> Iterator[Any]:
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop/Scan bodies are part of the architecture too
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


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


def _external_locations(model) -> list[str]:
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

    model = _load_proto(path)
    ops: Counter[str] = Counter()
    count = 0
    for node in _iter_nodes(model.graph):
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
    locations = _external_locations(model)
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


# --------------------------------------------------------------------------- inputs/outputs


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}"
        )
    return example_inputs


def _flat_tensors(args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    # The exporter's graph inputs are the tensor leaves of (args, kwargs) in this order (kwargs in
    # the order given, not the signature's): measured on torch 2.13.
    return [x for x in pytree.tree_leaves((args, dict(kwargs))) if isinstance(x, torch.Tensor)]


def _name_of(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "_".join(parts)


def _output_names(output: Any) -> list[str]:
    """Readable names for the tensor leaves of a model output: logits, hidden_states_0, output_1."""
    leaves, _ = pytree.tree_flatten_with_path(output)
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = _name_of(path)
        if not name:
            name = "output"
        elif name[0].isdigit():  # a plain tuple/list output
            name = f"output_{name}"
        base, k = name, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _flat_outputs(output: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def _dims_for(t: torch.Tensor) -> dict[int, Any] | None:
    # Measured on torch 2.13: Dim.AUTO does NOT always pin a dim that the weights fix (a Linear's
    # feature dim, a conv's channels stay symbolic in the ONNX file and fail only at run time),
    # so we only mark dims that are batch or sequence by convention.
    auto = torch.export.Dim.AUTO
    if t.ndim == 0:
        return None
    if t.ndim == 1:
        return {0: auto}
    if t.ndim == 2 and (t.dtype.is_floating_point or t.dtype.is_complex):
        return {0: auto}  # (batch, features)
    if t.ndim <= 3:  # (batch, seq) ids/masks, (batch, seq, hidden) embeddings
        return {0: auto, 1: auto}
    return {0: auto}  # (batch, channels, height, width)


def auto_dynamic_shapes(
    module: nn.Module,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    batch_only: bool = False,
) -> dict[str, Any]:
    """`dynamic_shapes` for `torch.export`: batch (dim 0) and sequence (dim 1) dims left dynamic.

    Dynamic: dim 0 of every tensor; also dim 1 of integer/bool tensors with 2 dims (token ids,
    masks) and of tensors with 3 dims (embeddings). Float (batch, features) and images
    (batch, channels, height, width) keep their other dims static. ``Dim.AUTO`` lets
    torch.export keep a dim static where the model needs it. `batch_only`: dim 0 alone. Pass
    your own `dynamic_shapes` to `export_onnx` for anything else.

    Example::

        >>> class M(torch.nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids
        >>> ids = torch.ones(2, 8, dtype=torch.long)
        >>> sorted(auto_dynamic_shapes(M(), (ids,), {"attention_mask": ids}))
        ['attention_mask', 'input_ids']
    """
    args = _as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"example inputs do not fit {type(module).__name__}.forward: {e}") from e

    def dims(x: Any) -> dict[int, Any] | None:
        if not isinstance(x, torch.Tensor):
            return None
        d = _dims_for(x)
        return {0: d[0]} if d and batch_only else d

    return {name: pytree.tree_map(dims, value) for name, value in bound.arguments.items()}


def _runs_resized(module: nn.Module, args: tuple, kwargs: dict, batch_only: bool) -> bool:
    """Does `module` run with the example resized along the dims auto_dynamic_shapes marks?"""
    flat, spec = pytree.tree_flatten((args, kwargs))
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor):
            dims = [d for d in (_dims_for(x) or {}) if d == 0 or not batch_only]
            flat[i] = _resize(x, {d: _new_size(x.shape[d], d == 0) for d in dims})
    a, k = pytree.tree_unflatten(flat, spec)
    try:
        module(*a, **k)
    except Exception:
        return False
    return True


def _choose_dynamic_shapes(
    module: nn.Module, args: tuple, kwargs: dict
) -> tuple[dict[str, Any] | None, str]:
    # A module captured by torch.export without dynamic shapes guards on the example's shapes,
    # but the ONNX exporter drops those guards: its file would claim dynamic dims and then fail
    # (measured: BERT stand-in, onnxruntime error at batch 3). Probe the module first and only
    # mark dims it accepts.
    with _eval_mode(module), torch.no_grad():
        if _runs_resized(module, args, kwargs, batch_only=False):
            return auto_dynamic_shapes(module, args, kwargs), "auto"
        if _runs_resized(module, args, kwargs, batch_only=True):
            return auto_dynamic_shapes(module, args, kwargs, batch_only=True), "auto (batch only)"
    warnings.warn(
        f"{type(module).__name__} runs only at the example's input shapes (e.g. a torch.export "
        "capture without dynamic_shapes); exporting a static ONNX graph. Capture it with "
        "dynamic batch/sequence dims, or pass dynamic_shapes.",
        stacklevel=3,
    )
    return None, "static (the module runs only at the example's shapes)"


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode and give it back in the mode it came in.

    A graph from `torch.export` has its mode baked in and refuses `.eval()`; it is left alone.
    """
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
    except NotImplementedError:
        pass
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporter's progress chatter and third-party deprecation noise out of the log.

    Errors still propagate as exceptions; only warnings and log records below ERROR are hidden.
    """
    names = ["torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch.fx"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # A torch.export graph has no real train/eval switch; the exporter warns for it anyway.
        warnings.filterwarnings("ignore", message=".*training mode.*", category=UserWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


# --------------------------------------------------------------------------- verification


@dataclass
class VerifyResult:
    """What `verify_onnx` compared and how far apart ONNX and PyTorch were."""

    max_abs_diff: float
    per_output: dict[str, float]
    shapes: list[dict[str, list[int]]]  # input shapes checked, one dict per run
    providers: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _to_np64(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().astype(np.float64)


def _compare(
    names: list[str],
    got: dict[str, np.ndarray],
    want: list[torch.Tensor],
    rtol: float,
    atol: float,
    where: str,
    per_output: dict[str, float],
) -> None:
    for name, ref in zip(names, want, strict=True):
        out = got[name]
        if tuple(out.shape) != tuple(ref.shape):
            raise VerificationError(
                f"output {name!r} {where}: ONNX shape {list(out.shape)} != PyTorch shape "
                f"{list(ref.shape)}"
            )
        a, b = np.asarray(out, dtype=np.float64), _to_np64(ref)
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = float(diff.max()) if diff.size else 0.0
        per_output[name] = max(per_output.get(name, 0.0), worst)
        bad = diff > atol + rtol * np.abs(np.nan_to_num(b))
        if bad.any():
            idx = np.unravel_index(int(np.argmax(np.where(bad, diff, -1.0))), diff.shape)
            raise VerificationError(
                f"output {name!r} {where} differs from PyTorch: max abs diff {worst:.3g} "
                f"({int(bad.sum())} of {bad.size} values beyond atol={atol:g} + rtol={rtol:g}*|torch|;"
                f" at index {tuple(int(i) for i in idx)}: onnx {a[idx]:.6g} vs torch {b[idx]:.6g})"
            )


def _resize(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    # Cyclic reuse of the example's own values keeps token ids, masks and types in range.
    for dim, new in sizes.items():
        index = torch.arange(new, device=t.device) % t.shape[dim]
        t = t.index_select(dim, index)
    return t


def _new_size(old: int, is_batch: bool) -> int:
    # Shrink when we can (never past an upper bound such as max_position_embeddings), but stay
    # >= 2: torch.export specialises sizes 0 and 1.
    if is_batch:
        return old + 1
    return old - 1 if old >= 3 else old + 1


def _second_inputs(
    args: tuple, kwargs: dict, specs: list[tuple[str, str, list]], batch_only: bool
) -> tuple[tuple, dict] | None:
    flat, spec = pytree.tree_flatten((args, kwargs))
    tensors = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    symbol_size: dict[str, int] = {}
    changed = False
    for slot, (_, _, shape) in zip(tensors, specs, strict=True):
        t = flat[slot]
        sizes = {}
        for dim, d in enumerate(shape):
            if not isinstance(d, str) or dim >= t.ndim or (batch_only and dim != 0):
                continue
            sizes[dim] = symbol_size.setdefault(d, _new_size(t.shape[dim], dim == 0))
        if sizes:
            flat[slot] = _resize(t, sizes)
            changed = True
    if not changed:
        return None
    return pytree.tree_unflatten(flat, spec)


def verify_onnx(
    path: str | os.PathLike,
    module: nn.Module,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    second_shape: bool = True,
    providers: str | Sequence[str] = "auto",
) -> VerifyResult:
    """Run `path` in onnxruntime and `module` in PyTorch on the same inputs; raise if they differ.

    Checks the example inputs, then (`second_shape`) the same inputs resized along the graph's
    dynamic dims (batch + 1, sequence - 1, values reused cyclically). A difference beyond
    ``atol + rtol * |torch|`` raises `VerificationError` naming the output, the input shapes and
    the size of the difference. Outputs are matched in order (the tensors of the module's output
    structure, flattened).

    Example::

        res = verify_onnx("model.onnx", deploy, (ids,), {"attention_mask": mask})
        res.max_abs_diff, res.shapes
    """
    args = _as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    session = open_session(path, providers=providers)
    specs = session.input_specs()
    if len(_flat_tensors(args, kwargs)) != len(specs):
        raise VerificationError(
            f"{path} takes {len(specs)} inputs {session.input_names}, the example has "
            f"{len(_flat_tensors(args, kwargs))} tensors"
        )
    per_output: dict[str, float] = {}
    shapes: list[dict[str, list[int]]] = []
    notes: list[str] = []

    def check(a: tuple, k: dict, reference: Any) -> None:
        want = _flat_outputs(reference)
        if len(want) != len(session.output_names):
            raise VerificationError(
                f"{path} has {len(session.output_names)} outputs {session.output_names}, the "
                f"module returns {len(want)} tensors"
            )
        feeds = dict(zip(session.input_names, _flat_tensors(a, k), strict=True))
        shape = {n: list(v.shape) for n, v in feeds.items()}
        where = f"at input shapes {shape}"
        try:
            got = session.run(feeds)
        except Exception as e:
            raise VerificationError(f"onnxruntime failed on {path} {where}: {e}") from e
        _compare(session.output_names, got, want, rtol, atol, where, per_output)
        shapes.append(shape)

    with _eval_mode(module), torch.no_grad():
        check(args, kwargs, module(*args, **kwargs))
        if second_shape:
            done = False
            for batch_only in (False, True):
                resized = _second_inputs(args, kwargs, specs, batch_only)
                if resized is None:
                    notes.append("the ONNX graph has no dynamic input dims; checked one shape")
                    break
                try:
                    reference = module(*resized[0], **resized[1])
                except Exception as e:  # PyTorch itself refuses this shape (e.g. fixed image size)
                    notes.append(f"PyTorch refused resized inputs (batch_only={batch_only}): {e}")
                    continue
                check(*resized, reference)
                done = True
                break
            if not done and resized is not None:
                warnings.warn(
                    f"{path}: verified at the example's shape only; {notes[-1]}", stacklevel=2
                )
    return VerifyResult(
        max_abs_diff=max(per_output.values(), default=0.0),
        per_output=per_output,
        shapes=shapes,
        providers=session.providers,
        notes=notes,
    )


# --------------------------------------------------------------------------- export


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how well it matched PyTorch. `to_dict()` is JSON-safe."""

    path: str
    external_data: list[str]
    opset: int
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, list[int | str | None]]  # symbolic dims are strings ("s72")
    node_count: int
    op_histogram: dict[str, int]
    initializer_count: int
    initializer_bytes: int
    file_bytes: int
    export_seconds: float
    verified: bool
    max_abs_diff: float | None
    per_output_diff: dict[str, float]
    verified_shapes: list[dict[str, list[int]]]
    providers: list[str]
    dynamic_shapes: str  # "auto", "auto (batch only)", "static (...)" or "user"
    verify_notes: list[str] = field(default_factory=list)  # e.g. why one shape was checked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _make_tempdir(final: Path) -> Path:
    parent = final.parent
    if final.is_dir():
        raise ExportError(f"cannot write ONNX file {final}: it is a directory")
    if not parent.is_dir():
        raise ExportError(f"cannot write ONNX file {final}: directory {parent} does not exist")
    try:
        # Same directory as the target, so the final os.replace is a rename, never a copy.
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write ONNX file {final}: {e.strerror or e}") from e


def _commit(tmpdir: Path, final: Path) -> None:
    """Move the model (and its external data) from `tmpdir` onto `final`.

    The model file is renamed last: until then, `final` still names the old, complete model. Data
    files that an old model at `final` used are backed up first and put back if anything fails.
    """
    new_model = tmpdir / final.name
    new_data = _external_locations(_load_proto(new_model))
    try:
        old_data = _external_locations(_load_proto(final)) if final.is_file() else []
    except ExportError:  # whatever was there is not a model we wrote; nothing to tidy
        old_data = []
    for loc in new_data:
        if os.path.basename(loc) != loc:
            raise ExportError(f"unexpected external data location {loc!r} in {final}")
    parent = final.parent
    backups: list[tuple[Path, Path]] = []
    moved: list[Path] = []
    try:
        for loc in new_data:
            dst = parent / loc
            if dst.exists():
                bak = tmpdir / f"{loc}.bak"
                os.replace(dst, bak)
                backups.append((bak, dst))
            os.replace(tmpdir / loc, dst)
            moved.append(dst)
        os.replace(new_model, final)
    except OSError as e:
        for dst in moved:
            with contextlib.suppress(OSError):
                dst.unlink()
        for bak, dst in backups:
            with contextlib.suppress(OSError):
                os.replace(bak, dst)
        raise ExportError(f"cannot write ONNX file {final}: {e}") from e
    # The old model is gone; data files only it used would be orphans.
    for loc in old_data:
        if loc not in new_data and os.path.basename(loc) == loc:
            with contextlib.suppress(OSError):
                (parent / loc).unlink()


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    verify: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    *,
    external_data: bool | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    providers: str | Sequence[str] = "auto",
    optimize: bool = True,
) -> ExportReport:
    """Export `module` to an ONNX file at `path`, checked and verified before it lands there.

    Args:
        module: the deploy module (`fold`'s result, or any ``torch.export(...).module()``), or any
            eager ``nn.Module`` (run in eval mode for the export, its mode restored after).
        path: the .onnx file to write. Written atomically: an existing file stays untouched if
            anything fails, and no temporary files are left behind.
        example_inputs, example_kwargs: inputs as the module's forward takes them.
        dynamic_shapes: as for ``torch.export``. Default: `auto_dynamic_shapes` (batch and
            sequence dims dynamic), limited to the dims the module is seen to accept (a
            ``torch.export`` capture without dynamic shapes runs only at its example's shapes:
            then the graph is static, with a warning). Capture deploy modules with batch and
            sequence >= 2: ``torch.export.export`` fixes dims of size 0 or 1.
        opset: ONNX opset (default: the exporter's).
        verify: compare onnxruntime with PyTorch at the example shape and a second shape;
            a difference beyond ``atol + rtol * |torch|`` raises `VerificationError`.
        input_names, output_names: graph input/output names. Output names default to the
            model output's structure (``logits``; ``output_0``, ``output_1`` for tuples).
        external_data: store weights in ``<path>.data`` (default: when they exceed
            `external_data_threshold` bytes; protobuf cannot hold 2 GiB).
        providers: onnxruntime providers for verification ("auto": CUDA when usable).
        optimize: let the exporter fold constants and clean up the graph.

    Example::

        deploy = torch.export.export(model.eval(), (ids,), strict=False).module()
        rep = export_onnx(deploy, "model.onnx", example_inputs=(ids,))
        rep.max_abs_diff < 1e-4, rep.op_histogram
    """
    import onnx

    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}")
    args = _as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    final = Path(os.fspath(path)).absolute()
    tmpdir = _make_tempdir(final)
    try:
        with _eval_mode(module), torch.no_grad():
            try:
                reference = module(*args, **kwargs)
            except Exception as e:
                raise InputError(
                    f"{type(module).__name__} does not run on the example inputs: {e}"
                ) from e
        names = list(output_names) if output_names is not None else _output_names(reference)
        if dynamic_shapes is None:
            dynamic_shapes, shape_note = _choose_dynamic_shapes(module, args, kwargs)
        else:
            shape_note = "user"

        start = time.perf_counter()
        with _eval_mode(module), _quiet():
            try:
                program = torch.onnx.export(
                    module,
                    args,
                    kwargs=kwargs,
                    dynamo=True,
                    verbose=False,
                    dynamic_shapes=dynamic_shapes,
                    opset_version=opset,
                    input_names=list(input_names) if input_names is not None else None,
                    output_names=names,
                    optimize=optimize,
                )
            except Exception as e:
                text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the exporter colours its text
                raise ExportError(
                    f"torch.onnx.export failed for {type(module).__name__} -> {final}: "
                    f"{type(e).__name__}: {text}"
                ) from e
            tmp_model = tmpdir / final.name
            nbytes = sum(
                v.const_value.nbytes
                for v in program.model.graph.initializers.values()
                if v.const_value is not None
            )
            use_external = (
                external_data if external_data is not None else nbytes > external_data_threshold
            )
            try:
                # With external data the exporter names the data file "<file name>.data"; the temp
                # model already has the final file name, so the name stays right after the move.
                program.save(tmp_model, external_data=use_external)
            except Exception as e:
                raise ExportError(f"cannot save ONNX model for {final}: {e}") from e
        seconds = time.perf_counter() - start

        try:
            onnx.checker.check_model(os.fspath(tmp_model))
        except Exception as e:
            raise ExportError(f"onnx.checker rejects the model exported for {final}: {e}") from e
        stats = onnx_stats(tmp_model)

        result = None
        if verify:
            result = verify_onnx(
                tmp_model, module, args, kwargs, rtol=rtol, atol=atol, providers=providers
            )
        _commit(tmpdir, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    report = ExportReport(
        path=os.fspath(final),
        external_data=stats.external_data,
        opset=stats.opset,
        input_names=[i["name"] for i in stats.inputs],
        output_names=[o["name"] for o in stats.outputs],
        input_shapes={i["name"]: i["shape"] for i in stats.inputs},
        node_count=stats.node_count,
        op_histogram=stats.op_histogram,
        initializer_count=stats.initializer_count,
        initializer_bytes=stats.initializer_bytes,
        file_bytes=stats.file_bytes,
        export_seconds=round(seconds, 3),
        verified=result is not None,
        max_abs_diff=result.max_abs_diff if result else None,
        per_output_diff=result.per_output if result else {},
        verified_shapes=result.shapes if result else [],
        providers=result.providers if result else [],
        dynamic_shapes=shape_note,
        verify_notes=result.notes if result else [],
    )
    logger.info(
        "exported %s: %d nodes, %d initializers, max abs diff %s",
        final,
        report.node_count,
        report.initializer_count,
        report.max_abs_diff,
    )
    return report


# --------------------------------------------------------------------------- comparison


@dataclass
class LatencyStats:
    """onnxruntime latency of one model, in milliseconds per call."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    providers: list[str]

    @classmethod
    def of(cls, seconds: list[float], providers: list[str]) -> LatencyStats:
        ms = sorted(s * 1e3 for s in seconds)
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        return cls(
            median_ms=statistics.median(ms),
            p10_ms=q[0],
            p90_ms=q[-1],
            mean_ms=statistics.fmean(ms),
            min_ms=ms[0],
            runs=len(ms),
            providers=providers,
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


def _measure(
    sessions: list[Session], feeds: list[dict[str, np.ndarray]], runs: int, warmup: int
) -> list[list[float]]:
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(f)
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        # Alternate which model goes first, so drift (clocks, caches, other load) hits both alike.
        order = range(len(sessions)) if i % 2 == 0 else reversed(range(len(sessions)))
        for j in order:
            t0 = time.perf_counter()
            sessions[j].run(feeds[j])
            times[j].append(time.perf_counter() - t0)
    return times


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

    Latency runs the two sessions alternately, `runs` timed calls each after `warmup`, on inputs
    synthesised from the graph inputs (symbolic dim 0 -> `batch_size`, other symbolic dims ->
    `seq_len`; integer inputs are ones, floats seeded normal), or on `inputs` (by input name,
    numpy or torch) where the graph's symbolic dims cannot say what fits.

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
            feeds = [dict(inputs), dict(inputs)]
        else:
            feeds = [synthesize_inputs(s, batch_size=batch_size, seq_len=seq_len) for s in sessions]
        times = _measure(sessions, feeds, runs, warmup)
        report.latency_base = LatencyStats.of(times[0], sessions[0].providers)
        report.latency_other = LatencyStats.of(times[1], sessions[1].providers)
        report.batch_size, report.seq_len = batch_size, seq_len
    return report


# --------------------------------------------------------------------------- fusions


def optimize_transformer(
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    model_type: str = "bert",
    num_heads: int = 0,
    hidden_size: int = 0,
    opt_level: int = 0,
    use_gpu: bool = False,
) -> dict[str, int]:
    """Apply onnxruntime's transformer fusions to `path`, write `out_path`, return fused op counts.

    A thin wrapper over ``onnxruntime.transformers.optimizer.optimize_model``. `num_heads` and
    `hidden_size` 0 let the optimizer infer them. `opt_level` 0 applies only the fusions (no
    hardware-specific onnxruntime graph optimisations baked into the file). Returns the fused
    operators that occur (e.g. ``{"SkipLayerNormalization": 4, "BiasGelu": 2}``); a base model and
    its fold must give the same counts.

    Measured on onnxruntime 1.32 with graphs from the torch 2.13 dynamo exporter (BERT):
    SkipLayerNormalization, LayerNormalization and BiasGelu fuse; Attention and
    EmbedLayerNormalization do not (their patterns follow the TorchScript exporter's graphs).

    Example::

        fused = optimize_transformer("bert.onnx", "bert.opt.onnx", "bert", num_heads=12,
                                     hidden_size=768)
    """
    try:
        from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ExportError(f"onnxruntime.transformers is not available: {e}") from e
    if model_type not in MODEL_TYPES:
        raise InputError(f"model_type={model_type!r}; onnxruntime knows {sorted(MODEL_TYPES)}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxFileNotFoundError(
            f"ONNX file not found: {path}; check the path (export it first with capaboost_fx.export_onnx)."
        )
    ort_logger = logging.getLogger("onnxruntime.transformers")
    level = ort_logger.level
    ort_logger.setLevel(logging.WARNING)  # the optimizer logs every fusion at INFO
    try:
        model = optimize_model(
            path,
            model_type=model_type,
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=opt_level,
            use_gpu=use_gpu,
        )
        big = (
            _load_proto(path).ByteSize() + onnx_stats(path).initializer_bytes
            > EXTERNAL_DATA_THRESHOLD
        )
        model.save_model_to_file(os.fspath(out_path), use_external_data_format=big)
        stats = model.get_fused_operator_statistics()
    except (ExportError, InputError, OnnxFileNotFoundError):
        raise
    except Exception as e:
        raise ExportError(f"onnxruntime transformer optimizer failed on {path}: {e}") from e
    finally:
        ort_logger.setLevel(level)
    return {op: int(n) for op, n in stats.items() if n}
