"""A variant: the graphs captured for one call of the model, per mode.

A call's *structure* (positions, keyword names, nesting, the values of tensor-free keywords)
and the ``torch.autocast`` state it runs under select a variant; sizes the model's own code
fixed at capture (`Variant.fixed`) must match too. `compile` turns each graph into Python
bound to the module that runs it (as ``fx.GraphModule`` does), so every parameter is looked
up at call time.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree

# Private torch API (pinned: torch>=2.13,<2.14): compiles generated graph code bound to our
# module, as fx.GraphModule does for itself.
from torch.fx.graph_module import _forward_from_src
from torch.utils import _pytree as pytree


def _compile(graph: fx.Graph) -> tuple[Callable[..., Any], str]:
    if type(graph._codegen) is not fx.graph.CodeGen:
        # Inputs are flattened/unflattened by the Variant against its own pytree specs.
        graph._codegen = fx.graph.CodeGen()
    py = graph.python_code(root_module="self")
    return _forward_from_src(py.src, py.globals, getattr(graph, "_co_fields", {})), py.src


def _path_name(path: tuple, params: list[str]) -> str:
    """``(SequenceKey(0), SequenceKey(1), ...)`` -> the argument's name (``params[1]``...)."""
    where, key, *rest = path
    if where.idx == 0:
        i = key.idx
        base = params[i] if i < len(params) else f"argument {i}"
    else:
        base = str(key.key)
    return base + "".join(str(k) for k in rest)


def autocast_state() -> tuple | None:
    """``(device type, dtype)`` of the ``torch.autocast`` region we are in, or None."""
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            return device, torch.get_autocast_dtype(device)
    return None


def autocast_region(state: tuple | None) -> Any:
    """A context that re-enters the autocast `state` (or does nothing for None)."""
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=state[1])


