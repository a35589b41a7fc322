"""The export pipeline behind `export_onnx`: an optimized ONNX file, verified before it lands.

A short pipeline: run the example (`example_call`: the reference output,
the dims that stay dynamic), **make** the candidate graphs its options ask for
(`dynamo_candidates`: ``torch.export`` then ``torch.onnx.export``, fused for onnxruntime;
`torchscript_candidates`: the TorchScript exporter, which needs no dynamo export), **check**
each (``onnx.checker``, onnxruntime against PyTorch at two shapes and two optimization
levels: `verify_onnx`), **choose** the first that passed (or the fastest), and **commit** it
onto `path` atomically (external weight data included). Options are one typed object,
`ExportOptions`; a failure is a short `ExportError` (`failure.export_failure`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from capaboost_fx.errors import CapaBoostWarning, ExportError, InputError, VerificationError
from capaboost_fx.model import CapaBoostModel, FoldedModel
from capaboost_fx.onnx.candidates import check_candidate, choose, dynamo_candidates
from capaboost_fx.onnx.exporters import (
    DESCRIBE,
    eager_module,
    torchscript_candidates,
)
from capaboost_fx.onnx.optimize import EXTERNAL_DATA_THRESHOLD
from capaboost_fx.onnx.options import Candidate, ExampleCall, ExportOptions, example_call
from capaboost_fx.onnx.runtime import FIXED_DIMS_KEY
from capaboost_fx.onnx.shapes import (
    BATCH,
    SEQUENCE,
    auto_dynamic_shapes,
    fixed_dims_message,
    serving_dims,
)
from capaboost_fx.onnx.stats import OnnxStats, external_locations, load_proto, onnx_stats

logger = logging.getLogger(__name__)

__all__ = ["EXTERNAL_DATA_THRESHOLD", "ExportOptions", "ExportReport", "export_file"]

# The exporters each `optimize` value tries, in order of preference; the second runs only when
# the first makes no graph that passes its check. A pinned TorchScript export runs without the
# dynamo exporter. The TorchScript exporter is tried by export_onnx itself when the dynamo
# exporter fails, so an error never sends the user to an option that was not tried.
# "auto" (the default): the TorchScript exporter's plain graph where the module has an eager
# form and the exporter makes a graph that verifies, else the dynamo exporter's (fused, then
# plain): a fixed order, learned from benchmarks/bench_default_export.py and bench_deploy.py
# (docs/deploy.md), so that a model and its fold get the same kind of graph every time.
# Generative models keep the dynamo exporter first (`_plan`).
# "dynamo-eager": the dynamo exporter over a folded module's eager model (Dim.AUTO), for a
# folded graph the exporter cannot translate.
PLAN = {"auto": ("torchscript", "dynamo", "dynamo-eager"),
        "ort": ("dynamo", "torchscript", "dynamo-eager"),
        "none": ("dynamo", "torchscript", "dynamo-eager"),
        "fastest": ("dynamo", "torchscript"),
        "torchscript": ("torchscript", "dynamo"), "torchscript+ort": ("torchscript", "dynamo")}


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how well it matched PyTorch. `to_dict()` is JSON-safe."""

    path: str
    external_data: list[str]
    opset: int
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, list[int | str | None]]  # dynamic dims: "batch", "sequence"
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
    optimize: str = "none"  # what the file holds: "ort", "none", "torchscript", "torchscript+ort"
    fusions: dict[str, int] = field(default_factory=dict)  # rewrite rule -> times applied
    quantize: str | None = None  # "int8" or None
    quantized_ops: dict[str, int] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)  # optimize="fastest": each graph
    verified_levels: list[str] = field(default_factory=list)  # onnxruntime optimization levels
    within_tolerance: bool | None = None  # False only for quantized models (reported, not raised)
    argmax_agreement: dict[str, float] = field(default_factory=dict)
    # Dims the file fixes though the PyTorch model runs at other sizes ({input: {dim: size}}):
    # a request of another size is refused (warned at export; `open_session` says why).
    fixed_dims: dict[str, dict[int, int]] = field(default_factory=dict)

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
    new_data = external_locations(load_proto(new_model))
    try:
        old_data = external_locations(load_proto(final)) if final.is_file() else []
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


