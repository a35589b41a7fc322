"""Prove that an ONNX file computes what the PyTorch module computes.

`verify_onnx` runs the file in onnxruntime and the module in PyTorch on the same inputs: the
example, then the example resized along the graph's dynamic dims (batch + 1, sequence - 1), and
each under several onnxruntime graph optimization levels — by default ``all`` (how it is served)
and ``disable`` (the graph exactly as written, so that an onnxruntime rewrite cannot hide an
exporter bug, nor the other way round). Values are compared with `torch.testing.assert_close`.

Example::

    from capaboost_fx.onnx import verify_onnx
    res = verify_onnx("model.onnx", deploy, (ids,), {"attention_mask": mask})
    res.max_abs_diff, res.shapes, res.optimization_levels
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from capaboost_fx.errors import CapaBoostWarning, InputError, VerificationError
from capaboost_fx.onnx.runtime import open_session
from capaboost_fx.onnx.shapes import as_args, eval_mode, flat_outputs, flat_tensors, second_inputs
from capaboost_fx.onnx.stats import onnx_stats

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4
LEVELS = ("all", "disable")

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "LEVELS", "VerifyResult", "verify_onnx"]


@dataclass
class VerifyResult:
    """What `verify_onnx` compared and how far apart ONNX and PyTorch were."""

    max_abs_diff: float
    per_output: dict[str, float]
    shapes: list[dict[str, list[int]]]  # input shapes checked, one dict per shape
    providers: list[str]
    notes: list[str] = field(default_factory=list)
    optimization_levels: list[str] = field(default_factory=list)  # each shape ran under each
    within_tolerance: bool = True  # every value within atol + rtol * |torch|
    # Per float output with >= 2 dims: fraction of rows (all leading dims) whose argmax over the
    # last dim is PyTorch's, pooled over shapes and levels. The figure for quantized models.
    argmax_agreement: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(x))


def _check_output(
    name: str,
    got: Any,
    want: torch.Tensor,
    rtol: float,
    atol: float,
    where: str,
    strict: bool,
) -> tuple[float, bool, tuple[int, int] | None]:
    """(max abs diff, within tolerance, (rows agreeing on argmax, rows)) of one output."""
    a, b = _as_tensor(got), _as_tensor(want)
    if tuple(a.shape) != tuple(b.shape):
        raise VerificationError(
            f"output {name!r} {where}: ONNX shape {list(a.shape)} != PyTorch shape {list(b.shape)}"
        )
    floating = a.is_floating_point() or b.is_floating_point()
    if floating:
        a, b = a.double(), b.double()
    else:
        a, b = a.long(), b.long()
    diff = (a - b).abs().double()
    if floating:
        diff = torch.where(a.isnan() & b.isnan(), 0.0, diff).nan_to_num(nan=float("inf"))
    worst = float(diff.max()) if diff.numel() else 0.0
    try:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, check_dtype=False)
        close = True
    except AssertionError as e:
        close = False
        if strict:
            detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise VerificationError(
                f"output {name!r} {where} differs from PyTorch: max abs diff {worst:.3g} "
                f"(atol={atol:g}, rtol={rtol:g}): {detail}"
            ) from None
    agree = None
    if floating and b.ndim >= 2 and b.shape[-1] > 1 and b.numel():
        same = a.argmax(-1) == b.argmax(-1)
        agree = (int(same.sum()), same.numel())
    return worst, close, agree


Case = tuple[dict[str, torch.Tensor], list[torch.Tensor]]  # (onnxruntime feeds, torch outputs)


def _cases(path: Any, module: nn.Module, args: tuple, kwargs: dict, second_shape: bool,
           notes: list[str]) -> list[Case]:
    """The inputs to compare at: the example, and (`second_shape`) the example resized along
    the file's dynamic dims, each with PyTorch's outputs."""
    graph = onnx_stats(path)
    input_names = [i["name"] for i in graph.inputs]
    n_outputs = len(graph.outputs)
    specs = [(i["name"], i["dtype"], i["shape"]) for i in graph.inputs]
    if len(flat_tensors(args, kwargs)) != len(specs):
        raise VerificationError(
            f"{path} takes {len(specs)} inputs {input_names}, the example has "
            f"{len(flat_tensors(args, kwargs))} tensors"
        )
    cases: list[Case] = []

    def add(a: tuple, k: dict, reference: Any) -> None:
        want = flat_outputs(reference)
        if len(want) != n_outputs:
            raise VerificationError(
                f"{path} has {n_outputs} outputs {[o['name'] for o in graph.outputs]}, the "
                f"module returns {len(want)} tensors"
            )
        cases.append((dict(zip(input_names, flat_tensors(a, k), strict=True)), want))

    with eval_mode(module), torch.no_grad():
        add(args, kwargs, module(*args, **kwargs))
        if not second_shape:
            return cases
        resized = None
        for batch_only in (False, True):
            resized = second_inputs(args, kwargs, specs, batch_only)
            if resized is None:
                notes.append("the ONNX graph has no dynamic input dims; checked one shape")
                break
            try:
                reference = module(*resized[0], **resized[1])
            except Exception as e:  # PyTorch itself refuses this shape (e.g. fixed image size):
                # reported in the notes and warned below, never silent
                notes.append(f"PyTorch refused resized inputs (batch_only={batch_only}): {e}")
                continue
            add(*resized, reference)
            break
    if len(cases) == 1 and resized is not None:
        warnings.warn(CapaBoostWarning(f"{path}: verified at the example's shape only; "
                                       f"{notes[-1]}"), stacklevel=3)
    return cases


def verify_onnx(
    path: str | os.PathLike,
    module: nn.Module,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    # Ten parameters: the file, the module, its example call, and six independent checks'
    # settings, each with a default; keywords, as for torch.testing.assert_close.
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    second_shape: bool = True,
    providers: str | Sequence[str] = "auto",
    optimization_levels: Sequence[str] = LEVELS,
    strict: bool = True,
) -> VerifyResult:
    """Run `path` in onnxruntime and `module` in PyTorch on the same inputs; raise if they differ.

    Checks the example inputs, then (`second_shape`) the same inputs resized along the graph's
    dynamic dims (batch + 1, sequence - 1, values reused cyclically), each in a session at every
    graph optimization level of `optimization_levels` ("all", "extended", "basic", "disable").
    With `strict`, a difference beyond ``atol + rtol * |torch|`` (`torch.testing.assert_close`)
    raises `VerificationError` naming the output, the input shapes, the level and the size of
    the difference; without it (quantized models) the differences and the argmax agreement are
    only reported. A wrong output shape or count always raises. Outputs are matched in order
    (the tensors of the module's output structure, flattened).

    Example::

        res = verify_onnx("model.onnx", deploy, (ids,), {"attention_mask": mask})
        res.max_abs_diff, res.shapes
        q = verify_onnx("model.int8.onnx", deploy, (ids,), strict=False)
        q.argmax_agreement["logits"]
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(module, nn.Module):
        raise InputError(
            f"verify_onnx(path, module, ...) takes the ONNX file's path and the PyTorch module; "
            f"got {type(path).__name__} and {type(module).__name__}")
    levels = list(dict.fromkeys(optimization_levels))
    if not levels:
        raise VerificationError("optimization_levels is empty; use e.g. ('all', 'disable')")
    notes: list[str] = []
    cases = _cases(path, module, as_args(example_inputs), dict(example_kwargs or {}),
                   second_shape, notes)
    output_names = [o["name"] for o in onnx_stats(path).outputs]
    per_output: dict[str, float] = {}
    agreement: dict[str, list[int]] = {}
    close_everywhere = True
    taken: list[str] = []
    for level in levels:
        session = open_session(path, providers=providers, graph_optimization_level=level)
        taken = taken or session.providers
        for feeds, want in cases:
            shape = {n: list(v.shape) for n, v in feeds.items()}
            where = f"at input shapes {shape} (onnxruntime graph optimizations: {level})"
            try:
                got = session.run(feeds)
            except Exception as e:
                raise VerificationError(f"onnxruntime failed on {path} {where}: {e}") from e
            for name, ref in zip(output_names, want, strict=True):
                worst, close, agree = _check_output(
                    name, got[name], ref, rtol, atol, where, strict
                )
                per_output[name] = max(per_output.get(name, 0.0), worst)
                close_everywhere &= close
                if agree is not None:
                    total = agreement.setdefault(name, [0, 0])
                    total[0] += agree[0]
                    total[1] += agree[1]
        del session
    return VerifyResult(
        max_abs_diff=max(per_output.values(), default=0.0),
        per_output=per_output,
        shapes=[{n: list(v.shape) for n, v in feeds.items()} for feeds, _ in cases],
        providers=taken,
        notes=notes,
        optimization_levels=levels,
        within_tolerance=close_everywhere,
        argmax_agreement={n: a / r for n, (a, r) in agreement.items() if r},
    )
