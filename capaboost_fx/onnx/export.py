"""Export a (folded) model to an optimized ONNX file, verified before it lands on disk.

`export_onnx` runs ``torch.onnx.export(..., dynamo=True)`` (the torch.export based exporter)
with dynamic dims named ``batch`` and ``sequence``, applies onnxruntime's transformer fusions
(``optimize="ort"``, the default) and optionally int8 dynamic quantization
(``quantize="int8"``), checks the file with ``onnx.checker``, runs it in onnxruntime against
PyTorch at two shapes and two graph optimization levels (`verify_onnx`), and only then moves it
onto `path` (atomically; external weight data included).

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
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capaboost_fx.errors import ExportError, InputError, VerificationError
from capaboost_fx.model import FoldedModel
from capaboost_fx.onnx.exporters import DESCRIBE, time_candidates, torchscript_candidates
from capaboost_fx.onnx.optimize import (
    EXTERNAL_DATA_THRESHOLD,
    check_options,
    fuse_for_ort,
    quantize_int8,
    quiet_loggers,
)
from capaboost_fx.onnx.runtime import open_session
from capaboost_fx.onnx.shapes import (
    as_args,
    axis_names,
    choose_dynamic_shapes,
    eval_mode,
    without_cache,
)
from capaboost_fx.onnx.shapes import output_names as default_output_names
from capaboost_fx.onnx.stats import external_locations, load_proto, onnx_stats
from capaboost_fx.onnx.translations import translation_table
from capaboost_fx.onnx.verify import DEFAULT_ATOL, DEFAULT_RTOL, VerifyResult, verify_onnx
from capaboost_fx.passes.capture import bind_static, split_static_kwargs

logger = logging.getLogger(__name__)

__all__ = ["EXTERNAL_DATA_THRESHOLD", "ExportReport", "export_onnx"]


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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporter's progress chatter and third-party deprecation noise out of the log.

    Errors still propagate as exceptions; only warnings and log records below ERROR are hidden.
    """
    names = ["torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch.fx"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # A torch.export graph has no real train/eval switch; the exporter warns for it anyway.
        warnings.filterwarnings("ignore", message=".*training mode.*", category=UserWarning)
        with quiet_loggers(*names):
            yield


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



def _export_program(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    dynamic_shapes: Any,
    opset: int | None,
    input_names: Sequence[str] | None,
    names: list[str],
    final: Path,
) -> Any:
    with eval_mode(module), _quiet():
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
                optimize=True,
                custom_translation_table=translation_table(),
            )
        except Exception as e:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the exporter colours its text
            raise ExportError(
                f"torch.onnx.export failed for {type(module).__name__} -> {final}: "
                f"{type(e).__name__}: {text}"
            ) from e
    shapes = [
        (v.name, [d.value if hasattr(d, "value") else d for d in (v.shape or [])])
        for v in program.model.graph.inputs
    ]
    mapping = axis_names([(n, [d for d in s if isinstance(d, (str, int))]) for n, s in shapes])
    if mapping:
        program.rename_axes(mapping)
    return program


def _save(program: Any, stage: Path, name: str, external: bool) -> Path:
    stage.mkdir()
    path = stage / name
    try:
        # With external data the exporter names the data file "<file name>.data"; the staged
        # model already has the final file name, so the name stays right after the move.
        program.save(path, external_data=external)
    except Exception as e:
        raise ExportError(f"cannot save ONNX model {name}: {e}") from e
    return path


def _check(path: Path, final: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path))
    except Exception as e:
        raise ExportError(f"onnx.checker rejects the model exported for {final}: {e}") from e


