"""Capture: ``nn.Module`` -> one ATen-level ``fx.Graph`` per (mode, argument structure).

Nothing here copies a weight. The model is exported from a *meta twin*: a copy of the module
tree whose parameters and buffers are meta tensors (shapes and dtypes only), with the example
inputs turned into meta tensors too, so capture costs no memory whatever the model size, works
the same for models built on the meta device, and can run again later (a new argument
structure, the other mode) even when the real weights are sharded by FSDP2.

The graph's ``get_attr`` nodes are retargeted to ``wrapped.<fqn>``: at run time they read
the training module's *shell* (`shared_shell`), a second copy of the module tree whose frozen
parameters are new ``nn.Parameter`` objects over the caller's storage.

``torch.export`` bakes every ``if self.training:`` branch, so each mode is captured separately.
It also traces through ``torch.utils.checkpoint``; `export_graph` records which modules were
checkpointed (Hugging Face ``gradient_checkpointing_enable()`` or the user's own
``checkpoint(...)`` calls) so the training module can checkpoint them again, per block.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

# Private torch API (pinned: torch>=2.13,<2.14): fake tensors are what torch.export traces
# with; the twin is built from them directly so capture allocates no weight memory.
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import CapaBoostWarning, CaptureError, InputError, UncapturableError
from ..structure import config_objects, is_quantized
from .checkpoints import CheckpointRecorder, hf_checkpointed, hf_checkpointing_off
from .diagnose import InputGuard, explain_failure

BASE = "wrapped"  # attribute of the training and deploy modules that holds your model
CONSTANTS = "capaboost_constants"  # lifted tensor constants of the captured graphs
MODES = ("train", "eval")


@dataclass
class Captured:
    """One capture: the graph (get_attr targets rooted at ``wrapped.``) and what the
    generated code needs besides the shared state."""

    mode: str
    graph: fx.Graph
    in_spec: Any
    out_spec: Any
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    range_constraints: dict[str, str] = field(default_factory=dict)
    mutated_buffers: list[str] = field(default_factory=list)
    checkpointed: list[str] = field(default_factory=list)  # modules run under checkpoint
    seconds: float = 0.0
    bound: dict[str, Any] = field(default_factory=dict)  # tensor-free kwargs baked in
    # {(flat input index, dim): size}: dims asked to be dynamic that the model's code fixed
    fixed: dict[tuple[int, int], int] = field(default_factory=dict)


# --------------------------------------------------------------------------- state copies


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    for name, p in model.named_parameters(remove_duplicate=False):
        yield name, p, True
    for name, b in model.named_buffers(remove_duplicate=False):
        yield name, b, False


def _deepcopy(model: nn.Module, memo: dict[int, Any], what: str) -> nn.Module:
    try:
        return copy.deepcopy(model, memo)
    except Exception as e:  # pragma: no cover - exotic modules
        raise CaptureError(
            f"could not build the {what} of the model ({type(e).__name__}: {e}); capaboost_fx "
            "never changes the caller's model, so it needs copy.deepcopy(model) to work."
        ) from e


@contextlib.contextmanager
def export_logs_off() -> Iterator[None]:
    """torch.export's own log lines about dims it specialized: capture says the same in a
    `CapaBoostWarning` with what to do, so they would only repeat it."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def cache_off(module: nn.Module) -> Iterator[None]:
    """``config.use_cache`` off while the model is captured (a decoder returns a KV-cache
    object then, which a training graph needs none of), on again after. The configs are
    your model's own objects (shared, `merge.config_objects`): this is the one moment
    capaboost_fx changes them, and it puts them back."""
    configs = {id(c): c for m in module.modules()
               if getattr(c := getattr(m, "config", None), "use_cache", False) is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


def _capture_device(t: torch.Tensor) -> torch.device:
    return torch.device("cpu") if t.is_meta else t.device


def meta_twin(model: nn.Module) -> nn.Module:
    """The module tree with every parameter and buffer a fake tensor (shape, dtype and device
    only, no storage): what export runs on. Meta parameters get a CPU fake device, so the
    traced code takes the same device branches as for a real CPU model."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, Any] = {}
    with mode:
        for _, t, is_param in _tensors(model):
            if id(t) in memo:
                continue
            fake = torch.empty(t.shape, dtype=t.dtype, device=_capture_device(t))
            memo[id(t)] = (nn.Parameter(fake, requires_grad=t.is_floating_point())
                           if is_param else fake)
    memo.update(config_objects(model))
    return _deepcopy(model, memo, "meta twin")


def fake_mode_of(twin: nn.Module) -> FakeTensorMode:
    """The fake mode `meta_twin` built the twin's tensors in (every fake tensor carries its
    own); a model without parameters or buffers gets a new one."""
    fake = next((t for _, t, _ in _tensors(twin) if isinstance(t, FakeTensor)), None)
    return fake.fake_mode if fake is not None else FakeTensorMode(allow_non_fake_inputs=True)


def shared_shell(model: nn.Module) -> nn.Module:
    """The module tree over the caller's storage: each parameter becomes a new frozen
    ``nn.Parameter`` aliasing the same tensor data (so flags set on it never reach the
    caller's parameters), buffers are shared as they are. No weight is copied."""
    memo: dict[int, Any] = {}
    for _, t, is_param in _tensors(model):
        if id(t) not in memo:
            # A quantized parameter (a tensor subclass with its own state, e.g. bitsandbytes'
            # Params4bit) is shared as it is: it is frozen already, and a detached alias
            # would drop its quantization state.
            memo[id(t)] = (nn.Parameter(t.detach(), requires_grad=False)
                           if is_param and not is_quantized(t) else t)
    for m in model.modules():
        if any(is_quantized(p) for p in m._parameters.values()):
            # Its quantization state may live on the module too (bitsandbytes' MatmulLtState
            # takes over the weight's CB/SCB on the first call): share it, as the weight.
            for k, v in vars(m).items():
                if k not in _MODULE_INTERNALS:
                    memo[id(v)] = v
    memo.update(config_objects(model))
    return _deepcopy(model, memo, "training shell")


# nn.Module's own dicts: a copy gets new ones (its hooks and children are its own)
_MODULE_INTERNALS = frozenset(k for k in vars(nn.Linear(1, 1)) if k.startswith("_"))


def replace_tensor(root: nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put `new` wherever `old` is registered (tied aliases included)."""
    for m in root.modules():
        for d in (m._parameters, m._buffers):
            for k, v in d.items():
                if v is old:
                    d[k] = new


def to_meta(tree: Any) -> Any:
    """Inputs as contiguous meta tensors (kept to capture again later; strides of a view
    never leak into a graph)."""
    def conv(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        return x
    return pytree.tree_map(conv, tree)


def _to_fake(tree: Any, mode: FakeTensorMode, device: torch.device) -> Any:
    def conv(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            with mode:
                return torch.empty(x.shape, dtype=x.dtype,
                                   device=device if x.is_meta else x.device)
        return x
    return pytree.tree_map(conv, tree)


# --------------------------------------------------------------------------- inputs


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Positional example inputs as a tuple (a lone tensor or a list is accepted)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"example_inputs must be a tuple of positional arguments, got "
            f"{type(example_inputs).__name__}; e.g. example_inputs=(input_ids,)."
        )
    return example_inputs


def bind_inputs(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> inspect.BoundArguments:
    sig = inspect.signature(model.forward)
    try:
        return sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(
            f"inputs do not fit {type(model).__name__}.forward{sig}: {e}. Pass the arguments "
            "as you would call the model."
        ) from None


def _batch_and_sequence(x: torch.Tensor) -> dict[int, Any] | None:
    return {d: Dim.AUTO for d in range(min(x.dim(), 2))} or None


def default_dynamic_shapes(
    model: nn.Module, args: tuple, kwargs: Mapping[str, Any],
    dims: Any = _batch_and_sequence,
) -> dict[str, Any] | None:
    """``dynamic_shapes`` by parameter name: ``dims(tensor)`` for every tensor input (default:
    ``Dim.AUTO`` on dims 0 and 1, batch and sequence), None for the rest; the one binding
    rule for capture and ONNX export (keywords a ``**kwargs`` parameter takes included)."""
    bound = bind_inputs(model, args, kwargs)

    def spec_of(x: Any) -> Any:
        return dims(x) if isinstance(x, torch.Tensor) else None

    out: dict[str, Any] = {}
    params = inspect.signature(model.forward).parameters
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec_of, v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            specs = {k: pytree.tree_map(spec_of, v) for k, v in value.items()}
            # None children would be read as tree nodes: a dict of only static leaves is None.
            out[name] = specs if any(v is not None for v in specs.values()) else None
        else:
            out[name] = pytree.tree_map(spec_of, value)
    return out


# --------------------------------------------------------------------------- export


def split_static_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keyword arguments holding no tensor: flags such as ``output_hidden_states=True`` or
    ``use_cache=False``, which the graph bakes in; the rest, the graph's inputs)."""
    static = {k: v for k, v in kwargs.items()
              if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))}
    return static, {k: v for k, v in kwargs.items() if k not in static}


