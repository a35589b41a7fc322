"""The modules capaboost_fx returns, and how they run captured graphs.

`GraphProgram` compiles fx graphs into Python bound to the module itself (as
``fx.GraphModule`` does), so every parameter is looked up at call time: ``.to()``, DDP, FSDP2,
``load_state_dict`` act on one state, seen by every graph.

- `CapaBoostModel` (training): its ``base_model`` is a shell of your model over your storage,
  with one `CapaBoostAdapter` registered beside each adapted weight and each *block*
  (transformer layer) replaced by a `BlockProgram` that runs that block's slice of the graph,
  so ``fully_shard(block)`` and per-block checkpointing work as on an eager model.
- `FoldedModel` (deploy): the captured eval graph with merged weights, nothing else.

Both keep one *variant* per argument structure seen (``tm(ids)``, ``tm(input_ids=...,
labels=...)``) and per mode; a call with a structure not seen yet captures it once, with the
same state, as ``torch.compile`` recompiles on a guard failure.
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import fx, nn

from .adapter import CapaBoostAdapter
from .errors import CapaBoostError, InputError, NotTransformedError
from .model_like import AdapterModelLike, ModelLike
from .passes.diagnose import call_error, forward_failure, refused_call, unknown_arguments
from .variant import Variant, _compile, autocast_state, graph_dynamic_shapes


class _Unpicklable:
    def __reduce_ex__(self, protocol: int) -> Any:
        raise CapaBoostError(
            f"{type(self).__name__} cannot be pickled (torch.save(module)): it runs compiled "
            "graphs. Save what it holds instead: capaboost_fx.save_adapter(train_model, path) "
            "for the adapter, or capaboost_fx.merged_state_dict(train_model) / "
            "deploy.base_model.save_pretrained(...) for merged weights."
        )


class GraphProgram(_Unpicklable, nn.Module):
    """Base of the training and deploy modules: variants of graphs, compiled against ``self``.
    `_build(mode, args, kwargs, variant)` (set by the pipeline) captures what is missing."""

    _build: Callable[..., Variant] | None = None

    def _init_program(self) -> None:
        object.__setattr__(self, "_variants", [])

    def _add_variant(self, variant: Variant) -> None:
        variant.compile()
        if all(v is not variant for v in self._variants):
            self._variants.append(variant)
        if len(self._variants) == 1:
            self._expose_signature(variant)

    def _expose_signature(self, variant: Variant) -> None:
        # Tools such as the HF Trainer read forward's signature to route batch columns.
        def forward(self: GraphProgram, *args: Any, **kwargs: Any) -> Any:
            return type(self).forward(self, *args, **kwargs)

        sig = variant.signature(self._param_names())  # a bound method drops the first parameter: self
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        forward.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *sig.parameters.values()])  # type: ignore[attr-defined]
        self.__dict__["forward"] = types.MethodType(forward, self)

    def mode(self) -> str:
        return "train" if self.training else "eval"

    def expose_signature_for(self, args: tuple, kwargs: dict) -> None:
        """Make ``forward``'s visible signature the one of this call (what tools that bind
        arguments by signature, such as torch.export and the ONNX exporter, then see)."""
        self._expose_signature(self.variant_for(tuple(args), dict(kwargs)))

    def dynamic_shapes_for(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """``dynamic_shapes`` for exporting this call (``torch.export``, ONNX), read from the
        captured graph: the dims that are symbolic there are dynamic, no guessing."""
        variant = self.variant_for(tuple(args), dict(kwargs), "eval")
        graph = variant.graphs.get("eval") or next(iter(variant.graphs.values()))
        names = list(variant.signature(self._param_names()).parameters)
        return graph_dynamic_shapes(graph, variant.in_spec, names, kwargs) or {}

    def _param_names(self) -> list[str]:
        plan = self.__dict__.get("plan")
        twin = self.__dict__.get("_twin") or (plan.twin if plan is not None else None)
        return list(inspect.signature(twin.forward).parameters) if twin is not None else []

    def _run_eager(self, args: tuple, kwargs: dict) -> Any:
        """An eager module's call: your model's own forward, a failure named against the
        arguments of the calls that ran (`run_eagerly`)."""
        return run_eagerly(self.base_model, args, kwargs,
                           self.__dict__.setdefault("_eager_seen", {}))

    def recompile(self) -> None:
        """Regenerate the code of every graph after a graph was changed in place."""
        for v in self._variants:
            v.compile()

    def variant_for(self, args: tuple, kwargs: dict, mode: str | None = None) -> Variant:
        """The variant that runs these inputs in `mode` (and under the current
        ``torch.autocast`` state: an export bakes its casts in), captured now if missing."""
        mode = mode or self.mode()
        state = autocast_state()
        same = [v for v in self._variants if v.autocast == state and v.matches(args, kwargs)]
        found = next((v for v in same if v.fits(args, kwargs)), None)
        if found is not None and mode in found.fns:
            return found
        new_shape = found is None and bool(same)
        if new_shape:
            self._check_new_shape(same)
        if self._build is None:
            raise InputError(
                f"{type(self).__name__} holds no graph for this call in {mode} mode and cannot "
                "capture one. Call it with the argument structure it was built with."
            )
        try:
            variant = self._build(self, mode, args, kwargs, found)
        except CapaBoostError as e:  # say how this call differs from those captured
            sizes = {k: v for v in same for k, v in v.fixed_names().items()}
            inputs = [v.inputs(next(iter(v.graphs)), args, kwargs, self._param_names())
                      for v in (same or self._variants)]
            refused = refused_call(self, sizes if new_shape else None, inputs, e)
            if refused is None and not same:
                known = {n for v in self._variants
                         for n in v.signature(self._param_names()).parameters}
                refused = unknown_arguments(self, kwargs, known, e)
            if refused is None:
                raise
            raise refused from e
        variant.autocast = state
        self._add_variant(variant)
        if new_shape:
            self._warn_new_shape(same)
        return variant

    MAX_SHAPES = 8  # graphs per call structure for sizes the model's code fixes

    def _check_new_shape(self, same: list[Variant]) -> None:
        """A call whose sizes differ where the model's code fixed them at capture: allowed
        (a graph for them is captured once, then warned about once), bounded."""
        fixed = sorted({k for v in same for k in v.fixed_names()})
        if len(same) >= self.MAX_SHAPES:
            raise InputError(
                f"the model's code fixes {fixed} while captured, and {len(same)} sizes there "
                "have graphs already; pad or bucket these inputs to a few sizes.")

    def _warn_new_shape(self, same: list[Variant]) -> None:
        fixed = sorted({k for v in same for k in v.fixed_names()})
        if not self.__dict__.get("_warned_shapes"):
            self.__dict__["_warned_shapes"] = True
            warnings.warn(
                f"the model's code fixed {fixed} to the captured size; this call has another "
                "size there, so a graph was captured for it (seconds, once per size, at most "
                f"{self.MAX_SHAPES}; listed in capture_info.later_captures).", stacklevel=4)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mode = self.mode()
        if torch.compiler.is_dynamo_compiling():  # no capture inside a compiled region
            variant = next((v for v in self._variants if mode in v.fns
                            and v.same_names(args, kwargs)), self._variants[0])
            return variant.run(mode, self, args, kwargs)
        variant = self.variant_for(args, kwargs, mode)
        try:
            return variant.run(mode, self, args, kwargs)
        except torch.OutOfMemoryError:
            raise  # not the inputs' fault: callers catch it to shrink the batch
        except Exception as e:
            if isinstance(e, CapaBoostError) and not getattr(e, "guard", False):
                raise
            inputs = variant.inputs(mode, args, kwargs, self._param_names())
            raise call_error(e, self, mode, *inputs) from e

    @property
    def graphs(self) -> dict[str, fx.Graph]:
        """The fx graph of each mode of the first argument structure."""
        if not self._variants:
            raise CapaBoostError(f"this {type(self).__name__} runs the model eagerly "
                                 "(capture='eager'): it holds no graph.")
        return self._variants[0].graphs

    @property
    def code(self) -> dict[str, str]:
        """The Python each mode's graph compiles to (first argument structure)."""
        return self._variants[0].code

    @property
    def _in_spec(self) -> Any:
        return self._variants[0].in_spec

    @property
    def _out_spec(self) -> Any:
        return self._variants[0].out_spec

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphProgram:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in ("forward", "_generation")}
        new.__dict__.update(copy.deepcopy(state, memo))
        if new._variants:
            new._expose_signature(new._variants[0])
        return new