@dataclass
class Variant:
    """The graphs captured for one argument structure, per mode."""

    key: int
    in_spec: Any
    out_spec: Any
    graphs: dict[str, fx.Graph] = field(default_factory=dict)  # what runs (split)
    flat: dict[str, fx.Graph] = field(default_factory=dict)  # rewritten, unsplit (for fold)
    fns: dict[str, Callable[..., Any]] = field(default_factory=dict)
    code: dict[str, str] = field(default_factory=dict)
    example: tuple = ((), {})  # meta copies of the inputs it was captured with
    bound: dict[str, Any] = field(default_factory=dict)  # tensor-free kwargs baked in
    autocast: tuple | None = None  # the torch.autocast state it was captured under
    fixed: dict = field(default_factory=dict)  # {(flat input, dim): size} the model fixed

    def fixed_names(self) -> dict[str, int]:
        """``{"input_ids.shape[1]": 8}``: the fixed dims by the captured inputs' names."""
        graph = next(iter(self.graphs.values()), None)
        names = [n.name for n in graph.find_nodes(op="placeholder")] if graph else []
        return {f"{names[i] if i < len(names) else f'input {i}'}.shape[{d}]": n
                for (i, d), n in self.fixed.items()}

    def fits(self, args: tuple, kwargs: dict) -> bool:
        """The ranks of tensor inputs, and the sizes the model's code fixed at capture, are
        this call's too."""
        kwargs = {k: v for k, v in kwargs.items() if k not in self.bound}
        flat = fx_pytree.tree_flatten_spec((tuple(args), kwargs), self.in_spec)
        ranks = self._ranks()
        if any(isinstance(x, torch.Tensor) and r is not None and x.dim() != r
               for x, r in zip(flat, ranks, strict=False)):
            return False  # a graph is captured for one rank per input
        return all(i < len(flat) and isinstance(flat[i], torch.Tensor) and flat[i].dim() > d
                   and flat[i].shape[d] == n for (i, d), n in self.fixed.items())

    def _ranks(self) -> list[int | None]:
        graph = next(iter(self.graphs.values()), None)
        nodes = graph.find_nodes(op="placeholder") if graph is not None else []
        return [v.dim() if isinstance(v := n.meta.get("val"), torch.Tensor) else None
                for n in nodes]

    def compile(self) -> None:
        for mode, g in self.graphs.items():
            self.fns[mode], self.code[mode] = _compile(g)

    def run(self, mode: str, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.bound:
            kwargs = {k: v for k, v in kwargs.items() if k not in self.bound}
        flat = fx_pytree.tree_flatten_spec((tuple(args), kwargs), self.in_spec)
        # Graphs are captured for contiguous inputs (views are made contiguous at capture).
        flat = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in flat]
        return pytree.tree_unflatten(list(self.fns[mode](module, *flat)), self.out_spec)

    def inputs(self, mode: str, args: tuple, kwargs: dict,
               params: list[str] = ()) -> tuple[list, list]:
        """``([(name, captured meta value)], [given value])`` for the flat inputs of `mode`'s
        graph that this call passes too, by name (what `passes.diagnose` compares; the call
        may have another structure): ``input_ids``, ``x`` (positional, by the forward's
        `params`), ``past[0][1]``."""
        nodes = list(self.graphs[mode].find_nodes(op="placeholder"))
        try:
            paths = pytree.tree_flatten_with_path(
                pytree.tree_unflatten(list(range(len(nodes))), self.in_spec))[0]
            names = [_path_name(p, params) for p, _ in paths]
            called = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))[0]
        except Exception:  # noqa: BLE001 - nothing to compare
            return [], []
        given = {_path_name(p, params): v for p, v in called}
        pairs = [((m, n.meta.get("val")), given[m])
                 for m, n in zip(names, nodes, strict=False) if m in given]
        return [p for p, _ in pairs], [g for _, g in pairs]

    def signature(self, names: list[str] | None = None) -> inspect.Signature:
        """The captured call as a signature; positional names from the model's forward."""
        arg_spec, kw_spec = self.in_spec.children()
        P = inspect.Parameter
        names = list(names or [])
        params = [P(names[i] if i < len(names) else f"arg{i}", P.POSITIONAL_OR_KEYWORD)
                  for i in range(arg_spec.num_children)]
        params += [P(k, P.KEYWORD_ONLY if arg_spec.num_children else P.POSITIONAL_OR_KEYWORD)
                   for k in kw_spec.context]
        params += [P(k, P.KEYWORD_ONLY, default=v) for k, v in self.bound.items()]
        return inspect.Signature(params)

    def same_names(self, args: tuple, kwargs: dict) -> bool:
        """The cheap part of `matches` (positional count, keyword names): what torch.compile
        dispatches on; its own guards check the rest."""
        arg_spec, kw_spec = self.in_spec.children()
        return (len(args) == arg_spec.num_children and
                set(kwargs) == set(kw_spec.context) | set(self.bound))

    def matches(self, args: tuple, kwargs: dict) -> bool:
        """Same argument structure as captured: positions, keyword names, nesting, and the
        same values of tensor-free keyword arguments (a flag such as
        ``output_hidden_states=True`` changes the graph, so it is another variant)."""
        for k, v in self.bound.items():
            if k not in kwargs or type(kwargs[k]) is not type(v) or kwargs[k] != v:
                return False
        kwargs = {k: v for k, v in kwargs.items() if k not in self.bound}
        arg_spec, kw_spec = self.in_spec.children()
        names = kw_spec.context
        if set(kwargs) != set(names):
            return False
        ordered = {k: kwargs[k] for k in names}
        return pytree.tree_structure((tuple(args), ordered)) == self.in_spec

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("fns", "code")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, fns={}, code={})
        self.compile()

    def __deepcopy__(self, memo: dict[int, Any]) -> Variant:
        for s in (self.in_spec, self.out_spec):  # pytree specs are immutable: share them
            memo[id(s)] = s
        new = Variant.__new__(Variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new


def graph_dynamic_shapes(graph: torch.fx.Graph, in_spec: Any, param_names: list[str],
                         kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """``dynamic_shapes`` read from a captured graph: ``Dim.AUTO`` on the dims that are
    symbolic in its placeholders, by parameter name (None when the placeholders do not fit
    `in_spec`). The one rule for export: what the capture left dynamic is dynamic."""
    vals = [node.meta.get("val") for node in graph.find_nodes(op="placeholder")]
    return dynamic_shapes_of(vals, in_spec, param_names, kwargs)


def dynamic_shapes_of(vals: list[Any], in_spec: Any, param_names: list[str],
                      kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """`graph_dynamic_shapes` from the inputs' traced values (fake tensors, in `in_spec`
    order)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    dims = [{d: torch.export.Dim.AUTO for d, n in enumerate(v.shape) if not is_concrete_int(n)}
            or None if isinstance(v, torch.Tensor) else None for v in vals]
    try:
        arg_dims, kw_dims = pytree.tree_unflatten(dims, in_spec)
    except (ValueError, TypeError):
        return None
    out = dict(zip(param_names, arg_dims, strict=False))
    out.update(kw_dims)
    # tensor-free keywords (use_cache=False) are inputs of the call, static ones
    out.update({k: None for k in kwargs if k not in out})
    return out


def copy_graph(graph: fx.Graph, *specs: Any) -> fx.Graph:
    """A deep copy of a captured graph; pytree specs are immutable and shared (copying one
    also warns in torch 2.13)."""
    memo = {id(s): s for s in specs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph, memo)
