"""Executors: how a capaboost_fx module runs a call. One interface, two implementations,
chosen once by `capaboost_fx.transform` and never asked about again.

- `GraphExecutor`: the captured programs. One `Variant` per call structure, mode and
  ``torch.autocast`` state (a call with a new one is captured once more, on the meta twin,
  as ``torch.compile`` recompiles on a guard failure); the transformer blocks are
  `BlockProgram`s that run their slice of each graph, so ``fully_shard(block)`` and
  per-block activation checkpointing act on them as on an eager model.
- `EagerExecutor`: your model's own modules, each target's adapter added by a forward hook
  (``y + s·B_cat(A_cat x)`` at the module boundary: the graph rewrite's algebra).

What a module asks of its executor (the whole interface):

    run(module, args, kwargs)                the call
    signature(module)                        what ``forward`` shows (the HF Trainer reads it)
    blocks(module)                           modules to shard or checkpoint, in order
    set_checkpointing(module, every_n, kw)   activation checkpointing per block (or off)
    checkpointing(module)                    whether it is on
    fused_call(module, args, kwargs, head)   TRL's ``fused_lm_head=True`` call
    deploy(module, shell)                    the executor of the folded module, and its state
    dynamic_shapes_for(module, args, kwargs) dims an export may leave dynamic (or None)

Graph code is compiled against the module that runs it (as ``fx.GraphModule`` does): every
weight is looked up at call time under ``wrapped.<fqn>``, so ``.to()``, DDP, FSDP2 and
``load_state_dict`` act on one state, seen by every graph.
"""

from __future__ import annotations

import functools
import inspect
import time
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import fx, nn

from .adapter import CapaBoostAdapter, DenseAdapter
from .errors import CapaBoostError, CapaBoostWarning, CaptureError, FoldError, InputError
from .merge import foldable, merged_weights, refuse_nonlinear, structure_copy
from .passes.capture import BASE, CONSTANTS, Captured, capture_graph, replace_tensor, to_meta
from .passes.diagnose import (
    call_error,
    forward_failure,
    refused_call,
    unknown_arguments,
)
from .passes.match import sites_for
from .passes.rewrite import adapter_key, rewrite, unrewrite
from .passes.split import split_blocks
from .structure import is_quantized, is_sharded
from .variant import (
    Variant,
    _compile,
    autocast_region,
    autocast_state,
    copy_graph,
    graph_dynamic_shapes,
)

# ----------------------------------------------------------------------------- blocks


