"""The other exporter path, for ``export_onnx(optimize="fastest")``: the TorchScript exporter
(``torch.onnx.export(dynamo=False)``) and onnxruntime's transformer optimizer on its graph.

On BERT-family encoders on CPU the TorchScript exporter's graph, fused by
``onnxruntime.transformers.optimizer`` (whose attention patterns follow that exporter's graphs
of eager attention), is as fast as or up to 4 % faster than the dynamo exporter's graph with
onnxscript's fusions (benchmarks/results/deploy_quiet.json). Which one wins depends on the model
and the machine, so `export_onnx` measures instead of guessing.

- `eager_module`: the module the TorchScript exporter traces: for a `FoldedModel` without dense
  adapters, its ``base_model`` (your class, merged weights): the same code the base model runs.
- `torchscript_export`: trace the tensor leaves of the example call into an ONNX file whose
  inputs and outputs are those of the dynamo export (same names, same order, same dynamic dims).
- `ort_transformers`: ``onnxruntime.transformers.optimizer.optimize_model`` with the model
  type, heads and hidden size read from a Hugging Face config (None when it has none the
  optimizer knows).
- `torchscript_candidates` / `time_candidates`: the staged files `export_onnx` verifies, and
  their side-by-side latency.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from capaboost_fx.errors import ExportError, MissingDependencyError
from capaboost_fx.model import FoldedModel
from capaboost_fx.onnx.optimize import ort_optimizer
from capaboost_fx.onnx.options import Candidate, ExampleCall, ExportOptions, use_external_data
from capaboost_fx.onnx.runtime import open_session
from capaboost_fx.onnx.shapes import eval_mode, flat_outputs, flat_tensors
from capaboost_fx.onnx.stats import onnx_stats
from capaboost_fx.onnx.timing import measure_latency

__all__ = ["eager_module", "folded_eager", "ort_transformers", "time_candidates", "torchscript_candidates",
           "torchscript_export"]


def folded_eager(module: FoldedModel) -> nn.Module:
    """A folded module's eager model with merged weights: your model's class
    (``get_base_model()``)."""
    return module.get_base_model()


def eager_module(module: nn.Module) -> nn.Module | None:
    """What the TorchScript exporter should trace for `module`, or None when nothing fits (a
    folded module that keeps dense adapters, an exported program)."""
    if isinstance(module, FoldedModel):
        if getattr(module, "capaboost_dense", None) is not None:
            return None
        return folded_eager(module)
    if isinstance(module, torch.fx.GraphModule):  # torch.export(...).module(): ATen already
        return None
    return module


@contextlib.contextmanager
def _eager_attention(module: nn.Module) -> Iterator[None]:
    """Hugging Face models run eager attention while traced (the optimizer's Attention fusion
    matches that graph); the setting is given back afterwards."""
    config = getattr(module, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = getattr(module, "set_attn_implementation", None)
    changed = False
    if before not in (None, "eager") and callable(switch):
        try:
            switch("eager")
            changed = True
        except Exception:  # the model has no eager path: trace what it has
            changed = False
    try:
        yield
    finally:
        if changed:
            switch(before)


@contextlib.contextmanager
def _no_native_stdout() -> Iterator[None]:
    """Silence file descriptor 1 while the TorchScript exporter runs: torch 2.13's
    ``setup_onnx_logging`` tests a function object for truth, so its ONNX log is always on,
    and on a failure it writes the whole TorchScript IR to stdout from C++."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (some embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class _Flat(nn.Module):
    """Positional tensors in, a tuple of tensors out: the call the TorchScript exporter traces."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.module = module
        leaves, self._spec = pytree.tree_flatten((args, kwargs))
        self._slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self._leaves = leaves

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = list(self._leaves)
        for slot, t in zip(self._slots, tensors, strict=True):
            leaves[slot] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return tuple(flat_outputs(self.module(*args, **kwargs)))


def torchscript_export(module: nn.Module, args: tuple, kwargs: Mapping[str, Any], path: Path,
                       input_names: list[str], output_names: list[str],
                       dynamic: Mapping[str, Mapping[int, str]], opset: int | None) -> None:
    """Write `path` with the TorchScript exporter. `dynamic`: ``{input name: {dim: name}}``
    as in the dynamo export, so both files take the same feeds."""
    flat = _Flat(module, tuple(args), dict(kwargs))
    tensors = tuple(x for x in pytree.tree_leaves((tuple(args), dict(kwargs)))
                    if isinstance(x, torch.Tensor))
    axes = {n: dict(d) for n, d in dynamic.items() if d}
    with _eager_attention(module), warnings.catch_warnings(), torch.no_grad(), \
            _no_native_stdout():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(flat, tensors, os.fspath(path), dynamo=False,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, opset_version=opset or 17)
        except Exception as e:  # its message can hold the whole TorchScript IR: first line
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ExportError(f"the TorchScript exporter failed: {type(e).__name__}: {first}") \
                from e
        sizes: dict[int, set[str]] = {}
        for name, t in zip(input_names, tensors, strict=False):
            for d, axis in axes.get(name, {}).items():
                sizes.setdefault(int(t.shape[d]), set()).add(axis)
        outputs = flat(*tensors)
    _name_output_axes(path, outputs, sizes)


def _name_output_axes(path: Path, outputs: tuple[torch.Tensor, ...],
                      sizes: dict[int, set[str]]) -> None:
    """Name the TorchScript file's symbolic output dims (``Gemmlogits_dim_0``) as the dynamo
    file does (``batch``, ``sequence``): a symbolic dim 0 or 1 whose example size is one input
    axis's, and only that one's."""
    import onnx

    model = onnx.load(os.fspath(path))
    changed = False
    for out, t in zip(model.graph.output, outputs, strict=False):
        for d, dim in enumerate(out.type.tensor_type.shape.dim):
            if d > 1 or not dim.dim_param or d >= t.ndim:
                continue
            axis = sizes.get(int(t.shape[d]), set())
            if len(axis) == 1:
                dim.dim_param = next(iter(axis))
                changed = True
    if changed:
        onnx.save(model, os.fspath(path))


def ort_transformers(src: Path, dst: Path, module: nn.Module) -> dict[str, int] | None:
    """Fuse `src` with onnxruntime's transformer optimizer into `dst`; None (and no file) when
    `module` has no Hugging Face config of a model type the optimizer knows."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    try:
        MODEL_TYPES, optimize_model = ort_optimizer()
    except MissingDependencyError:
        return None
    if model_type not in MODEL_TYPES:
        return None
    heads = getattr(config, "num_attention_heads", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    # Its fusion modules log under their own top-level names (fusion_embedlayer, ...), at
    # warning level, for every pattern they skip.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            opt = optimize_model(os.fspath(src), model_type=model_type, num_heads=heads,
                                 hidden_size=hidden, opt_level=0)
        opt.save_model_to_file(os.fspath(dst))
        stats = opt.get_fused_operator_statistics()
    except Exception as e:
        raise ExportError(f"onnxruntime's transformer optimizer failed: {e}") from e
    finally:
        logging.disable(previous)
    return {k: int(v) for k, v in stats.items() if v}


