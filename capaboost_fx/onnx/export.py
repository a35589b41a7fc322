"""Export a (folded) model to an optimized ONNX file, verified before it lands on disk.

`export_onnx` is a short pipeline: run the example (`example_call`: the reference output,
the dims that stay dynamic), **make** the candidate graphs its options ask for
(`dynamo_candidates`: ``torch.export`` then ``torch.onnx.export``, fused for onnxruntime;
`torchscript_candidates`: the TorchScript exporter, which needs no dynamo export), **check**
each (``onnx.checker``, onnxruntime against PyTorch at two shapes and two optimization
levels: `verify_onnx`), **choose** the first that passed (or the fastest), and **commit** it
onto `path` atomically (external weight data included). Options are one typed object,
`ExportOptions`; a failure is a short `ExportError` (`failure.export_failure`).

Example::

    import capaboost_fx as cbx
    rep = cbx.export_onnx(cbx.fold(train_model), "model.onnx", example_kwargs=batch)
    rep.fusions          # {"attention": 6, "bias_gelu": 6, "skip_layer_normalization": 12, ...}
    rep.input_shapes     # {"input_ids": ["batch", "sequence"], ...}
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from capaboost_fx.errors import ExportError, InputError, VerificationError
from capaboost_fx.model import CapaBoostModel, FoldedModel
from capaboost_fx.onnx.candidates import check_candidate, choose, dynamo_candidates
from capaboost_fx.onnx.exporters import DESCRIBE, torchscript_candidates
from capaboost_fx.onnx.optimize import EXTERNAL_DATA_THRESHOLD
from capaboost_fx.onnx.options import Candidate, ExampleCall, ExportOptions, example_call
from capaboost_fx.onnx.stats import OnnxStats, external_locations, load_proto, onnx_stats

logger = logging.getLogger(__name__)

__all__ = ["EXTERNAL_DATA_THRESHOLD", "ExportOptions", "ExportReport", "export_onnx"]

# The exporters each `optimize` value tries, in order of preference. A pinned TorchScript
# export runs without the dynamo exporter; the dynamo one is its fallback only when the
# TorchScript graph cannot be made (no eager form) or fails its check.
PLAN = {"ort": ("dynamo",), "none": ("dynamo",), "fastest": ("dynamo", "torchscript"),
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
    return torchscript_candidates(call, opts, tmpdir, final, plain)


def _fail(call: ExampleCall, final: Path, text: str) -> None:
    call.notes.append(text)
    warnings.warn(f"{final}: {text}", RuntimeWarning, stacklevel=4)


def _make_and_check(call: ExampleCall, opts: ExportOptions, tmpdir: Path,
                    final: Path) -> list[Candidate]:
    """Make and check the candidates in order of preference, up to the first that passes (all
    of them for "fastest"); raise the last failure when none passes."""
    passed: list[Candidate] = []
    errors: list[Exception] = []
    plain = None
    for exporter in PLAN[opts.optimize]:
        if passed and opts.optimize != "fastest":
            break
        try:
            staged = _make(exporter, call, opts, tmpdir, final, plain)
        except ExportError as e:
            errors.append(e)
            if exporter != PLAN[opts.optimize][-1]:
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
                _fail(call, final, f"the {c.kind!r} graph failed its check "
                      f"({type(e).__name__}: {e}){nxt}")
    if not passed:
        if not errors:
            raise ExportError(f"no ONNX graph could be made for {final}: "
                              f"{'; '.join(call.notes)}")
        if len(errors) > 1:  # say what was tried before the last failure
            earlier = "; ".join(f"{type(e).__name__}: {str(e).splitlines()[0][:240]}"
                                for e in errors[:-1])
            raise type(errors[-1])(f"{errors[-1]}\n  tried before: {earlier}") from errors[-1]
        raise errors[-1]
    return passed


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
        from capaboost_fx.onnx.multi_lora import export_multi_lora

        return export_multi_lora(module, path, example_inputs, example_kwargs,
                                 dynamic_shapes=dynamic_shapes, options=opts)
    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, "eager", False) is True and isinstance(module, FoldedModel):
        module = module.base_model  # the fold of an eager training module: your model itself
    if isinstance(module, CapaBoostModel):
        warnings.warn(
            "export_onnx got a training module: its masked adapter subgraphs are exported as "
            "they are (extra nodes, bytes and latency); export fold(train_model) to deploy the "
            "original architecture with merged weights", UserWarning, stacklevel=2)
    final = Path(os.fspath(path)).absolute()
    tmpdir = _make_tempdir(final)
    try:
        with example_call(module, example_inputs, example_kwargs, dynamic_shapes, opts) as call:
            start = time.perf_counter()
            passed = _make_and_check(call, opts, tmpdir, final)
            seconds = time.perf_counter() - start
            chosen, timings = choose(passed, call, opts)
        if opts.optimize not in ("fastest", chosen.kind) and not (
                opts.optimize == "ort" and chosen.kind == "none"):
            _fail(call, final, f"optimize={opts.optimize!r} could not be made; wrote "
                  f"{DESCRIBE[chosen.kind]} ({chosen.kind!r}); see report.verify_notes")
        stats = onnx_stats(chosen.path)
        _commit(chosen.path.parent, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    report = _report(final, stats, chosen, call, opts, seconds, timings)
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