class BlockProgram(GraphProgram):
    """One block (e.g. ``model.layers.3``) of the training module: the block's own parameters,
    buffers and submodules (adapters included) under their original names, and its slice of
    each captured graph. Call it as the root graph does: ``block(key, *inputs)``.
    ``checkpoint = True`` recomputes the block in backward (activation checkpointing)."""

    def __init__(self, original: nn.Module, name: str) -> None:
        super().__init__()
        self._init_program()
        # Adopt the original block's state as is: same tensors, same names.
        self._parameters = original._parameters
        self._buffers = original._buffers
        self._non_persistent_buffers_set = original._non_persistent_buffers_set
        self._modules = original._modules
        self.training = original.training
        self.block_name = name
        self.block_type = type(original).__name__
        self.checkpoint = False
        object.__setattr__(self, "_fns", {})

    def add_graph(self, key: int, mode: str, graph: fx.Graph) -> None:
        self._fns[(key, mode)] = _compile(graph)[0]
        self._graphs_src = getattr(self, "_graphs_src", {})
        self._graphs_src[(key, mode)] = graph

    def forward(self, key: int, *args: Any) -> Any:  # type: ignore[override]
        fn = self._fns[(key, self.mode())]
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch_checkpoint.checkpoint(fn, self, key, *args, use_reentrant=False)
        return fn(self, key, *args)

    def __deepcopy__(self, memo: dict[int, Any]) -> BlockProgram:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fns", "forward")}
        new.__dict__.update(copy.deepcopy(state, memo))
        object.__setattr__(new, "_fns", {k: _compile(g)[0]
                                         for k, g in new.__dict__.get("_graphs_src", {}).items()})
        return new

    def extra_repr(self) -> str:
        return f"block={self.block_name!r} ({self.block_type}), checkpoint={self.checkpoint}"