DESCRIBE = {"none": "the exporter's unfused graph", "ort": "the fused dynamo graph",
             "torchscript": "the TorchScript exporter's graph",
             "torchscript+ort": "the TorchScript graph fused by onnxruntime"}


def _torchscript_axes(call: ExampleCall, names: list[str],
                      plain: Path | None) -> dict[str, dict[int, str]]:
    """``{input name: {dim: axis name}}`` for the TorchScript file: the dynamo file's dims when
    there is one; else the call's dims (the captured graph's, for capaboost_fx modules). An
    eager module with auto dims is traced by TorchScript alone, which cannot tell which dims
    the model fixes: batch (dim 0) of every input and sequence (dim 1) of integer inputs."""
    if plain is not None:
        return {i["name"]: {d: v for d, v in enumerate(i["shape"]) if isinstance(v, str)}
                for i in onnx_stats(plain).inputs}
    tensors = flat_tensors(call.args, call.kwargs)
    shapes = call.dynamic_shapes or {}
    flat_dims: list[Any] = []
    positional = list(inspect.signature(call.module.forward).bind_partial(*call.args).arguments)
    for key, value in [(k, v) for k, v in zip(positional, call.args, strict=False)] \
            + list(call.kwargs.items()):
        spec = shapes.get(key) if isinstance(shapes, dict) else None
        leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
        specs = pytree.tree_leaves(spec, is_leaf=lambda x: x is None or isinstance(x, dict))
        flat_dims += specs if len(specs) == len(leaves) else [None] * len(leaves)
    guess = call.shape_note.startswith("auto")
    axes = {}
    for name, t, dims in zip(names, tensors, flat_dims, strict=False):
        keep = [d for d in (dims or {}) if not guess or d == 0
                or (d == 1 and not t.dtype.is_floating_point)]
        axes[name] = {d: ("batch" if d == 0 else "sequence" if d == 1 else f"dim_{d}")
                      for d in keep}
    return axes


