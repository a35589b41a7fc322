"""Capture: ``nn.Module`` -> one ATen-level ``fx.Graph`` per mode, over one shared state.

``torch.export.export(..., strict=False)`` evaluates every ``if self.training:`` branch once
(dropout, attention dropout, drop path, batch-norm statistics) and bakes the result into the
graph. So the model is captured twice, in train mode and in eval mode, and both graphs are
retargeted onto ONE private copy of the model (``base_model.<fqn>``): they share every
parameter and buffer, and ``.train()`` / ``.eval()`` only choose which graph runs.

Batch size and sequence length are dynamic by default (``Dim.AUTO`` on dims 0 and 1 of
every tensor input): the captured graph accepts shapes other than the example's.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import CaptureError, InputError

BASE = "base_model"  # attribute that holds the shared copy of the user's model
CONSTANTS = "capaboost_constants"  # lifted tensor constants of the captured graphs


@dataclass
class Captured:
    """One mode's capture: the graph (get_attr targets rooted at ``base_model.``) and what the
    generated code needs besides the shared state."""

    mode: str
    graph: fx.Graph
    in_spec: Any
    out_spec: Any
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    range_constraints: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def private_copy(model: nn.Module) -> nn.Module:
    """The copy every pass works on: the caller's model is never touched."""
    try:
        holder = copy.deepcopy(model)
    except Exception as e:  # pragma: no cover - exotic modules
        raise CaptureError(
            f"could not copy the model ({type(e).__name__}: {e}); capaboost_fx never changes "
            "the caller's model, so it needs copy.deepcopy(model) to work."
        ) from e
    config = getattr(holder, "config", None)
    # Decoder models return a KV-cache object when use_cache is on; training needs none.
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    return holder


def default_dynamic_shapes(
    model: nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """``Dim.AUTO`` on dims 0 and 1 (batch, sequence) of every tensor input, by parameter name."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(
            f"example inputs do not fit {type(model).__name__}.forward{inspect.signature(model.forward)}: "
            f"{e}. Pass example_inputs=(...) and/or example_kwargs={{...}} as you would call the model."
        ) from None

    def spec_of(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {d: Dim.AUTO for d in range(min(x.dim(), 2))} or None
        return None

    out: dict[str, Any] = {}
    params = inspect.signature(model.forward).parameters
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec_of, v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: pytree.tree_map(spec_of, v) for k, v in value.items()}
        else:
            out[name] = pytree.tree_map(spec_of, value)
    return out


def _explain_failure(model: nn.Module, mode: str, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    lines = text.splitlines()
    short = "\n    ".join(lines[:12]) + ("\n    ..." if len(lines) > 12 else "")
    hints = [
        "pass example inputs shaped as in real use (batch >= 2, sequence >= 2, batch != sequence)",
        "pass dynamic_shapes=... to fix which dims may vary (see torch.export.Dim), or "
        "dynamic_shapes={} ... to capture static shapes",
    ]
    if "Cache" in text or "past_key_values" in text:
        hints.insert(0, "the model returns a KV cache: set model.config.use_cache = False")
    if "data-dependent" in text.lower() or "GuardOnDataDependent" in text:
        hints.insert(0, "the model branches on tensor values; torch.export needs torch._check "
                        "or torch.cond there (see torch.export docs on data-dependent control flow)")
    if "Constraints violated" in text or "specialized" in text.lower():
        hints.insert(0, "a dimension marked dynamic is fixed by the model; drop it from "
                        "dynamic_shapes or give it a Dim range")
    return (
        f"torch.export could not capture {type(model).__name__} in {mode} mode:\n    {short}\n"
        "Try: " + "; or ".join(hints) + "."
    )


def export_graph(
    holder: nn.Module,
    mode: str,
    args: tuple,
    kwargs: Mapping[str, Any],
    dynamic_shapes: Any,
) -> Captured:
    """Export `holder` in `mode` and retarget its state onto ``base_model.<fqn>``."""
    import time

    was_training = holder.training
    holder.train(mode == "train")
    t0 = time.perf_counter()
    try:
        ep = torch.export.export(
            holder, tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes, strict=False
        )
        gm = ep.module()
    except CaptureError:
        raise
    except Exception as e:
        raise CaptureError(_explain_failure(holder, mode, e)) from e
    finally:
        holder.train(was_training)
    seconds = time.perf_counter() - t0

    state_names = {n for n, _ in holder.named_parameters(remove_duplicate=False)}
    state_names |= {n for n, _ in holder.named_buffers(remove_duplicate=False)}
    graph = gm.graph
    constants: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            if node.target in state_names:
                node.target = f"{BASE}.{node.target}"
            else:  # a lifted constant: it lives beside the shared state
                value = _fetch(gm, node.target)
                if not isinstance(value, torch.Tensor):
                    raise CaptureError(
                        f"captured graph holds a non-tensor constant {node.target!r} "
                        f"({type(value).__name__}); capaboost_fx cannot share it."
                    )
                key = re.sub(r"\W", "_", f"{mode}_{node.target}")
                constants[key] = value.detach()
                node.target = f"{CONSTANTS}.{key}"
        elif node.op == "call_module" and node.target == "_guards_fn":
            # Shape guards of this capture: keep them as a plain function call.
            guard = InputGuard(gm._guards_fn.forward, mode, ep.range_constraints)
            node.op, node.target = "call_function", guard
        elif node.op == "call_module":
            raise CaptureError(f"unexpected submodule call {node.target!r} in the captured graph")
    graph.owning_module = None  # the graph now runs against the shared state, not `gm`
    graph.lint()
    ranges = {str(k): str(v) for k, v in ep.range_constraints.items()}
    return Captured(mode, graph, gm._in_spec, gm._out_spec, constants, ranges, seconds)


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class InputGuard:
    """Runs torch.export's input-shape guards; a violation becomes an `InputError` that says
    what was captured and how to widen it."""

    __name__ = "capaboost_input_guard"

    def __init__(self, fn: Any, mode: str, range_constraints: Mapping[Any, Any]) -> None:
        self.fn, self.mode = fn, mode
        self.ranges = {str(k): str(v) for k, v in range_constraints.items()}

    def __call__(self, *args: Any) -> None:
        try:
            self.fn(*args)
        except AssertionError as e:
            raise InputError(
                f"input does not fit the shapes captured in {self.mode} mode ({e}). "
                f"Captured dynamic ranges: {self.ranges or 'none (all shapes static)'}. "
                "Re-run transform with example inputs of a typical shape (batch >= 2, "
                "batch != sequence length) or pass dynamic_shapes=... with wider Dim ranges."
            ) from None

    def __repr__(self) -> str:
        return f"InputGuard({self.mode})"


def specialized_dims(captured: Captured) -> list[str]:
    """Tensor inputs whose dim 0 or 1 the capture fixed to the example's size."""
    out = []
    for node in captured.graph.nodes:
        fake = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(fake, torch.Tensor):
            out += [f"{node.name}.shape[{d}] == {fake.shape[d]}"
                    for d in range(min(fake.dim(), 2)) if isinstance(fake.shape[d], int)]
    return out