def constants_module(constants: dict[str, torch.Tensor]) -> nn.Module:
    holder = nn.Module()
    for key, value in constants.items():
        holder.register_buffer(key, value, persistent=False)  # moves with .to(), never saved
    return holder


def run_eagerly(model: nn.Module, args: tuple, kwargs: dict,
                seen: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None) -> Any:
    """`model`'s own forward; what it raises comes back as a `ForwardError` naming it (and the
    argument to blame, against `seen`: dtype and shape by name of the first call that ran,
    recorded here)."""
    if torch.compiler.is_dynamo_compiling():
        return model(*args, **kwargs)
    try:
        names = list(inspect.signature(model.forward).parameters)[:len(args)]
    except (TypeError, ValueError):
        names = []
    names += [f"args[{i}]" for i in range(len(names), len(args))]
    given = {**dict(zip(names, args, strict=True)), **kwargs}
    try:
        out = model(*args, **kwargs)
    except (CapaBoostError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        raise forward_failure(e, model, given, seen or {}) from e
    if seen is not None and not seen:
        seen.update({n: (t.dtype, tuple(t.shape)) for n, t in given.items()
                     if isinstance(t, torch.Tensor)})
    return out


@dataclass
class CaptureInfo:
    """What `transform` did (``train_model.capture_info``); `to_dict()` is JSON-safe."""

    capture: str  # "graph" (torch.export + fx passes) or "eager" (hooks on linear modules)
    targets: list[str]  # the adapted targets
    skipped: dict[str, str]  # candidates that cannot be adapted, and why
    trainable: list[str]  # what Spec.trainable opened
    blocks: list[str]  # per-block programs (graph) or the model's own layers (eager)
    explicit_blocks: list[str] = field(default_factory=list)  # named by blocks=/checkpoint=
    checkpointed: list[str] = field(default_factory=list)
    refused_blocks: dict[str, str] = field(default_factory=dict)  # planned blocks the split refused
    eager_reason: str | None = None  # why the eager path was taken
    export_seconds: float = 0.0  # all torch.export calls inside transform
    transform_seconds: float = 0.0  # transform's wall time, captures included
    sites: dict[str, int] = field(default_factory=dict)  # rewritten linear ops per mode
    dynamic_ranges: dict[str, str] = field(default_factory=dict)  # captured symbolic ranges
    # Modules whose config.use_cache training switches off; generation and the fold's
    # structure switch it on again (`passes.capture.cache_users`).
    cache_users: list[str] = field(default_factory=list)
    # Captures after transform (a new argument structure, mode or model-fixed size), each with
    # its time: {"mode", "variant", "export_seconds", "seconds", "fixed_sizes"}.
    later_captures: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dynamic_ranges"] = {str(k): str(v) for k, v in self.dynamic_ranges.items()}
        return out


class CapaBoostModel(AdapterModelLike, GraphProgram):
    """The training module `transform` returns. Call it exactly as you call your model
    (any argument structure; a new one is captured once); ``.train()`` / ``.eval()`` behave
    as on your model, and so do its attributes, ``generate`` and ``save_pretrained``
    (`capaboost_fx.model_like`).

    ``eager``: the model runs as it is, each target module's adapter added by a forward hook
    (``transform(..., capture="eager")``: models or weights torch.export cannot capture); the
    same adapters, fold and files as the graph path.

    State: ``base_model``, a shell of your model whose frozen parameters and buffers share
    your model's storage (nothing is copied; ``spec.trainable`` parameters are private
    copies), with a `CapaBoostAdapter` registered beside each adapted weight (as
    ``<owner>.capaboost``) and each block a `BlockProgram` (``blocks()``)."""

    def __init__(self, base_model: nn.Module, constants: dict[str, torch.Tensor],
                 spec: Any, info: CaptureInfo, twin: nn.Module | None,
                 eager: bool = False, build: Callable[..., Variant] | None = None) -> None:
        super().__init__()
        self._init_program()
        self.base_model = base_model
        self.capaboost_constants = constants_module(constants)
        self.spec = spec
        self.capture_info = info
        self._build = build  # captures what a call needs and is missing (the pipeline's)
        self.eager = eager
        # Buffers of the shell that are private copies (the graph writes them: batch-norm
        # statistics), by name: saved with the adapter state, snapshotted by the fold.
        self.private_buffers: set[str] = set()
        object.__setattr__(self, "_twin", twin)  # meta copy of your model: captures run on it
        self._install_state_hooks()
        if eager:
            self._expose_eager_signature()

    def _expose_eager_signature(self) -> None:
        def forward(self: CapaBoostModel, *args: Any, **kwargs: Any) -> Any:
            return type(self).forward(self, *args, **kwargs)

        sig = inspect.signature(self.base_model.forward)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        forward.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *sig.parameters.values()])
        self.__dict__["forward"] = types.MethodType(forward, self)

    def structure_source(self) -> nn.Module:
        """Your model's eager structure: the meta twin (graph path) or the shell (eager)."""
        return self.base_model if self.eager else self._twin

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "fused_lm_head" in kwargs:  # TRL's trainers (model_like.AdapterModelLike)
            return self._fused_call(args, kwargs)
        if self.eager:
            return self._run_eager(args, kwargs)
        if not self.__dict__.get("_weights_ready") and not torch.compiler.is_dynamo_compiling():
            meta = [n for n, t in self.base_model.named_parameters() if t.is_meta]
            if meta:
                raise InputError(
                    f"{len(meta)} weights of the model are still on the meta device (e.g. "
                    f"{meta[0]}): it was built without weights. Load them first with "
                    "capaboost_fx.load_base_weights(train_model, checkpoint_dir)."
                )
            self.__dict__["_weights_ready"] = True
        return super().forward(*args, **kwargs)

    def adapters(self) -> dict[str, CapaBoostAdapter]:
        return {m.name: m for m in self.modules() if isinstance(m, CapaBoostAdapter)}

    def blocks(self) -> dict[str, BlockProgram]:
        """``{name: block}``: the modules to give ``fully_shard`` or checkpointing, in order.
        A planned block the split refused (``capture_info.refused_blocks`` says why) runs
        inside the root graph and is not listed: sharding it alone would never gather it."""
        if self.eager:  # your model's own layers: fully_shard / checkpoint them as usual
            return {n: self.base_model.get_submodule(n) for n in self.capture_info.blocks}
        return {n: b for n, b in self.planned_blocks().items() if b._fns}

    def planned_blocks(self) -> dict[str, BlockProgram]:
        """Every module made a `BlockProgram` at transform, graphs or not (for the passes)."""
        return {m.block_name: m for m in self.base_model.modules() if isinstance(m, BlockProgram)}

    def extra_repr(self) -> str:
        return (f"targets={len(self.adapters())}, blocks={len(self.blocks())}, "
                f"spec={self.spec}")