@contextlib.contextmanager
def bind_static(model: nn.Module, static: dict[str, Any]) -> Iterator[None]:
    """Export ``model`` with `static` keyword arguments fixed (they are part of which graph
    runs, not inputs of it)."""
    if not static:
        yield
        return
    import functools

    model.forward = functools.partial(type(model).forward, model, **static)
    try:
        yield
    finally:
        del model.forward


def export_graph(
    twin: nn.Module,
    mode: str,
    args: tuple,
    kwargs: Mapping[str, Any],
    dynamic_shapes: Any,
    tag: str = "",
) -> Captured:
    """Export the meta `twin` in `mode` and retarget its state onto ``wrapped.<fqn>``."""
    mode_name = mode
    was_training = twin.training
    twin.train(mode == "train")
    recorder = CheckpointRecorder(twin)
    mode = fake_mode_of(twin)
    devices = {t.device for _, t, _ in _tensors(twin)} or {torch.device("cpu")}
    device = next(iter(devices))
    hf = hf_checkpointed(twin) if mode_name == "train" else []
    bound, kwargs = split_static_kwargs(kwargs)
    attrs = _module_attrs(twin)
    t0 = time.perf_counter()
    try:
        with (recorder.active(), hf_checkpointing_off(twin), bind_static(twin, bound),
              cache_off(twin), export_logs_off()):
            ep = torch.export.export(twin, tuple(_to_fake(args, mode, device)),
                                     dict(_to_fake(dict(kwargs), mode, device)),
                                     dynamic_shapes=dynamic_shapes, strict=False)
        gm = ep.module()
    except (CaptureError, InputError):
        raise
    except Exception as e:
        raise UncapturableError(
            explain_failure(twin, mode_name, e, tuple(kwargs) + tuple(bound),
                            (tuple(args), dict(kwargs)))) from e
    finally:
        twin.train(was_training)
        _restore_attrs(twin, attrs)
    seconds = time.perf_counter() - t0
    graph = gm.graph
    constants = _retarget(gm, {n for n, _, _ in _tensors(twin)}, f"{tag}{mode_name}_",
                          mode_name)
    _device_follows_inputs(graph, devices)
    graph.owning_module = None  # the graph now runs against the training module's state
    graph.lint()
    ranges = {str(k): str(v) for k, v in ep.range_constraints.items()}
    mutated = _written_state(graph)
    return Captured(mode_name, graph, gm._in_spec, gm._out_spec, constants, ranges, mutated,
                    list(dict.fromkeys(hf + recorder.found)), seconds, bound)


