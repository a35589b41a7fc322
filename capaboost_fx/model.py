"""The modules capaboost_fx returns.

`CapaBoostModel` (training) owns three explicit things:

- ``wrapped``: your model's structure over your storage (nothing copied; ``spec.trainable``
  parameters and buffers the graph writes are private copies), with one `CapaBoostAdapter`
  registered beside each adapted weight; its ``config`` and ``generation_config`` are your
  model's own objects;
- ``adapter_paths``: the adapter registry (target name -> module path), the only way anything
  finds adapters (fold, save, load, state_dict, generate, PEFT export);
- ``executor``: how a call runs (`capaboost_fx.executors`: captured graphs or your model's own
  modules), chosen once by `capaboost_fx.transform`.

`FoldedModel` (deploy): your model with merged weights (``wrapped``) and the executor the
training module handed back for it.

Both behave as your model (`capaboost_fx.hf_face`). ``forward`` is served from the class
with the signature of the calls the executor runs (the HF Trainer routes batch columns by it).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .adapter import CapaBoostAdapter
from .adapter_file import (
    ADAPTER_FILE,
    HEADER_KEY,
    check_state_header,
    gather_guard,
    state_header,
    write_adapter,
)
from .errors import CapaBoostError, FoldError, NotTransformedError
from .hf_face import ModelFace, TrainingFace
from .merge import base_weight, foldable, merged_weights, refuse_nonlinear, structure_copy
from .structure import is_quantized, is_sharded


class _SignedForward:
    """``forward`` of the capaboost_fx modules, served from the class: the executor's method
    with the signature of the calls it runs (a non-data descriptor: TRL and accelerate may
    still set an instance ``forward``, as on any model)."""

    @staticmethod
    def _unbound(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call(args, kwargs)

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:  # on the class: a plain function, as any forward
            return self._unbound
        return obj.executor.bound_forward(obj)


def constants_module(constants: dict[str, torch.Tensor]) -> nn.Module:
    """Tensor constants the captured graphs lift (``capaboost_constants.<name>``): buffers, so
    they move with ``.to()``; never saved."""
    holder = nn.Module()
    for key, value in constants.items():
        holder.register_buffer(key, value, persistent=False)
    return holder


class _Unpicklable:
    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # copy.deepcopy works (pickling does not): the state, the executor's own copy of its
        # run-time state (a graph executor shares its meta twin and compiled graphs)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce_ex__(self, protocol: int) -> Any:
        raise CapaBoostError(
            f"{type(self).__name__} cannot be pickled (torch.save(module)): it runs compiled "
            "graphs. Save what it holds instead: capaboost_fx.save_adapter(train_model, path) "
            "for the adapter, or capaboost_fx.merged_state_dict(train_model) / "
            "deploy.save_pretrained(...) for merged weights."
        )


@dataclass
class CaptureInfo:
    """What `transform` did (``train_model.capture_info``); `to_dict()` is JSON-safe."""

    capture: str  # "graph" (torch.export + fx passes) or "eager" (hooks on linear modules)
    targets: list[str]  # the adapted targets
    skipped: dict[str, str]  # candidates that cannot be adapted, and why
    trainable: list[str]  # what Spec.trainable opened
    blocks: list[str]  # per-block programs (graph) or the model's own layers (eager)
    explicit_blocks: list[str] = field(default_factory=list)  # named by blocks=/checkpoint=
    checkpointed: list[str] = field(default_factory=list)  # blocks checkpointed now
    refused_blocks: dict[str, str] = field(default_factory=dict)  # planned blocks the split refused
    eager_reason: str | None = None  # why the eager path was taken
    export_seconds: float = 0.0  # all torch.export calls inside transform
    transform_seconds: float = 0.0  # transform's wall time, captures included
    sites: dict[str, int] = field(default_factory=dict)  # rewritten linear ops per mode
    dynamic_ranges: dict[str, str] = field(default_factory=dict)  # captured symbolic ranges
    # Captures after transform (a new argument structure, mode, autocast state or
    # model-fixed size), each with its time: {"mode", "variant", "export_seconds", "seconds",
    # "fixed_sizes"}.
    later_captures: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dynamic_ranges"] = {str(k): str(v) for k, v in self.dynamic_ranges.items()}
        return out


class _Module(_Unpicklable, nn.Module):
    """What both modules share: the wrapped model, the executor, the captured constants."""

    executor: Any  # an `executors.Executor` (the pipeline, a layer above, makes it)

    def _init_module(self, wrapped: nn.Module, executor: Any,
                     constants: dict[str, torch.Tensor]) -> None:
        self.wrapped = wrapped
        self.capaboost_constants = constants_module(constants)
        self.executor = executor

    def mode(self) -> str:
        return "train" if self.training else "eval"

    @property
    def graphs(self) -> dict[str, fx.Graph]:
        """The fx graph of each mode of the first argument structure (graph path)."""
        variants = getattr(self.executor, "variants", None)
        if not variants:
            raise CapaBoostError(f"this {type(self).__name__} runs the model eagerly "
                                 "(capture='eager'): it holds no graph.")
        return variants[0].graphs

    @property
    def code(self) -> dict[str, str]:
        """The Python each mode's graph compiles to (first argument structure)."""
        self.graphs  # noqa: B018 - the same error for an eager module
        return self.executor.variants[0].code

    def recompile(self) -> None:
        """Regenerate the code of every graph after a graph was changed in place."""
        for v in getattr(self.executor, "variants", ()):
            v.compile()

    def dynamic_shapes_for(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        """``dynamic_shapes`` for exporting this call (``torch.export``, ONNX), read from the
        captured graph (None on the eager path: the exporter decides)."""
        return self.executor.dynamic_shapes_for(self, tuple(args), dict(kwargs))

    def runs_as(self) -> nn.Module:
        """What an exporter should trace: this module (captured graphs) or, on the eager
        path, the model it runs (your class)."""
        return self.executor.runs_as(self)

    def expose_signature_for(self, args: tuple, kwargs: dict) -> None:
        """Make ``forward``'s visible signature the one of this call (what tools that bind
        arguments by signature, such as torch.export and the ONNX exporter, then see)."""
        self.executor.prepare_export(self, tuple(args), dict(kwargs))


class CapaBoostModel(TrainingFace, _Module):
    """The training module `transform` returns (see the module docstring). Call it exactly
    as you call your model (any argument structure; a new one is captured once on the graph
    path); ``.train()`` / ``.eval()`` behave as on your model, and so do its attributes,
    ``generate`` and the PEFT methods scripts call (`capaboost_fx.hf_face`).

    ``state_dict()`` holds what training changes (the adapters' A and B, ``spec.trainable``
    parameters, buffers the graph writes) and a header (spec, base fingerprint, mask
    checksums): Trainer checkpoints are adapter-sized, and ``load_state_dict`` refuses a
    checkpoint of another spec or base. Masks are regenerated from the spec's seed and
    verified against the header's checksums."""

    def __init__(self, wrapped: nn.Module, spec: Any, info: CaptureInfo,
                 executor: Any) -> None:
        super().__init__()
        self._init_module(wrapped, executor, {})
        self.spec = spec
        self.capture_info = info
        # Shell buffers that are private copies (the graph writes them: batch-norm
        # statistics), by name: saved with the adapter state, snapshotted by the fold.
        self.private_buffers: set[str] = set()
        self.fused_head: dict[str, Any] | None = None  # TRL's fused LM head settings
        self.adapter_paths: dict[str, str] = {
            m.name: path for path, m in wrapped.named_modules()
            if isinstance(m, CapaBoostAdapter)}
        self.header = state_header(self)
        self.register_state_dict_post_hook(_training_state)
        self._register_load_state_dict_pre_hook(_check_header, with_module=True)
        self.register_load_state_dict_post_hook(_allow_missing_frozen)

    forward = _SignedForward()

    def _call(self, args: tuple, kwargs: dict) -> Any:
        if "fused_lm_head" in kwargs:  # TRL's trainers (`hf_face.TrainingFace.__setattr__`)
            kwargs = dict(kwargs)
            if kwargs.pop("fused_lm_head"):
                return self.executor.fused_call(self, args, kwargs, self.fused_head)
        return self.executor.run(self, args, kwargs)

    def adapters(self) -> dict[str, CapaBoostAdapter]:
        """``{target name: adapter}``, from the registry."""
        return {n: self.wrapped.get_submodule(p) for n, p in self.adapter_paths.items()}

    def blocks(self) -> dict[str, nn.Module]:
        """``{name: block}``: the modules to give ``fully_shard`` or checkpointing, in order
        (per-block programs on the graph path, your model's own layers on the eager path)."""
        return self.executor.blocks(self)

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True,
                        **kwargs: Any) -> Path:
        """Write the adapter (and ``spec.trainable`` tensors) into `save_directory` as
        ``capaboost_adapter.safetensors``; `capaboost_fx.load_adapter(model, dir)` reads it.
        A collective after per-block FSDP2: every rank calls it (sharded tensors are
        gathered); only the main process writes. Other keyword arguments of
        ``PreTrainedModel.save_pretrained`` are accepted and ignored."""
        out = Path(save_directory)
        if is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        write_adapter(self, out / ADAPTER_FILE, main_process=is_main_process)
        return out

    def kept_state(self) -> set[str]:
        """Names (in ``state_dict``) of what training changes: the adapters' parameters,
        the parameters that require grad, the private buffers."""
        keep = {f"wrapped.{p}.{n}" for p in self.adapter_paths.values()
                for n, _ in self.wrapped.get_submodule(p).named_parameters()}
        keep |= {f"wrapped.{n}" for n, t in self.wrapped.named_parameters(remove_duplicate=False)
                 if t.requires_grad}
        return keep | {f"wrapped.{n}" for n in self.private_buffers}

    # ------------------------------------------------------------------ the fold

    def fold(self, example_inputs: Any = (), example_kwargs: dict[str, Any] | None = None, *,
             requantize: Callable[[nn.Linear], nn.Module] | None = None) -> FoldedModel:
        """The deploy module (`capaboost_fx.fold`)."""
        if example_inputs or example_kwargs:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            self.executor.ensure(self, args, dict(example_kwargs or {}), "eval")
        adapters = self.adapters()
        quantized = sorted(n for n, a in adapters.items() if a.weight_fqn and is_quantized(
            self.wrapped.get_parameter(a.weight_fqn)))
        if requantize is not None and not quantized:
            raise FoldError("requantize= applies to quantized targets (trained over a "
                            "quantized base); this training module has none.")
        shell = self.fold_shell(merged_weights(self.wrapped, adapters), requantize)
        executor, constants, dense = self.executor.deploy(self, shell)
        fm = FoldedModel(shell, executor, constants, dense)
        fm.fold_info = {"dequantized": quantized,
                        "requantized": quantized if requantize is not None else []}
        return fm

    def fold_shell(self, merged: dict[str, torch.Tensor], requantize: Any = None) -> nn.Module:
        """Your model's own structure over this module's tensors: merged weights for
        targets, private snapshots of what training changed (``trainable``, batch-norm
        statistics), aliases of everything else (no copy); your config objects."""
        own = {id(t) for t in self.parameters() if t.requires_grad}
        own |= {id(b) for n, b in self.wrapped.named_buffers(remove_duplicate=False)
                if n in self.private_buffers}
        return structure_copy(self.executor.structure(self), self.wrapped, merged, own,
                              requantize)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Your model's ``state_dict`` keys with merged weights (`capaboost_fx.merged_state_dict`)."""
        refuse_nonlinear(self.adapters(), "use fold() (it keeps one dense width-d·r adapter each)")
        sharded = is_sharded(self.wrapped)
        if sharded:
            gather_guard(self, "merged_state_dict")
        merged = merged_weights(self.wrapped, self.adapters())
        if sharded:  # the sharded modules themselves: their state, merged
            own = {f"{p}.{n}" for p in self.adapter_paths.values()
                   for n, _ in self.wrapped.get_submodule(p).named_parameters()}
            return {k: merged.get(k, v) for k, v in self.wrapped.state_dict().items()
                    if k not in own}
        return self.fold_shell(merged).state_dict()

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """``{target name: ΔW}`` (see `capaboost_fx.delta_weights`)."""
        out = {}
        for name, a in self.adapters().items():
            if a.linear:
                out[name] = a.delta_weight(torch.promote_types(a.A.dtype, torch.float32))
            elif foldable(a):
                w = base_weight(self.wrapped, a, torch.float32)
                w = (w.T if a.layout == "in_out" else w).to(torch.float32)
                out[name] = a.delta_weight(torch.float32).to(w.device) @ w
        return out

    def extra_repr(self) -> str:
        return (f"targets={len(self.adapter_paths)}, executor={self.executor.kind}, "
                f"spec={self.spec}")


