"""The graphs `export_onnx` can write, each a `Candidate`: made (`dynamo_candidates`, and the
TorchScript ones in `exporters`), checked (`check_candidate`), and chosen (`choose`).

The dynamo path is two explicit steps, so a failure says which one failed: ``torch.export``
traces the module with the dims `choose_dynamic_shapes` gave (the one rule: what the traced
graph leaves dynamic is dynamic), then ``torch.onnx.export`` translates that program.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from capaboost_fx.errors import ExportError
from capaboost_fx.onnx.exporters import time_candidates
from capaboost_fx.onnx.failure import export_failure
from capaboost_fx.onnx.optimize import fuse_for_ort, quantize_int8, quiet_loggers
from capaboost_fx.onnx.options import Candidate, ExampleCall, ExportOptions, use_external_data
from capaboost_fx.onnx.runtime import open_session
from capaboost_fx.onnx.shapes import axis_names, eval_mode, specializations
from capaboost_fx.onnx.translations import translation_table
from capaboost_fx.onnx.verify import verify_onnx

__all__ = ["Candidate", "check_candidate", "choose", "dynamo_candidates", "use_external_data"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the exporter's progress chatter and third-party deprecation noise out of the log.
    Errors still propagate as exceptions; only warnings and log records below ERROR are hidden."""
    names = ["torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch.fx"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # A torch.export graph has no real train/eval switch; the exporter warns for it anyway.
        warnings.filterwarnings("ignore", message=".*training mode.*", category=UserWarning)
        with quiet_loggers(*names):
            yield


def _traced(call: ExampleCall, what: str, torchscript: bool) -> tuple[Any, Any]:
    """What ``torch.onnx.export`` translates, and the dims it is given. An eager module with
    auto dims is traced once here by ``torch.export`` (``Dim.AUTO``: what its graph leaves
    symbolic stays dynamic, the rule captured modules follow) and that program is translated;
    the ONNX exporter given ``Dim.AUTO`` itself keeps dims the weights fix symbolic (a Linear's
    features): measured on torch 2.13. Anything else is translated with its own dims."""
    if not call.shape_note.startswith("auto"):
        return call.module, call.dynamic_shapes
    try:
        program = torch.export.export(call.module, call.args, call.kwargs,
                                      dynamic_shapes=call.dynamic_shapes, strict=False)
    except Exception as e:
        raise export_failure(e, what, torchscript=torchscript, tracing=True) from e
    return program, None


def _static_numeric_dims(graph: Any) -> None:
    """A dim ``Dim.AUTO`` left to torch.export that the model fixed (a Linear's features)
    reaches the ONNX graph as the symbol ``'8'``: write it as the number it is."""
    import onnx_ir as ir

    values = [*graph.inputs, *graph.outputs,
              *(v for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs)]
    for v in values:
        if v.shape is None:
            continue
        dims = [int(d.value) if isinstance(d, ir.SymbolicDim) and str(d.value).isdigit() else d
                for d in v.shape]
        if dims != list(v.shape):
            v.shape = ir.Shape(dims)


def _program(call: ExampleCall, opts: ExportOptions, what: str) -> Any:
    """``torch.onnx.export(dynamo=True)`` of the call: the ONNX program, its dims named."""
    # export_onnx tries the TorchScript exporter itself when this one fails (export.PLAN), so
    # the error's hint never sends the user to it.
    torchscript = False
    # Size-oblivious: a batch of 1 in the example stays a dynamic dim (as torch.onnx does).
    oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=True)
    with eval_mode(call.module), quiet(), specializations(call.specialized):
        with oblivious:
            source, dims = _traced(call, what, torchscript)
        try:
            program = torch.onnx.export(
                source, call.args, kwargs=call.kwargs, dynamo=True, verbose=False,
                dynamic_shapes=dims, opset_version=opts.opset, output_names=call.output_names,
                input_names=list(opts.input_names) if opts.input_names is not None else None,
                optimize=True, custom_translation_table=translation_table(),
            )
        except Exception as e:
            raise export_failure(e, what, torchscript=torchscript) from e
    _static_numeric_dims(program.model.graph)
    shapes = [(v.name, [d.value if hasattr(d, "value") else d for d in (v.shape or [])])
              for v in program.model.graph.inputs]
    mapping = axis_names([(n, [d for d in s if isinstance(d, (str, int))]) for n, s in shapes])
    if mapping:
        program.rename_axes(mapping)
    return program


