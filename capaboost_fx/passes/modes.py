"""Train/eval switch: one ``nn.Module`` that runs a captured graph per mode over its own state.

A graph exported in train mode has dropout and batch-norm statistics baked in, and one
exported in eval mode has them off; neither can switch. `GraphProgram` compiles each mode's
graph into Python (as ``fx.GraphModule`` does) with ``self`` bound to the program module, so
both graphs read the SAME registered parameters and buffers (``self.base_model...``), and
``forward`` picks the graph from ``self.training``. Because every attribute is looked up at
call time, ``.to()``, DDP, FSDP and ``load_state_dict`` act on one state, seen by both graphs.
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _forward_from_src

from ..errors import InputError


class GraphProgram(nn.Module):
    """Base of the training and deploy modules: graphs by mode, compiled against ``self``."""

    def _install(self, graphs: dict[str, fx.Graph], in_spec: Any, out_spec: Any) -> None:
        object.__setattr__(self, "_graphs", dict(graphs))
        object.__setattr__(self, "_in_spec", in_spec)
        object.__setattr__(self, "_out_spec", out_spec)
        self.recompile()

    def recompile(self) -> None:
        """Regenerate each mode's code after its graph changed."""
        fns, code = {}, {}
        for mode, graph in self._graphs.items():
            py = graph.python_code(root_module="self")
            fns[mode] = _forward_from_src(py.src, py.globals, getattr(graph, "_co_fields", {}))
            code[mode] = py.src
        object.__setattr__(self, "_fns", fns)
        object.__setattr__(self, "_code", code)

        # Expose the captured call signature (input_ids, attention_mask, labels, ...) on
        # `self.forward`, as tools such as the HF Trainer read it to route batch columns.
        def forward(self: GraphProgram, *args: Any, **kwargs: Any) -> Any:
            return GraphProgram.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(fns["eval"])  # type: ignore[attr-defined]
        self.__dict__["forward"] = types.MethodType(forward, self)

    @property
    def graphs(self) -> dict[str, fx.Graph]:
        """The fx graph of each mode (``"train"``, ``"eval"``)."""
        return self._graphs

    @property
    def code(self) -> dict[str, str]:
        """The Python each mode's graph compiles to."""
        return self._code

    def mode(self) -> str:
        return "train" if self.training and "train" in self._fns else "eval"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            self._check_inputs(args, kwargs)
        return self._fns[self.mode()](self, *args, **kwargs)

    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        from torch.export._unlift import _check_inputs_match

        try:
            _check_inputs_match(args, kwargs, self._in_spec)
        except (ValueError, TypeError) as e:
            raise InputError(
                f"{type(self).__name__} was captured for inputs structured as "
                f"{_describe_spec(self._in_spec)}, and got a call that does not fit: {e} "
                "Call it with the same arguments (names, positions, nesting) as the example "
                "given to transform; sizes of dynamic dims may differ."
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        # Compiled functions are derived data: rebuilt from the graphs (deepcopy works).
        state = dict(self.__dict__)
        state.pop("_fns", None)
        state.pop("_code", None)
        state.pop("forward", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.recompile()

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphProgram:
        # Pytree specs are immutable: share them (copying them also warns in torch 2.13).
        for spec in (self._in_spec, self._out_spec):
            memo[id(spec)] = spec
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        with warnings.catch_warnings():  # torch 2.13 warns when a LeafSpec is rebuilt
            warnings.simplefilter("ignore", FutureWarning)
            new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def copy_graph(self, mode: str) -> fx.Graph:
        """A deep copy of one mode's graph (pytree specs shared)."""
        memo = {id(self._in_spec): self._in_spec, id(self._out_spec): self._out_spec}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return copy.deepcopy(self._graphs[mode], memo)

def _describe_spec(spec: Any) -> str:
    text = str(spec).replace("\n", " ")
    return text if len(text) < 300 else text[:300] + "..."