def _make(exporter: str, call: ExampleCall, opts: ExportOptions, tmpdir: Path, final: Path,
          plain: Path | None) -> list[Candidate]:
    if exporter == "dynamo":
        return dynamo_candidates(call, opts, tmpdir, final)
    if exporter == "dynamo-eager":
        sub = _eager_call(call)
        if sub is None:
            return []
        (tmpdir / "eager").mkdir()
        staged = dynamo_candidates(sub, opts, tmpdir / "eager", final)
        return [c for c in staged if opts.optimize != "none" or c.kind == "none"]
    if opts.optimize == "auto" and isinstance(call.module, CapaBoostModel):
        call.notes.append("TorchScript exporter skipped: a training module (its masked "
                          "adapters) is exported by the dynamo exporter")
        return []
    staged = torchscript_candidates(call, opts, tmpdir, final, plain)
    # "auto" writes the plain TorchScript graph: measured as fast as or faster than the
    # optimizer's on most runs (docs/deploy.md), and one graph fewer to make and check.
    return [c for c in staged if opts.optimize not in ("none", "auto") or c.kind == "torchscript"]


def _generative(module: nn.Module) -> bool:
    """A model that generates (a Hugging Face causal or seq2seq LM: it has ``generate``)."""
    eager = eager_module(module) or module
    return callable(getattr(eager, "generate", None))


def _plan(call: ExampleCall, opts: ExportOptions) -> tuple[str, ...]:
    """The exporters to try, in order. "auto" puts the TorchScript exporter first where it
    was measured fastest (encoders, vision models, plain modules) and keeps the dynamo
    exporter first for generative models (decoder and seq2seq LMs: the dynamo graphs were as
    fast as any there, and the TorchScript exporter cannot make GPT-2's): docs/deploy.md."""
    if opts.optimize == "auto" and _generative(call.module):
        return ("dynamo", "torchscript", "dynamo-eager")
    return PLAN[opts.optimize]


def _fail(call: ExampleCall, final: Path, text: str) -> None:
    call.notes.append(text)
    warnings.warn(f"{final}: {text}", RuntimeWarning, stacklevel=4)


def _all_failed(errors: list[Exception], call: ExampleCall) -> Exception:
    """The error to raise when no graph passed: the last exporter failure that says where and
    what to try (an `ExportError`), else the last failure; with what else was tried."""
    at = max((i for i, e in enumerate(errors) if isinstance(e, ExportError)),
             default=len(errors) - 1)
    main = errors[at]

    def line(e: Exception) -> str:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:240]}"

    skipped = [n[:240] for n in call.notes if n.startswith("TorchScript exporter skipped")]
    before = [line(e) for e in errors[:at]]
    after = [line(e) for e in errors[at + 1:]]
    text = str(main)
    if before:
        text += f"\n  tried before: {'; '.join(before)}"
    if after:
        text += f"\n  then tried: {'; '.join(after)}"
    if skipped:
        text += f"\n  also tried: {'; '.join(skipped)}"
    if text == str(main):
        return main
    out = type(main)(text)
    out.__cause__ = main
    return out


def _make_and_check(call: ExampleCall, opts: ExportOptions, tmpdir: Path,
                    final: Path) -> list[Candidate]:
    """Make and check the candidates in order of preference, up to the first that passes (all
    of them for "fastest"); raise the last failure when none passes."""
    passed: list[Candidate] = []
    errors: list[Exception] = []
    plain = None
    for exporter in _plan(call, opts):
        if passed and opts.optimize != "fastest":
            break
        try:
            staged = _make(exporter, call, opts, tmpdir, final, plain)
        except ExportError as e:
            errors.append(e)
            plan = _plan(call, opts)
            later = plan[plan.index(exporter) + 1:]
            if [x for x in later if x != "dynamo-eager" or _eager_call(call) is not None]:
                _fail(call, final, f"the {exporter} exporter failed: {e}")
            continue
        plain = next((c.path for c in staged if c.kind == "none"), plain)
        for i, c in enumerate(staged):
            if passed and opts.optimize != "fastest":
                break
            try:
                passed.append(check_candidate(c, call, opts, final))
            except (ExportError, VerificationError) as e:
                errors.append(e)
                nxt = (f"; falling back to {DESCRIBE[staged[i + 1].kind]}"
                       if i + 1 < len(staged) and opts.optimize != "fastest" else "")
                text = f"the {c.kind!r} graph failed its check ({type(e).__name__}: {e}){nxt}"
                if opts.optimize == "auto" and exporter == "torchscript":
                    call.notes.append(text)  # "auto" goes on to the dynamo exporter quietly
                else:
                    _fail(call, final, text)
    if not passed:
        if not errors:
            raise ExportError(f"no ONNX graph could be made for {final}: "
                              f"{'; '.join(call.notes)}")
        raise _all_failed(errors, call)
    return passed


