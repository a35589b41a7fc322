"""The typed inputs of `export_onnx`: how to write and check the file (`ExportOptions`) and the
example call as the exporters see it (`ExampleCall`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capaboost_fx.errors import InputError, close_names
from capaboost_fx.onnx.optimize import EXTERNAL_DATA_THRESHOLD, check_options
from capaboost_fx.onnx.shapes import (
    as_args,
    choose_dynamic_shapes,
    eval_mode,
    input_names_of,
    output_names,
    without_cache,
)
from capaboost_fx.onnx.verify import DEFAULT_ATOL, DEFAULT_RTOL, VerifyResult
from capaboost_fx.passes.capture import bind_static, split_static_kwargs

__all__ = ["Candidate", "ExampleCall", "ExportOptions", "example_call", "use_external_data"]


@dataclass(frozen=True)
class ExportOptions:
    """How `export_onnx` writes and checks the file. Every field has a default; pass the ones
    you change as keywords of `export_onnx` (``optimize="none"``) or as one object
    (``options=ExportOptions(...)``, e.g. shared by several exports).

    Attributes:
        optimize: "auto" (default): a fixed order learned from the deploy benchmarks
            (docs/deploy.md): for a module with an eager form (your model, a fold's eager
            model) that does not generate, the TorchScript exporter's plain graph, when it
            makes one that verifies (generative models: the dynamo exporter first);
            else the dynamo exporter's graph, fused ("ort"), then plain; a fixed order, so a
            model and its fold get the same kind of graph; "ort": onnxruntime's
            transformer fusions on the dynamo exporter's graph, the plain graph written
            instead (with a warning) should the fused one fail verification; "none": the
            exporter's graph; "fastest": the dynamo and the
            TorchScript exporters' graphs, each plain and fused, verified and timed side by
            side, the fastest written; "torchscript" / "torchscript+ort": the TorchScript
            exporter (``dynamo=False``) only, its graph plain or fused by
            ``onnxruntime.transformers``: a path that does not need the dynamo exporter
            (it falls back to it, with a warning, only when the module has no eager form).
        quantize: "int8" writes a dynamically quantized model; verification then reports
            the difference and the argmax agreement instead of demanding `atol`.
        verify: compare onnxruntime with PyTorch at the example shape and a second shape, at
            two graph optimization levels, before the file lands.
        rtol, atol: the verification tolerance, ``|ort - torch| <= atol + rtol * |torch|``.
        opset: the ONNX opset (default: the exporter's).
        input_names, output_names: graph input / output names (default: the forward's
            argument names; the output structure's names, ``logits``, ``output_0``, ...).
        external_data: weights in ``<path>.data`` (default: when they exceed
            `external_data_threshold` bytes; protobuf cannot hold 2 GiB).
        providers: onnxruntime providers for verification ("auto": CUDA when usable).
        timing_session: `open_session` keywords for timing the "fastest" candidates (the winner
            depends on threads and spinning: time them as you will serve).
        multi_lora: export a training module as a multi-LoRA base: the unmerged model with
            each target's rank-d·r adapter as overridable initializers, switched per run by
            ``.onnx_adapter`` files (`capaboost_fx.onnx.multi_lora`, `save_onnx_adapter`).
    """

    optimize: str = "auto"
    quantize: str | None = None
    verify: bool = True
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    opset: int | None = None
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    external_data: bool | None = None
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    providers: str | Sequence[str] = "auto"
    timing_session: Mapping[str, Any] | None = None
    multi_lora: bool = False

    def __post_init__(self) -> None:
        optimize, quantize = check_options(self.optimize, self.quantize)
        object.__setattr__(self, "optimize", optimize)
        object.__setattr__(self, "quantize", quantize)

    @classmethod
    def of(cls, options: ExportOptions | None, fields: Mapping[str, Any]) -> ExportOptions:
        """`options` (or the defaults) with `fields` replaced; unknown names fail with the
        closest field names."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in fields if k not in known]
        if unknown:
            raise InputError(
                f"export_onnx got unknown option(s) {unknown}"
                + "".join(f"; {k!r}: {close_names(k, known)}" for k in unknown)
                + f". Options: {known}"
            )
        if options is not None and not isinstance(options, ExportOptions):
            raise InputError(f"options must be an ExportOptions, got {type(options).__name__}")
        return dataclasses.replace(options or cls(), **fields)


@dataclass
class ExampleCall:
    """The example call being exported: the module, its inputs and output names, the dims
    that stay dynamic (and why), and the notes the export collects for its report."""

    module: nn.Module
    args: tuple
    kwargs: dict
    reference: Any
    output_names: list[str]
    dynamic_shapes: Any
    shape_note: str
    notes: list[str] = field(default_factory=list)
    # (input name, dim) -> the model's line that fixed it, seen while torch.export traced
    specialized: dict[tuple[str, int], str] = field(default_factory=dict)

    def input_names(self, user: Sequence[str] | None) -> list[str]:
        return list(user) if user is not None else input_names_of(self.module, self.args,
                                                                  self.kwargs)


def _reference(module: nn.Module, args: tuple, kwargs: dict, notes: list[str]) -> Any:
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
    return reference


@contextlib.contextmanager
def example_call(module: nn.Module, example_inputs: Any, example_kwargs: Any,
                 dynamic_shapes: Any, opts: ExportOptions) -> Iterator[ExampleCall]:
    """Run the example once (the reference, and the output names), choose the dynamic dims, and
    hold tensor-free keywords (``use_cache=False``) fixed while the exporters trace."""
    args = as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    with contextlib.ExitStack() as bound:
        if not hasattr(module, "expose_signature_for"):
            # Tensor-free keywords are fixed, not inputs of the file: the rule capture follows
            # (a captured module bakes them into its graph).
            static, kwargs = split_static_kwargs(kwargs)
            bound.enter_context(bind_static(module, static))
        notes: list[str] = []
        reference = _reference(module, args, kwargs, notes)
        names = (list(opts.output_names) if opts.output_names is not None
                 else output_names(reference))
        if dynamic_shapes is None:
            dynamic_shapes, shape_note = choose_dynamic_shapes(module, args, kwargs)
        else:
            shape_note = "user"
        yield ExampleCall(module, args, kwargs, reference, names, dynamic_shapes, shape_note,
                          notes)


@dataclass
class Candidate:
    """One staged ONNX file: what it holds (`kind`: "ort", "none", "torchscript",
    "torchscript+ort"), where, what fused, and once checked, its verification."""

    kind: str
    path: Path
    fusions: dict[str, int] = field(default_factory=dict)
    quantized_ops: dict[str, int] = field(default_factory=dict)
    result: VerifyResult | None = None


def use_external_data(call: ExampleCall, opts: ExportOptions) -> bool:
    """Weights in a ``.data`` file: as asked, else when the module's tensors exceed the
    threshold (protobuf cannot hold 2 GiB)."""
    if opts.external_data is not None:
        return opts.external_data
    seen, nbytes = set(), 0
    for t in list(call.module.parameters()) + list(call.module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            nbytes += t.numel() * t.element_size()
    return nbytes > opts.external_data_threshold