def _finish(
    kind: str,
    staged: Path,
    fusions: dict[str, int],
    quantize: str | None,
    use_external: bool,
    verify: bool,
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    rtol: float,
    atol: float,
    providers: Any,
    final: Path,
) -> tuple[str, Path, dict[str, int], dict[str, int], VerifyResult | None]:
    """Quantize (if asked), check and verify one staged candidate; raise if it is not good."""
    quantized_ops: dict[str, int] = {}
    if quantize == "int8":
        (staged.parent.parent / f"int8_{kind}").mkdir()
        target = staged.parent.parent / f"int8_{kind}" / final.name
        quantized_ops = quantize_int8(staged, target, external_data=use_external)
        staged = target
    if kind in ("none", "torchscript"):
        # A fused graph holds onnxruntime's own operators, some in the default domain
        # (SimplifiedLayerNormalization) that onnx.checker does not know: onnxruntime is its
        # judge (it loads the graph with its schemas, and verification runs it). The plain
        # graph was checked before fusing; a quantized one is checked here again.
        _check(staged, final)
    result = None
    if verify:
        result = verify_onnx(staged, module, args, kwargs, rtol=rtol, atol=atol,
                             providers=providers, strict=quantize is None)
    elif kind != "none" or quantize:
        # Unverified, but a rewritten graph must at least load (onnxruntime checks its shapes).
        open_session(staged, providers="cpu", graph_optimization_level="disable")
    return kind, staged, fusions, quantized_ops, result


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
    optimize: str | bool = "ort",
    quantize: str | None = None,
    timing_session: Mapping[str, Any] | None = None,
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
        dynamic_shapes: as for ``torch.export``. Default: `auto_dynamic_shapes` (batch and
            sequence dims dynamic), limited to the dims the module is seen to accept (a
            ``torch.export`` capture without dynamic shapes runs only at its example's shapes:
            then the graph is static, with a warning). Capture deploy modules with batch and
            sequence >= 2: ``torch.export.export`` fixes dims of size 0 or 1. The file names
            the dims ``batch`` (shared by all inputs) and ``sequence``.
        opset: ONNX opset (default: the exporter's).
        verify: compare onnxruntime with PyTorch at the example shape and a second shape, with
            onnxruntime's graph optimizations on and off; a difference beyond
            ``atol + rtol * |torch|`` raises `VerificationError` (int8: reported, not raised).
        input_names: graph input names (default: the forward's argument names).
        output_names: graph output names; default: the model output's structure
            (``logits``; ``output_0``, ``output_1`` for tuples).
        external_data: store weights in ``<path>.data`` (default: when they exceed
            `external_data_threshold` bytes; protobuf cannot hold 2 GiB).
        providers: onnxruntime providers for verification ("auto": CUDA when usable).
        optimize: "ort" (default) applies onnxruntime's transformer fusions (Attention,
            SkipLayerNormalization, BiasGelu, ...; `fuse_for_ort`) to the exporter's graph;
            "none" keeps the exporter's graph (constant-folded, cleaned up). Should the fused
            graph fail verification while the plain one passes, the plain one is written, with
            a warning and a note in the report. "fastest" also makes the TorchScript
            exporter's graph (``dynamo=False``, of your eager class with merged weights) and
            that graph fused by ``onnxruntime.transformers.optimizer``, verifies every one,
            times them side by side at the example inputs (pass a batch shaped like serving)
            and writes the fastest; ``report.optimize`` says which won, ``report.timings_ms``
            has each median. "torchscript" / "torchscript+ort" pin one of those (e.g. to
            compare a base and a folded export of the same kind with `compare_onnx`).
        timing_session: `open_session` keywords for timing the "fastest" candidates, e.g.
            ``{"intra_op_num_threads": 2, "sequential": True}``: the winner depends on the
            session's threads and spinning, so time them as you will serve.
        quantize: "int8" writes a dynamically quantized model (`quantize_int8`); verification
            then reports the max difference and argmax agreement instead of demanding `atol`.

    Example::

        deploy = torch.export.export(model.eval(), (ids,), strict=False).module()
        rep = export_onnx(deploy, "model.onnx", example_inputs=(ids,))
        rep.max_abs_diff < 1e-4, rep.op_histogram, rep.fusions
    """
    optimize, quantize = check_options(optimize, quantize)
    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, "eager", False) is True and isinstance(module, FoldedModel):
        module = module.base_model  # the fold of an eager training module: your model itself
    args = as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    final = Path(os.fspath(path)).absolute()
    tmpdir = _make_tempdir(final)
    notes: list[str] = []
    bound = contextlib.ExitStack()
    if not hasattr(module, "expose_signature_for"):
        # Tensor-free keywords (use_cache=False) are fixed, not exported inputs: the rule
        # capture follows (a captured module bakes them into its graph).
        static, kwargs = split_static_kwargs(kwargs)
        bound.enter_context(bind_static(module, static))
    try:
        with eval_mode(module), torch.no_grad():
            try:
                reference = module(*args, **kwargs)
            except Exception as e:
                raise InputError(
                    f"{type(module).__name__} does not run on the example inputs: {e}"
                ) from e
            if without_cache(kwargs, reference):  # a decoder's KV cache object
                notes.append("use_cache=False: a Hugging Face cache object is no ONNX output "
                             "(decoders with a KV cache: capaboost_fx.onnx.genai)")
                reference = module(*args, **kwargs)
            if hasattr(module, "expose_signature_for"):  # capaboost_fx modules: this call's
                module.expose_signature_for(args, kwargs)  # argument structure
        names = list(output_names) if output_names is not None else default_output_names(reference)
        if dynamic_shapes is None:
            dynamic_shapes, shape_note = choose_dynamic_shapes(module, args, kwargs)
        else:
            shape_note = "user"

        start = time.perf_counter()
        program = _export_program(
            module, args, kwargs, dynamic_shapes, opset, input_names, names, final
        )
        nbytes = sum(
            v.const_value.nbytes
            for v in program.model.graph.initializers.values()
            if v.const_value is not None
        )
        use_external = (
            external_data if external_data is not None else nbytes > external_data_threshold
        )
        # Candidates in order of preference: (optimize, staged fp32 file, fusions). The plain
        # graph is saved before fusing (which rewrites the model in place): it is the result
        # for optimize="none", and the fallback should the fused graph fail.
        plain = _save(program, tmpdir / "plain", final.name, use_external)
        _check(plain, final)
        candidates: list[tuple[str, Path, dict[str, int]]] = []
        if optimize in ("ort", "fastest"):
            try:
                with _quiet():
                    program.model, fusions = fuse_for_ort(program.model)
                if fusions:  # nothing fused (an MLP): the plain graph is the same graph
                    fused = _save(program, tmpdir / "fused", final.name, use_external)
                    candidates.append(("ort", fused, fusions))
            except Exception as e:
                notes.append(f"onnxruntime fusions failed ({type(e).__name__}: {e}); not fused")
                warnings.warn(f"{final}: {notes[-1]}", RuntimeWarning, stacklevel=2)
        candidates.append(("none", plain, {}))  # the result for "none", else the fallback
        if optimize in ("torchscript", "torchscript+ort", "fastest"):
            ts = torchscript_candidates(optimize, module, args, kwargs, plain, names, opset,
                                         use_external, tmpdir, final, notes)
            candidates = candidates + ts if optimize == "fastest" else ts + candidates
        del program
        seconds = time.perf_counter() - start

        passed = []
        for i, (kind, staged, fusions) in enumerate(candidates):
            try:
                passed.append(_finish(kind, staged, fusions, quantize, use_external, verify,
                                      module, args, kwargs, rtol=rtol, atol=atol,
                                      providers=providers, final=final))
            except (ExportError, VerificationError) as e:
                if i + 1 == len(candidates) and not passed:
                    raise
                nxt = candidates[i + 1][0] if i + 1 < len(candidates) else ""
                notes.append(f"the {kind!r} graph failed its check ({type(e).__name__}: {e})"
                             + ("" if optimize == "fastest" or not nxt else
                                f"; falling back to {DESCRIBE[nxt]}"))
                warnings.warn(f"{final}: {notes[-1]}", RuntimeWarning, stacklevel=2)
                continue
            if optimize != "fastest":
                break
        timings: dict[str, float] = {}
        if len(passed) > 1:
            timings = time_candidates(passed, args, kwargs, providers, timing_session)
            passed.sort(key=lambda c: timings[c[0]])
            notes.append(f"fastest of {len(passed)} verified graphs (median ms at the example "
                         f"inputs): {timings}")
        kind, staged, fusions, quantized_ops, result = passed[0]
        if optimize not in ("fastest", kind) and not (optimize == "ort" and kind == "none"):
            notes.append(f"optimize={optimize!r} could not be made; wrote {DESCRIBE[kind]} "
                         f"({kind!r})")
            warnings.warn(f"{final}: {notes[-1]}; see report.verify_notes", RuntimeWarning,
                          stacklevel=2)
        stats = onnx_stats(staged)
        _commit(staged.parent, final)
    finally:
        bound.close()
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
        verify_notes=notes + (result.notes if result else []),
        optimize=kind,
        fusions=fusions,
        quantize=quantize,
        quantized_ops=quantized_ops,
        timings_ms=timings,
        verified_levels=result.optimization_levels if result else [],
        within_tolerance=result.within_tolerance if result else None,
        argmax_agreement=result.argmax_agreement if result else {},
    )
    logger.info(
        "exported %s: %d nodes, %d initializers, max abs diff %s",
        final,
        report.node_count,
        report.initializer_count,
        report.max_abs_diff,
    )
    return report