def _file_inputs(path: Path) -> list[tuple[str, list[Any]]]:
    return [(i["name"], i["shape"]) for i in onnx_stats(path).inputs]


def _fixed_dims(c: Candidate, call: ExampleCall) -> dict[str, dict[int, int]]:
    return serving_dims(call.module, call.args, call.kwargs, _file_inputs(c.path))


def _dynamic_axes(c: Candidate, fixed: dict[str, dict[int, int]]) -> dict[str, dict[int, str]]:
    """The file's dynamic dims, and the ones it fixed, for the TorchScript exporter."""
    axes = {n: {d: v for d, v in enumerate(shape) if isinstance(v, str)}
            for n, shape in _file_inputs(c.path)}
    for name, dims in fixed.items():
        for d in dims:
            axes.setdefault(name, {})[d] = BATCH if d == 0 else SEQUENCE
    return axes


def _eager_call(call: ExampleCall) -> ExampleCall | None:
    """The call over a folded module's eager model with ``Dim.AUTO`` dims, for the dynamo
    exporter; None when the module is eager already or has no eager form."""
    eager = eager_module(call.module)
    if eager is None or eager is call.module:
        return None
    return ExampleCall(eager, call.args, call.kwargs, call.reference, call.output_names,
                       auto_dynamic_shapes(eager, call.args, call.kwargs),
                       "auto (torch.export keeps what the model fixes)", call.notes,
                       call.specialized)


def _alternatives(call: ExampleCall, opts: ExportOptions, tmpdir: Path, final: Path,
                  c: Candidate, fixed: dict[str, dict[int, int]]) -> Iterator[Candidate]:
    """Graphs that may keep the fixed dims dynamic, in order: the TorchScript exporter over
    the eager module with those dims as dynamic axes, then the dynamo exporter over the eager
    module (a folded module's base model) with ``Dim.AUTO``."""
    eager = eager_module(call.module)
    if eager is None:
        call.notes.append("no eager form to re-export with dynamic dims (dense adapters, or "
                          "an exported program)")
        return
    folder = tmpdir / "dynamic_ts"
    folder.mkdir()
    pinned = opts.optimize in ("none", "torchscript")
    staged = torchscript_candidates(call, opts, folder, final, axes=_dynamic_axes(c, fixed))
    yield from (s for s in staged if not pinned or s.kind == "torchscript")
    sub = _eager_call(call)
    if sub is not None:
        folder = tmpdir / "dynamic_dynamo"
        folder.mkdir()
        try:
            staged = dynamo_candidates(sub, opts, folder, final)
        except ExportError as e:
            call.notes.append(f"the dynamo exporter over the eager module failed: "
                              f"{str(e).splitlines()[0]}")
            return
        yield from (s for s in staged if opts.optimize != "none" or s.kind == "none")


def _serve_all_sizes(chosen: Candidate, call: ExampleCall, opts: ExportOptions, tmpdir: Path,
                     final: Path) -> tuple[Candidate, dict[str, dict[int, int]]]:
    """The chosen graph, or when it fixes a batch or sequence dim the model runs at other
    sizes of, the first other exporter's graph that keeps that dim dynamic and verifies at
    two sizes; with the dims still fixed ({} when none)."""
    if call.shape_note == "user":  # the dims the user asked for, fixed ones included
        return chosen, {}
    fixed = _fixed_dims(chosen, call)
    if not fixed:
        return chosen, {}
    call.notes.append(f"the {chosen.kind!r} graph fixes {fixed}, though the model runs at "
                      "other sizes; trying other exporters")
    same_trace: set[Path] = set()  # a trace that still fixes the dims: its other graphs do
    for c in _alternatives(call, opts, tmpdir, final, chosen, fixed):
        if c.path.parent.parent in same_trace:
            continue
        try:
            c = check_candidate(c, call, opts, final)
        except (ExportError, VerificationError) as e:
            call.notes.append(f"the {c.kind!r} graph with dynamic dims failed its check: "
                              f"{str(e).splitlines()[0][:240]}")
            continue
        left = _fixed_dims(c, call)
        if not left:
            call.notes.append(f"{DESCRIBE[c.kind]} ({c.kind!r}) keeps those dims dynamic "
                              "and verifies at two sizes: written instead")
            return c, {}
        call.notes.append(f"the {c.kind!r} graph still fixes {left}")
        same_trace.add(c.path.parent.parent)
    return chosen, fixed