def torchscript_candidates(call: ExampleCall, opts: ExportOptions, tmpdir: Path, final: Path,
                           plain: Path | None = None,
                           axes: dict[str, dict[int, str]] | None = None) -> list[Candidate]:
    """The TorchScript exporter's graph (and onnxruntime's transformer optimizer on it, unless
    `opts.optimize` pins the plain one); [] with a note when it cannot be made. It needs no
    dynamo export: `plain`, the dynamo file, only lends its input dims when there is one;
    `axes` (``{input: {dim: name}}``) names the dynamic dims outright."""
    eager = eager_module(call.module)
    why = ("the module has no eager form to trace (dense adapters, or an exported program)"
           if eager is None else
           "weights over the external-data threshold (the TorchScript path is for small "
           "models)" if use_external_data(call, opts) else None)
    if why:
        call.notes.append(f"TorchScript exporter skipped: {why}")
        return []
    names = call.input_names(opts.input_names)
    (tmpdir / "ts").mkdir()
    ts = tmpdir / "ts" / final.name
    try:
        with eval_mode(eager):
            torchscript_export(eager, call.args, call.kwargs, ts, names, call.output_names,
                               axes if axes is not None else
                               _torchscript_axes(call, names, plain), opts.opset)
    except ExportError as e:
        call.notes.append(f"TorchScript exporter skipped: {e}")
        return []
    out = [Candidate("torchscript", ts)]
    if opts.optimize != "torchscript":
        (tmpdir / "ts_ort").mkdir()
        fused_path = tmpdir / "ts_ort" / final.name
        try:
            fused = ort_transformers(ts, fused_path, eager)
            if fused is None:
                model_type = getattr(getattr(eager, "config", None), "model_type", None)
                call.notes.append("onnxruntime's transformer optimizer skipped: it knows no "
                                  f"model type {model_type!r}")
            else:
                out.insert(0, Candidate("torchscript+ort", fused_path, fused))
        except ExportError as e:
            call.notes.append(f"onnxruntime's transformer optimizer skipped: {e}")
    return out


def time_candidates(passed: list[tuple[str, Path]], args: tuple, kwargs: dict, providers: Any,
                    session: Mapping[str, Any] | None = None,
                    runs: int = 25) -> dict[str, float]:
    """Median latency (ms) of each verified graph at the example inputs, side by side, in
    sessions opened with `session` (`open_session` keywords: the serving configuration,
    since which graph wins depends on threads and spinning)."""
    feeds_list = flat_tensors(args, kwargs)
    options = {"providers": providers, **dict(session or {})}
    sessions = {kind: open_session(staged, **options) for kind, staged in passed}
    feeds = {k: dict(zip(s.input_names, feeds_list, strict=True)) for k, s in sessions.items()}
    stats = measure_latency(sessions, feeds, runs=runs, warmup=3 if runs >= 25 else 1)
    return {k: round(v.median_ms, 3) for k, v in stats.items()}