def _save(program: Any, folder: Path, name: str, external: bool) -> Path:
    folder.mkdir()
    path = folder / name
    try:
        # With external data the exporter names the data file "<file name>.data"; the staged
        # model already has the final file name, so the name stays right after the move.
        program.save(path, external_data=external)
    except Exception as e:
        raise ExportError(f"cannot save ONNX model {name}: {e}") from e
    return path


def _onnx_check(path: Path, final: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path))
    except Exception as e:
        raise ExportError(f"onnx.checker rejects the model exported for {final}: {e}") from e


def dynamo_candidates(call: ExampleCall, opts: ExportOptions, tmpdir: Path,
                      final: Path) -> list[Candidate]:
    """The dynamo exporter's graph, fused for onnxruntime first when `opts` asks (the plain
    graph, saved before fusing rewrites it in place, is the fallback)."""
    what = f"{type(call.module).__name__} -> {final}"
    program = _program(call, opts, what)
    external = use_external_data(call, opts)
    plain = _save(program, tmpdir / "plain", final.name, external)
    _onnx_check(plain, final)
    out = [Candidate("none", plain)]
    if opts.optimize in ("auto", "ort", "fastest"):
        try:
            with quiet():
                program.model, fusions = fuse_for_ort(program.model)
            if fusions:  # nothing fused (an MLP): the plain graph is the same graph
                out.insert(0, Candidate("ort", _save(program, tmpdir / "fused", final.name,
                                                     external), fusions))
        except Exception as e:  # onnxscript's rewriter on a graph it does not expect
            call.notes.append(f"onnxruntime fusions failed ({type(e).__name__}: {e}); "
                              "not fused")
            warnings.warn(f"{final}: {call.notes[-1]}", RuntimeWarning, stacklevel=3)
    return out


def check_candidate(c: Candidate, call: ExampleCall, opts: ExportOptions,
                    final: Path) -> Candidate:
    """Quantize (if asked), check and verify one staged candidate; raise if it is not good."""
    staged = c.path
    if opts.quantize == "int8":
        folder = staged.parent.parent / f"int8_{c.kind.replace('+', '_')}"
        folder.mkdir()
        c.quantized_ops = quantize_int8(staged, folder / final.name,
                                        external_data=use_external_data(call, opts))
        c.path = staged = folder / final.name
    if c.kind in ("none", "torchscript"):
        # A fused graph holds onnxruntime's own operators, some in the default domain
        # (SimplifiedLayerNormalization) that onnx.checker does not know: onnxruntime is its
        # judge (it loads the graph with its schemas, and verification runs it).
        _onnx_check(staged, final)
    if opts.verify:
        c.result = verify_onnx(staged, call.module, call.args, call.kwargs, rtol=opts.rtol,
                               atol=opts.atol, providers=opts.providers,
                               strict=opts.quantize is None)
    elif c.kind != "none" or opts.quantize:
        # Unverified, but a rewritten graph must at least load (onnxruntime checks its shapes).
        open_session(staged, providers="cpu", graph_optimization_level="disable")
    return c


def choose(passed: list[Candidate], call: ExampleCall,
           opts: ExportOptions) -> tuple[Candidate, dict[str, float]]:
    """The candidate to write: the first that passed, or with "fastest" the fastest of them,
    timed side by side at the example inputs."""
    timings: dict[str, float] = {}
    if len(passed) > 1:
        timings = time_candidates([(c.kind, c.path) for c in passed], call.args, call.kwargs,
                                  opts.providers, opts.timing_session)
        passed = sorted(passed, key=lambda c: timings[c.kind])
        call.notes.append(f"fastest of {len(passed)} verified graphs (median ms at the example "
                          f"inputs): {timings}")
    return passed[0], timings