def _training_state(module: CapaBoostModel, state_dict: dict, prefix: str,
                    local_metadata: Any) -> None:
    keep = {prefix + k for k in module.kept_state()}
    for k in [k for k in state_dict if k not in keep]:
        del state_dict[k]  # frozen base (your storage), masks (from the seed), quant state
    text = json.dumps(module.header, sort_keys=True).encode()
    state_dict[prefix + HEADER_KEY] = torch.frombuffer(bytearray(text), dtype=torch.uint8)


def _check_header(module: CapaBoostModel, state_dict: dict, prefix: str, *args: Any) -> None:
    raw = state_dict.pop(prefix + HEADER_KEY, None)
    if raw is not None:
        saved = json.loads(bytes(raw.cpu().to(torch.uint8).tolist()).decode())
        check_state_header(module.header, saved, module.wrapped)


def _allow_missing_frozen(module: CapaBoostModel, incompatible: Any) -> None:
    keep = module.kept_state()
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k in keep]


class FoldedModel(ModelFace, _Module):
    """The deploy module `fold` returns: your model with merged weights (``wrapped``, your
    model's own class and structure; every weight that was not adapted is shared with the
    training module, not copied) and nothing else, run by the executor the training module
    handed back (the captured eval graph, or your model's own forward). Inference-only.
    ``save_pretrained``, ``generate``, ``config`` are your model's. Nonlinear parallel
    adapters (``method="padapter"``) stay as one dense width-d·r adapter each, in
    ``capaboost_dense``."""

    def __init__(self, wrapped: nn.Module, executor: Any,
                 constants: dict[str, torch.Tensor] | None = None,
                 dense: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self._init_module(wrapped, executor, constants or {})
        self.fold_info: dict[str, list[str]] = {"dequantized": [], "requantized": []}
        if dense:
            self.capaboost_dense = nn.ModuleDict(dense)
        self.eval()

    forward = _SignedForward()

    def _call(self, args: tuple, kwargs: dict) -> Any:
        return self.executor.run(self, args, kwargs)

    @property
    def graph(self) -> fx.Graph:
        return self.graphs["eval"]

    def mode(self) -> str:
        return "eval"


def require_training(obj: object, what: str) -> CapaBoostModel:
    """`obj` as a training module, or a `NotTransformedError` saying what to pass instead."""
    if not isinstance(obj, CapaBoostModel):
        hint = ("it is already folded; pass the training module instead"
                if isinstance(obj, FoldedModel) else
                "pass the module capaboost_fx.transform(model, spec, ...) returned")
        raise NotTransformedError(
            f"{what} needs a transformed module, got {type(obj).__name__}: {hint}."
        )
    return obj


__all__ = ["CapaBoostModel", "CaptureInfo", "FoldedModel", "require_training"]