def _record_fixed_dims(path: Path, fixed: dict[str, dict[int, int]], message: str) -> None:
    """Write the fixed dims and what they mean into the file's metadata, where `open_session`
    reads them to refuse another size with that message."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    entry = {"dims": {n: {str(d): v for d, v in dims.items()} for n, dims in fixed.items()},
             "message": message}
    keep = [p for p in model.metadata_props if p.key != FIXED_DIMS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=FIXED_DIMS_KEY, value=json.dumps(entry))
    onnx.save(model, os.fspath(path))


def export_file(module: nn.Module, path: str | os.PathLike, example_inputs: Any,
                example_kwargs: Any, *, dynamic_shapes: Any, options: ExportOptions
                ) -> ExportReport:
    """The pipeline behind `capaboost_fx.onnx.export.export_onnx` (its arguments, the options
    resolved): one deploy file, made, checked, chosen and committed."""
    opts = options
    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, FoldedModel):
        module = module.runs_as()  # the fold of an eager training module: your model
    if isinstance(module, CapaBoostModel):
        warnings.warn(
            "export_onnx got a training module: its masked adapter subgraphs are exported as "
            "they are (extra nodes, bytes and latency); export fold(train_model) to deploy the "
            "original architecture with merged weights", CapaBoostWarning, stacklevel=2)
    final = Path(os.fspath(path)).absolute()
    tmpdir = _make_tempdir(final)
    try:
        with example_call(module, example_inputs, example_kwargs, dynamic_shapes, opts) as call:
            start = time.perf_counter()
            passed = _make_and_check(call, opts, tmpdir, final)
            chosen, timings = choose(passed, call, opts)
            first = chosen
            chosen, fixed = _serve_all_sizes(chosen, call, opts, tmpdir, final)
            seconds = time.perf_counter() - start
        if chosen is not first:
            _fail(call, final, f"the {first.kind!r} graph fixes a batch or sequence size the "
                  f"model runs at others of; wrote {DESCRIBE[chosen.kind]} ({chosen.kind!r}), "
                  "which keeps it dynamic and verifies at two sizes")
        elif opts.optimize not in ("auto", "fastest", chosen.kind) and not (
                opts.optimize == "ort" and chosen.kind == "none"):
            _fail(call, final, f"optimize={opts.optimize!r} could not be made; wrote "
                  f"{DESCRIBE[chosen.kind]} ({chosen.kind!r}); see report.verify_notes")
        if fixed:
            message = fixed_dims_message(str(final), fixed, call.specialized)
            _record_fixed_dims(chosen.path, fixed, message)
            call.notes.append(message)
            warnings.warn(CapaBoostWarning(message), stacklevel=2)
        stats = onnx_stats(chosen.path)
        _commit(chosen.path.parent, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    report = _report(final, stats, chosen, call, opts, seconds, timings)
    report.fixed_dims = fixed
    logger.info("exported %s: %d nodes, %d initializers, max abs diff %s", final,
                report.node_count, report.initializer_count, report.max_abs_diff)
    return report


def _report(final: Path, stats: OnnxStats, chosen: Candidate, call: ExampleCall,
            opts: ExportOptions, seconds: float, timings: dict[str, float]) -> ExportReport:
    result = chosen.result
    return ExportReport(
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
        dynamic_shapes=call.shape_note,
        verify_notes=call.notes + (result.notes if result else []),
        optimize=chosen.kind,
        fusions=chosen.fusions,
        quantize=opts.quantize,
        quantized_ops=chosen.quantized_ops,
        timings_ms=timings,
        verified_levels=result.optimization_levels if result else [],
        within_tolerance=result.within_tolerance if result else None,
        argmax_agreement=result.argmax_agreement if result else {},
    )