def _retarget(gm: torch.fx.GraphModule, state_names: set[str], prefix: str,
              mode_name: str) -> dict[str, torch.Tensor]:
    """Point the exported graph's state reads at ``wrapped.<fqn>``, its lifted constants
    at the constants module (returned, keyed with `prefix`), and its input guards at
    `InputGuard`."""
    graph = gm.graph
    constants: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            if node.target in state_names:
                node.target = f"{BASE}.{node.target}"
                continue
            value = _fetch(gm, node.target)  # a lifted constant: it lives beside the state
            if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or value.is_meta:
                raise CaptureError(
                    f"captured graph holds a constant {node.target!r} that capaboost_fx cannot "
                    f"share ({type(value).__name__}{' on the meta device' if isinstance(value, torch.Tensor) else ''})."
                )
            key = re.sub(r"\W", "_", f"{prefix}{node.target}")
            constants[key] = value.detach()
            node.target = f"{CONSTANTS}.{key}"
        elif node.op == "call_module" and node.target == "_guards_fn":
            guard = InputGuard(gm._guards_fn.forward, mode_name)
            node.op, node.target = "call_function", guard
        elif node.op == "call_module":
            raise CaptureError(f"unexpected submodule call {node.target!r} in the captured graph")
    return constants


# nn.Module's hook dicts (forward, backward, state-dict hooks): restored by content
_HOOK_DICTS = tuple(k for k in vars(nn.Linear(1, 1)) if "hooks" in k)

_Saved = list[tuple[nn.Module, dict[str, Any], dict[str, dict[Any, Any]]]]


def _module_attrs(model: nn.Module) -> _Saved:
    return [(m, dict(vars(m)), {k: dict(vars(m)[k]) for k in _HOOK_DICTS if k in vars(m)})
            for m in model.modules()]


def _restore_attrs(model: nn.Module, saved: _Saved) -> None:
    """Undo what the model's forward stored on its modules while traced (Funnel keeps
    ``self.seq_len = inputs_embeds.size(1)``): a symbolic size or fake tensor left on the twin
    would break every later copy of it (fold, generate). Hooks the forward registered go too,
    with the flag that says so: transformers installs its output-recording hooks on the first
    call and marks the model (``_output_capturing_hooks_installed``); dropping only the mark
    doubled the hooks at the next capture (Segformer's decode head then zipped shifted
    ``hidden_states`` with its projections; LLaVA's folded graph gained an output)."""
    for m, before, hooks in saved:
        now = vars(m)
        for k in [k for k in now if k not in before]:
            del now[k]
        for k, v in before.items():
            if now.get(k, v) is not v:
                now[k] = v
        for k, contents in hooks.items():
            d = now[k]
            if d.keys() != contents.keys():
                d.clear()
                d.update(contents)