class BlockProgram(nn.Module):
    """One block (e.g. ``model.layers.3``) of a graph-path module: the block's own
    parameters, buffers and submodules (adapters included) under their original names, and
    its slice of each captured graph. Called by the root graph as ``block(key, *inputs)``.
    ``checkpoint = True`` recomputes the block in backward (activation checkpointing)."""

    def __init__(self, original: nn.Module, name: str) -> None:
        super().__init__()
        # Adopt the original block's state as is: same tensors, same names.
        self._parameters = original._parameters
        self._buffers = original._buffers
        self._non_persistent_buffers_set = original._non_persistent_buffers_set
        self._modules = original._modules
        self.training = original.training
        self.block_name = name
        self.block_type = type(original).__name__
        self.checkpoint = False
        self.programs: dict[tuple[int, str], tuple[fx.Graph, Any]] = {}

    def add_graph(self, key: int, mode: str, graph: fx.Graph) -> None:
        self.programs[(key, mode)] = (graph, _compile(graph)[0])

    def forward(self, key: int, *args: Any) -> Any:  # type: ignore[override]
        fn = self.programs[(key, "train" if self.training else "eval")][1]
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch_checkpoint.checkpoint(fn, self, key, *args, use_reentrant=False)
        return fn(self, key, *args)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["programs"] = {k: (g, None) for k, (g, _) in self.programs.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.programs = {k: (g, _compile(g)[0]) for k, (g, _) in self.programs.items()}

    def extra_repr(self) -> str:
        return f"block={self.block_name!r} ({self.block_type}), checkpoint={self.checkpoint}"


def install_blocks(shell: nn.Module, names: list[str]) -> None:
    """Replace each named module of `shell` by a `BlockProgram` adopting its state."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = shell.get_submodule(parent_name) if parent_name else shell
        parent._modules[child] = BlockProgram(parent._modules[child], name)


# ----------------------------------------------------------------------------- the interface


def _forward_function(sig: inspect.Signature | None) -> Any:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._call(args, kwargs)

    if sig is not None:
        first = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        forward.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[first, *sig.parameters.values()])
    return forward


class Executor:
    """See the module docstring. Subclasses hold only their own run-time state."""

    kind = ""
    _forward: tuple[inspect.Signature | None, Any] | None = None  # (signature, function)

    def bound_forward(self, module: nn.Module) -> Any:
        """``module.forward``: a method whose signature is the calls this executor runs (the
        HF Trainer routes batch columns by it). The same function until that signature
        changes, so bound methods compare equal (accelerate unwraps its autocast wrapper by
        that equality)."""
        if torch.compiler.is_compiling() and self._forward is not None:
            return functools.partial(self._forward[1], module)  # what torch.compile traces
        sig = self.signature(module)
        if self._forward is None or self._forward[0] is not sig:
            self._forward = (sig, _forward_function(sig))
        return types.MethodType(self._forward[1], module)
    generation: tuple[list[Any], nn.Module] | None = None  # (adapters' state, merged view)

    def structure(self, module: nn.Module) -> nn.Module:
        """Your model's eager structure (the meta twin, or the shell): what copies are made of."""
        raise NotImplementedError

    def generation_view(self, module: nn.Module) -> nn.Module:
        """Your model's eager structure with the enabled adapters merged into the target
        weights, over the module's tensors; rebuilt only when an adapter changed (the
        optimizer's in-place updates bump the tensors' versions), so many ``generate`` calls
        between optimizer steps (RL rollouts) merge once."""
        adapters = {n: a for n, a in module.adapters().items() if a.enabled}
        key: list[Any] = [module.training, tuple(adapters)]
        key += [(id(p), p._version, p.device, p.dtype)
                for a in adapters.values() for p in a.parameters()]
        if self.generation is not None and self.generation[0] == key:
            return self.generation[1]
        self.generation = None  # free the old merged weights first
        view = structure_copy(self.structure(module), module.wrapped, merged_weights(module.wrapped, adapters))
        view.train(module.training)
        self.generation = (key, view)
        return view

    def ensure(self, module: nn.Module, args: tuple, kwargs: dict, mode: str) -> None:
        """Make sure this call can run in `mode` (a graph executor captures it now)."""

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def signature(self, module: nn.Module) -> inspect.Signature | None:
        raise NotImplementedError

    def blocks(self, module: nn.Module) -> dict[str, nn.Module]:
        raise NotImplementedError

    def set_checkpointing(self, module: nn.Module, every_n_layers: int,
                          kwargs: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def checkpointing(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def fused_call(self, module: nn.Module, args: tuple, kwargs: dict,
                   head: dict[str, Any] | None) -> Any:
        raise NotImplementedError

    def deploy(self, module: nn.Module, shell: nn.Module) -> tuple[Executor, dict, dict]:
        raise NotImplementedError

    def dynamic_shapes_for(self, module: nn.Module, args: tuple, kwargs: dict
                           ) -> dict[str, Any] | None:
        return None

    def runs_as(self, module: nn.Module) -> nn.Module:
        """The module an exporter should trace for `module`: itself (its captured graphs), or
        the eager model it runs."""
        return module

    def prepare_export(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Make ``forward``'s signature the one of this call (exporters bind by it)."""


# ----------------------------------------------------------------------------- eager


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


class EagerExecutor(Executor):
    """Your model's own forward over the shell (adapters by hooks on the target modules)."""

    kind = "eager"

    def __init__(self, blocks: list[str] | None = None) -> None:
        self.block_names = list(blocks or [])
        self.seen: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}  # the first call's inputs
        self.fused_head_on = False
        self._signature: inspect.Signature | None = None

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        return run_eagerly(module.wrapped, args, kwargs, self.seen)

    def signature(self, module: nn.Module) -> inspect.Signature | None:
        if self._signature is None:
            try:
                self._signature = inspect.signature(module.wrapped.forward)
            except (TypeError, ValueError):
                return None
        return self._signature

    def blocks(self, module: nn.Module) -> dict[str, nn.Module]:
        return {n: module.wrapped.get_submodule(n) for n in self.block_names}

    def set_checkpointing(self, module: nn.Module, every_n_layers: int,
                          kwargs: dict[str, Any]) -> list[str]:
        base = module.wrapped
        if every_n_layers == 0:
            off = (getattr(base, "activation_checkpointing_disable", None)
                   or getattr(base, "gradient_checkpointing_disable", None))
            if callable(off):
                off()
            return []
        kwargs = {"use_reentrant": False, **kwargs}
        if callable(getattr(base, "activation_checkpointing_enable", None)):
            base.activation_checkpointing_enable(kwargs, every_n_layers)
        elif callable(getattr(base, "gradient_checkpointing_enable", None)):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise CapaBoostError(
                f"{type(base).__name__} has no activation_checkpointing_enable(); wrap its "
                "blocks in torch.utils.checkpoint yourself.")
        return list(self.block_names)

    def checkpointing(self, module: nn.Module) -> bool:
        return bool(getattr(module.wrapped, "is_gradient_checkpointing", False))

    def fused_call(self, module: nn.Module, args: tuple, kwargs: dict,
                   head: dict[str, Any] | None) -> Any:
        # TRL's own fused head on the shell: the memory-efficient kernel, the hooks apply.
        if not self.fused_head_on:
            from trl.trainer.utils import add_fused_lm_head  # TRL asked for it

            add_fused_lm_head(module.wrapped, **(head or {}))
            self.fused_head_on = True
        return module.wrapped(*args, fused_lm_head=True, **kwargs)

    def runs_as(self, module: nn.Module) -> nn.Module:
        return module.wrapped

    def structure(self, module: nn.Module) -> nn.Module:
        if is_sharded(module.wrapped):
            raise FoldError(
                "this eager training module is sharded (fully_shard): its modules cannot be "
                "copied into a deploy module. Call capaboost_fx.merged_state_dict(train_model) "
                "on every rank and load it into an unsharded copy of your model, or "
                "save_pretrained (every rank) and load_adapter + fold on one process.")
        return module.wrapped

    def generation_view(self, module: nn.Module) -> nn.Module:
        # Over quantized targets, the shell itself: its hooks apply the adapters and the
        # weights stay quantized (a merged copy would be dense).
        if any(a.weight_fqn and is_quantized(module.wrapped.get_parameter(a.weight_fqn))
               for a in module.adapters().values()):
            return module.wrapped
        return super().generation_view(module)

    def deploy(self, module: nn.Module, shell: nn.Module) -> tuple[Executor, dict, dict]:
        refuse_nonlinear(module.adapters(),
                         "in eager mode fold needs adapters that merge into the weights")
        return EagerExecutor(self.block_names), {}, {}


# ----------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class FoldPlan:
    """What a folded graph module keeps to capture new calls later: each target (and the
    module a sequential adapter follows), the targets kept as dense adapters (nonlinear) and
    the sequential ones."""

    targets: dict[str, str | None]
    dense: frozenset[str] = frozenset()
    sequential: frozenset[str] = frozenset()


class GraphExecutor(Executor):
    """Captured programs (see the module docstring). `plan` is None for a training module;
    a folded module's executor has one and runs the eval graph only."""

    kind = "graph"
    MAX_SHAPES = 8  # graphs per call structure for sizes the model's code fixes

    def __init__(self, twin: nn.Module, plan: FoldPlan | None = None) -> None:
        self.twin = twin  # meta copy of your model: captures run on it
        self.plan = plan
        self.variants: list[Variant] = []
        self.warned_shapes = False
        self.weights_ready = False
        self._signature: inspect.Signature | None = None
        params = inspect.signature(twin.forward).parameters
        self.param_names = list(params)
        # tensor-free defaults of the forward (a call passing one changes no graph)
        self.defaults = {k: p.default for k, p in params.items()
                         if p.default is not inspect.Parameter.empty
                         and isinstance(p.default, (bool, int, float, str))}

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphExecutor:
        new = GraphExecutor.__new__(GraphExecutor)
        new.__dict__.update(self.__dict__)  # the twin and the compiled variants are shared
        new.variants = list(self.variants)
        new.generation = None
        return new

    # ------------------------------------------------------------------ running

    def add_variant(self, variant: Variant) -> None:
        variant.compile()
        if all(v is not variant for v in self.variants):
            self.variants.append(variant)
        if self._signature is None:
            self._signature = variant.signature(self.param_names)

    def signature(self, module: nn.Module) -> inspect.Signature | None:
        return self._signature

    def structure(self, module: nn.Module) -> nn.Module:
        return self.twin

    def ensure(self, module: nn.Module, args: tuple, kwargs: dict, mode: str) -> None:
        self.variant_for(module, tuple(args), self.call_kwargs(dict(kwargs)), mode)


    def prepare_export(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        variant = self.variant_for(module, tuple(args), dict(kwargs))
        self._signature = variant.signature(self.param_names)

    def dynamic_shapes_for(self, module: nn.Module, args: tuple, kwargs: dict
                           ) -> dict[str, Any] | None:
        variant = self.variant_for(module, tuple(args), dict(kwargs), "eval")
        graph = variant.graphs.get("eval") or next(iter(variant.graphs.values()))
        names = list(variant.signature(self.param_names).parameters)
        return graph_dynamic_shapes(graph, variant.in_spec, names, kwargs) or {}

    def call_kwargs(self, kwargs: dict) -> dict:
        """`kwargs` without the tensor-free keywords that cannot change the graph: those equal
        to the forward's own default, and ``use_cache=False`` (capture runs with the cache
        off). Training stacks pass them (TRL: ``use_cache=False``, ``logits_to_keep=0``); they
        must not cost a capture."""
        if not kwargs:
            return kwargs
        out = {}
        for k, v in kwargs.items():
            if not isinstance(v, torch.Tensor) and (
                    (k == "use_cache" and v is False)
                    or (k in self.defaults and type(v) is type(self.defaults[k])
                        and v == self.defaults[k])):
                continue
            out[k] = v
        return out

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        mode = module.mode()
        kwargs = self.call_kwargs(kwargs)
        if torch.compiler.is_dynamo_compiling():  # no capture inside a compiled region
            variant = next((v for v in self.variants if mode in v.fns
                            and v.same_names(args, kwargs)), self.variants[0])
            return variant.run(mode, module, args, kwargs)
        if not self.weights_ready:
            meta = [n for n, t in module.wrapped.named_parameters() if t.is_meta]
            if meta:
                raise InputError(
                    f"{len(meta)} weights of the model are still on the meta device (e.g. "
                    f"{meta[0]}): it was built without weights. Load them first with "
                    "capaboost_fx.load_base_weights(train_model, checkpoint_dir).")
            self.weights_ready = True
        variant = self.variant_for(module, args, kwargs, mode)
        try:
            return variant.run(mode, module, args, kwargs)
        except torch.OutOfMemoryError:
            raise  # not the inputs' fault: callers catch it to shrink the batch
        except Exception as e:
            if isinstance(e, CapaBoostError) and not getattr(e, "guard", False):
                raise
            inputs = variant.inputs(mode, args, kwargs, self.param_names)
            raise call_error(e, module, mode, *inputs) from e

    def variant_for(self, module: nn.Module, args: tuple, kwargs: dict,
                    mode: str | None = None) -> Variant:
        """The variant that runs these inputs in `mode` (and under the current
        ``torch.autocast`` state: an export bakes its casts in), captured now if missing."""
        mode = mode or module.mode()
        state = autocast_state()
        same = [v for v in self.variants if v.autocast == state and v.matches(args, kwargs)]
        found = next((v for v in same if v.fits(args, kwargs)), None)
        if found is not None and mode in found.fns:
            return found
        new_shape = found is None and bool(same)
        if new_shape and len(same) >= self.MAX_SHAPES:
            fixed = sorted({k for v in same for k in v.fixed_names()})
            raise InputError(
                f"the model's code fixes {fixed} while captured, and {len(same)} sizes there "
                "have graphs already; pad or bucket these inputs to a few sizes.")
        try:
            variant = self._capture(module, mode, args, kwargs, found)
        except CapaBoostError as e:  # say how this call differs from those captured
            raise self._refusal(module, e, args, kwargs, same, new_shape) from e
        variant.autocast = state
        self.add_variant(variant)
        if new_shape and not self.warned_shapes:
            self.warned_shapes = True
            fixed = sorted({k for v in same for k in v.fixed_names()})
            warnings.warn(CapaBoostWarning(
                f"the model's code fixed {fixed} to the captured size; this call has another "
                "size there, so a graph was captured for it (seconds, once per size, at most "
                f"{self.MAX_SHAPES}; listed in capture_info.later_captures)."), stacklevel=5)
        return variant

    def _refusal(self, module: nn.Module, e: CapaBoostError, args: tuple, kwargs: dict,
                 same: list[Variant], new_shape: bool) -> Exception:
        sizes = {k: v for v in same for k, v in v.fixed_names().items()}
        inputs = [v.inputs(next(iter(v.graphs)), args, kwargs, self.param_names)
                  for v in (same or self.variants)]
        refused = refused_call(module, sizes if new_shape else None, inputs, e)
        if refused is None and not same:
            known = {n for v in self.variants for n in v.signature(self.param_names).parameters}
            refused = unknown_arguments(module, kwargs, known, e)
        return e if refused is None else refused

    def _capture(self, module: nn.Module, mode: str, args: tuple, kwargs: dict,
                 variant: Variant | None) -> Variant:
        if self.plan is not None:
            return self._capture_folded(module, args, kwargs)
        return capture_variant(module, self.twin, mode, args, kwargs, variant)

    # ------------------------------------------------------------------ blocks

    def planned_blocks(self, module: nn.Module) -> dict[str, BlockProgram]:
        return {m.block_name: m for m in module.wrapped.modules() if isinstance(m, BlockProgram)}

    def blocks(self, module: nn.Module) -> dict[str, nn.Module]:
        """Blocks holding graphs. A planned block the split refused runs inside the root
        graph and is not listed: sharding it alone would never gather it."""
        return {n: b for n, b in self.planned_blocks(module).items() if b.programs}

    def set_checkpointing(self, module: nn.Module, every_n_layers: int,
                          kwargs: dict[str, Any]) -> list[str]:
        # Blocks are recomputed non-reentrantly either way: the gradients are the same, and
        # non-reentrant recomputation also works when no input of a block requires grad.
        unknown = set(kwargs) - {"use_reentrant", "preserve_rng_state", "determinism_check"}
        if unknown:
            raise CapaBoostError(
                f"the graph path checkpoints blocks with torch.utils.checkpoint; it does not "
                f"take {sorted(unknown)}. Drop them, or transform with capture='eager'.")
        blocks = list(self.blocks(module).values())
        if every_n_layers and not blocks:
            raise CapaBoostError(
                "this training module has no blocks to checkpoint: call "
                "capaboost_fx.transform(..., blocks=['model.layers.*'], checkpoint=True) to "
                "name them (transformer layers are found automatically for Hugging Face "
                "models).")
        for i, b in enumerate(blocks):
            b.checkpoint = bool(every_n_layers) and i % every_n_layers == 0
        return [b.block_name for b in blocks if b.checkpoint]

    def checkpointing(self, module: nn.Module) -> bool:
        return any(b.checkpoint for b in self.blocks(module).values())

    # ------------------------------------------------------------------ TRL, fold

    def fused_call(self, module: nn.Module, args: tuple, kwargs: dict,
                   head: dict[str, Any] | None) -> Any:
        labels = kwargs.pop("labels", None)
        extra = {k: kwargs.pop(k) for k in ("shift_labels", "num_items_in_batch") if k in kwargs}
        kwargs["use_cache"] = False
        logits = self.run(module, args, kwargs).logits
        return fused_from_logits(logits, labels, extra.get("shift_labels"),
                                 extra.get("num_items_in_batch"), **(head or {}))

    def deploy(self, module: nn.Module, shell: nn.Module) -> tuple[Executor, dict, dict]:
        """The folded module's executor (the eval graph of every variant with the adapter
        nodes removed, or kept as dense ones for nonlinear adapters), its constants and its
        dense adapters."""
        adapters = module.adapters()
        for v in list(self.variants):
            if "eval" not in v.flat:
                with autocast_region(v.autocast):
                    capture_variant(module, self.twin, "eval", *v.example, v)
                v.compile()
        nonlinear = frozenset(n for n, a in adapters.items() if not foldable(a))
        plan = FoldPlan({n: a.output_of for n, a in adapters.items()}, nonlinear,
                        frozenset(n for n, a in adapters.items() if a.sequential))
        folded = GraphExecutor(self.twin, plan)
        for v in self.variants:
            graph = copy_graph(v.flat["eval"], v.in_spec, v.out_spec)
            unrewrite(graph, keep=nonlinear)
            folded.add_variant(Variant(v.key, v.in_spec, v.out_spec, graphs={"eval": graph},
                                       example=v.example, bound=v.bound, autocast=v.autocast,
                                       fixed=v.fixed))
        table = dict(getattr(module, CONSTANTS).named_buffers())
        prefix = CONSTANTS + "."
        constants = {n.target[len(prefix):]: table[n.target[len(prefix):]].detach().clone()
                     for v in folded.variants for n in v.graphs["eval"].nodes
                     if n.op == "get_attr" and n.target.startswith(prefix)}
        dense = {adapter_key(n): DenseAdapter(a) for n, a in adapters.items() if n in nonlinear}
        return folded, constants, dense

    def _capture_folded(self, module: nn.Module, args: tuple, kwargs: dict) -> Variant:
        """A new argument structure for a folded module: its eval graph on the meta twin;
        nonlinear adapters stay as dense ones, linear ones are already in the weights."""
        key = len(self.variants)
        plan = self.plan
        captured = capture_graph(self.twin, "eval", args, kwargs, None, tag=f"f{key}_",
                                 warn=False)
        targets, _ = sites_for(captured.graph, "eval", self.twin, plan.targets)
        rewrite(captured.graph, targets, "eval", plan.sequential)
        unrewrite(captured.graph, keep=plan.dense)
        for k, v in captured.constants.items():
            getattr(module, CONSTANTS).register_buffer(k, v, persistent=False)
        return Variant(key, captured.in_spec, captured.out_spec,
                       graphs={"eval": captured.graph},
                       example=(to_meta(tuple(args)), to_meta(dict(kwargs))),
                       bound=captured.bound, fixed=captured.fixed)


# ----------------------------------------------------------------------------- the pipeline


def install_graph(module: nn.Module, variant: Variant, captured: Captured) -> None:
    """Rewrite, split and install one captured graph into `variant` of training `module`."""
    mode, graph = captured.mode, captured.graph
    adapters: dict[str, CapaBoostAdapter] = module.adapters()
    info = module.capture_info
    targets, missing = sites_for(graph, mode, module.executor.twin,
                                 {n: a.output_of for n, a in adapters.items()})
    if missing:
        name, why = next(iter(missing.items()))
        raise CaptureError(
            f"target {name!r} cannot be found in the graph captured in {mode} mode for this "
            f"call ({why}); the model computes it differently here, so its adapter cannot apply."
        )
    sequential = frozenset(n for n, a in adapters.items() if a.sequential)
    changed = rewrite(graph, targets, mode, sequential)
    if variant.key == 0:
        info.sites[mode] = len(changed)
    variant.flat[mode] = copy_graph(graph, variant.in_spec, variant.out_spec)
    split = split_blocks(graph, info.blocks, variant.key)
    blocks = module.executor.planned_blocks(module)
    for b, g in split.blocks.items():
        blocks[b].add_graph(variant.key, mode, g)
    refused_explicit = {b: w for b, w in split.refused.items() if b in info.explicit_blocks}
    if refused_explicit:
        raise CaptureError(
            f"cannot make {sorted(refused_explicit)[:3]} blocks: {refused_explicit}. Name "
            "modules that are called once per forward (e.g. 'model.layers.*')."
        )
    info.refused_blocks.update(split.refused)
    for k, v in captured.constants.items():
        getattr(module, CONSTANTS).register_buffer(k, v, persistent=False)
    _privatize_mutated(module, captured)
    variant.graphs[mode] = split.root


def _privatize_mutated(module: nn.Module, captured: Captured) -> None:
    """Buffers the graph writes (batch-norm statistics) get private copies: training must not
    write into the caller's model. Their names join ``module.private_buffers``."""
    shell = getattr(module, BASE)
    for fqn in captured.mutated_buffers:
        owner, _, attr = fqn.rpartition(".")
        holder = shell.get_submodule(owner) if owner else shell
        old = holder._buffers.get(attr)
        if old is not None and fqn not in module.private_buffers:
            new = old.clone()
            replace_tensor(shell, old, new)
            module.private_buffers.update(
                n for n, b in shell.named_buffers(remove_duplicate=False) if b is new)


def capture_variant(module: nn.Module, twin: nn.Module, mode: str, args: tuple, kwargs: dict,
                    variant: Variant | None) -> Variant:
    """Capture what a call needs and is missing (a new argument structure, or the other mode)."""
    key = len(module.executor.variants) if variant is None else variant.key
    t0 = time.perf_counter()
    captured = capture_graph(twin, mode, args, kwargs, None, tag=f"v{key}_", warn=False)
    if variant is None:
        variant = Variant(key, captured.in_spec, captured.out_spec,
                          example=(to_meta(tuple(args)), to_meta(dict(kwargs))),
                          bound=captured.bound, fixed=captured.fixed)
    install_graph(module, variant, captured)
    module.capture_info.later_captures.append(
        {"mode": mode, "variant": key, "autocast": str(autocast_state()),
         "export_seconds": round(captured.seconds, 3),
         "seconds": round(time.perf_counter() - t0, 3), "fixed_sizes": variant.fixed_names()})
    return variant


def fused_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                      shift_labels: torch.Tensor | None, num_items_in_batch: Any,
                      temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> Any:
    """TRL's ``FusedCausalLMOutput`` computed from the logits of the captured graph (the
    logits are materialized; TRL's fused kernel avoids that on an eager model)."""
    from trl.trainer.utils import FusedCausalLMOutput  # only TRL makes these calls

    if shift_labels is None:
        logits, labels = logits[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    mask = labels != -100
    z = logits.float() / temperature
    logp = z.log_softmax(-1)
    log_probs = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    fields: dict[str, Any] = {"log_probs": log_probs}
    if "entropy" in outputs:
        fields["entropy"] = -(logp.exp() * logp).sum(-1) * mask
    with torch.no_grad():
        if "log_sum_sq_probs" in outputs:
            fields["log_sum_sq_probs"] = torch.logsumexp(2 * logp, -1) * mask
        if "mean_logits" in outputs:
            fields["mean_logits"] = z.mean(-1) * mask
        if "is_top1" in outputs:
            fields["is_top1"] = (z.argmax(-1) == labels) & mask
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, label_mask=mask, **fields)