@dataclass(frozen=True)
class FoldPlan:
    """What a graph fold keeps from its training module to capture new calls later: the
    meta twin, each target (and the module a sequential adapter follows), the targets kept as
    dense adapters (nonlinear) and the sequential ones."""

    twin: nn.Module
    targets: dict[str, str | None]
    dense: frozenset[str] = frozenset()
    sequential: frozenset[str] = frozenset()


class FoldedModel(ModelLike, GraphProgram):
    """The deploy module `fold` returns: the captured eval graph of your model with merged
    weights and nothing else. ``base_model`` is your model's own class and structure holding
    the merged weights (``deploy.base_model.save_pretrained(...)`` works for Hugging Face
    models); every weight that was not adapted is shared with the training module, not copied.
    Inference-only: it always runs the eval graph. Nonlinear parallel adapters
    (``method="padapter"``) stay as one dense width-d·r adapter each, in ``capaboost_dense``."""

    def __init__(self, base_model: nn.Module, constants: dict[str, torch.Tensor],
                 dense: dict[str, nn.Module] | None = None, eager: bool = False,
                 plan: FoldPlan | None = None,
                 build: Callable[..., Variant] | None = None) -> None:
        super().__init__()
        self._init_program()
        object.__setattr__(self, "plan", plan)  # not a submodule: its twin is the meta copy
        self._build = build
        self.base_model = base_model
        self.capaboost_constants = constants_module(constants)
        self.eager = eager  # runs base_model as it is (the fold of an eager training module)
        if dense:
            self.capaboost_dense = nn.ModuleDict(dense)
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "fused_lm_head" in kwargs:  # TRL's trainers (model_like.AdapterModelLike)
            return self._fused_call(args, kwargs)
        if self.eager:
            return self._run_eager(args, kwargs)
        return super().forward(*args, **kwargs)

    @property
    def graph(self) -> fx.Graph:
        return self._variants[0].graphs["eval"]

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