def _written_state(graph: fx.Graph) -> list[str]:
    """State the graph writes in place (batch-norm statistics): ``copy_``/``add_`` and any op
    whose schema marks an argument as written, applied to a ``get_attr``."""
    out = set()
    for n in graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op != "call_function" or schema is None:
            continue
        for arg, a in zip(schema.arguments, n.args, strict=False):
            if (arg.alias_info is not None and arg.alias_info.is_write and
                    isinstance(a, fx.Node) and a.op == "get_attr" and
                    a.target.startswith(BASE + ".")):
                out.add(a.target[len(BASE) + 1:])
    return sorted(out)


def _runtime_device(x: Any) -> torch.device:
    return x.device


def _device_follows_inputs(graph: fx.Graph, devices: set[torch.device]) -> None:
    """Capture ran on fake tensors: every capture device baked into the graph (arange, full, to,
    metadata asserts) becomes the device of the first tensor input (or parameter) at run time,
    so the module runs wherever its state and inputs are."""
    uses = [n for n in graph.nodes if n.op == "call_function" and (
        any(isinstance(a, torch.device) for a in n.args) or
        any(isinstance(v, torch.device) for v in n.kwargs.values()))]
    if not uses:
        return
    source = next((n for n in graph.nodes if n.op == "placeholder"
                   and isinstance(n.meta.get("val"), torch.Tensor)), None)
    if source is None:
        source = next((n for n in graph.nodes if n.op == "get_attr"), None)
    if source is None:
        return
    anchor = source if source.op == "get_attr" else next(
        n for n in reversed(graph.nodes) if n.op == "placeholder")
    with graph.inserting_after(anchor):
        dev = graph.call_function(_runtime_device, (source,))

    def sub(a: Any) -> Any:
        return dev if isinstance(a, torch.device) and (a in devices or a.type == "meta") else a

    for n in uses:
        n.args = tuple(sub(a) for a in n.args)
        n.kwargs = {k: sub(v) for k, v in n.kwargs.items()}


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def capture_graph(twin: nn.Module, mode: str, args: tuple, kwargs: dict, dynamic_shapes: Any,
            tag: str = "", warn: bool = True) -> Captured:
    """One export of the twin (`export_graph`), with the default dynamic dims; dims 0 and 1 of tensor inputs dynamic unless given."""
    user_shapes = dynamic_shapes is not None
    if not user_shapes:
        dynamic_shapes = default_dynamic_shapes(twin, args, split_static_kwargs(kwargs)[1])
    captured = export_graph(twin, mode, args, kwargs, dynamic_shapes, tag)
    if user_shapes:
        return captured  # what the user fixed stays fixed: other sizes get an InputError
    captured.fixed = fixed_dims(captured.graph)
    names = specialized_dims(captured)
    if names and warn:
        sizes = [int(n.rpartition("== ")[2]) for n in names]
        if 1 in sizes or len(set(sizes)) < len(sizes):
            hint = ("Use example inputs with batch >= 2 and sequence >= 2 (and batch != "
                    "sequence), or pass dynamic_shapes=...")
        else:
            hint = ("The model's own code fixes them (e.g. a size read as a Python int): a "
                    "call with other sizes there captures a graph for them once, on first use "
                    "(seconds each, up to 8 sizes).")
        warnings.warn(CapaBoostWarning(f"the capture fixed {names} to the example's size. "
                                       f"{hint}"), stacklevel=4)
    return captured


def fixed_dims(graph: fx.Graph) -> dict[tuple[int, int], int]:
    """``{(flat input index, dim): size}`` for dims 0 and 1 of tensor inputs that came out
    of capture as constants (asked dynamic, fixed by the model's code)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    out = {}
    for i, node in enumerate(graph.find_nodes(op="placeholder")):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d in range(min(val.dim(), 2)):
                if is_concrete_int(val.shape[d]):
                    out[(i, d)] = int(val.shape[d])
    return out



def specialized_dims(captured: Captured) -> list[str]:
    """Tensor inputs whose dim 0 or 1 the capture fixed to the example's size (a constant,
    or a symbolic size with a constant value), as readable names."""
    nodes = list(captured.graph.find_nodes(op="placeholder"))
    out = []
    for (i, d), size in captured.fixed.items():
        val = nodes[i].meta["val"]
        # dim 1 of a float input other than (batch, seq, features) is a feature or channel
        # dim that models fix by design: not worth a warning
        if d == 0 or not val.is_floating_point() or val.dim() == 3:
            out.append(f"{nodes[i].name}.shape[{d}] == {size}")
    return out
