"""Inputs, outputs and dynamic dims of a module about to be exported (shared by export and verify).

- `auto_dynamic_shapes`: which dims of the example inputs are batch / sequence and stay dynamic.
- `choose_dynamic_shapes`: the same, limited to the dims the module is seen to accept.
- `axis_names`: the ONNX names for those dims (``batch``, ``sequence``), shared across inputs.
- `resize` / `second_inputs`: the example resized along the dynamic dims, for a second check.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from capaboost_fx.errors import CapaBoostWarning
from capaboost_fx.passes.capture import (  # noqa: F401  (one input rule)
    as_args,
    bind_inputs,
    default_dynamic_shapes,
)
from capaboost_fx.variant import graph_dynamic_shapes

BATCH = "batch"
SEQUENCE = "sequence"

__all__ = ["BATCH", "SEQUENCE", "auto_dynamic_shapes", "axis_names"]


def flat_tensors(args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    # The exporter's graph inputs are the tensor leaves of (args, kwargs) in this order (kwargs in
    # the order given, not the signature's): measured on torch 2.13.
    return [x for x in pytree.tree_leaves((args, dict(kwargs))) if isinstance(x, torch.Tensor)]


def _name_of(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "_".join(parts)


def input_names_of(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> list[str]:
    """Names for the tensor leaves of a call, in `flat_tensors` order (positional arguments,
    then keywords as given): the parameter's name, with the path inside it for nested inputs
    (``past_key_values_0_1``)."""
    positional = inspect.signature(module.forward).bind_partial(*args).arguments
    names = []
    for key, value in list(positional.items()) + list(kwargs.items()):
        for path, leaf in pytree.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                names.append("_".join(p for p in (key, _name_of(path)) if p))
    return names


def output_names(output: Any) -> list[str]:
    """Readable names for the tensor leaves of a model output: logits, hidden_states_0, output_1."""
    leaves, _ = pytree.tree_flatten_with_path(output)
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = _name_of(path)
        if not name:
            name = "output"
        elif name[0].isdigit():  # a plain tuple/list output
            name = f"output_{name}"
        base, k = name, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def flat_outputs(output: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def auto_dynamic_shapes(
    module: nn.Module,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`dynamic_shapes` for `torch.export`: ``Dim.AUTO`` on dims 0 and 1 (batch, sequence) of
    every tensor input, by parameter name: the rule `transform`'s capture follows.
    ``Dim.AUTO`` lets torch.export keep a dim static where the model fixes it (an image's
    channels, a Linear's features), so what stays dynamic is read from the traced graph.

    Example::

        >>> class M(torch.nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids
        >>> ids = torch.ones(2, 8, dtype=torch.long)
        >>> sorted(auto_dynamic_shapes(M(), (ids,), {"attention_mask": ids}))
        ['attention_mask', 'input_ids']
    """
    return default_dynamic_shapes(module, as_args(example_inputs),
                                  dict(example_kwargs or {})) or {}


def choose_dynamic_shapes(
    module: nn.Module, args: tuple, kwargs: dict
) -> tuple[dict[str, Any] | None, str]:
    """The dims to export dynamic, and where they come from. One rule: a captured graph says.
    A capaboost_fx module reads its captured graph; a ``torch.export(...).module()`` its
    placeholders (a capture without dynamic shapes runs at the example's shapes only: the ONNX
    graph is static, with a warning, since the exporter would drop its guards); any other
    module gets `auto_dynamic_shapes`, and torch.export, tracing it, keeps static what the
    model fixes."""
    if hasattr(module, "dynamic_shapes_for"):  # a capaboost_fx module knows its dims
        return module.dynamic_shapes_for(args, kwargs), "from the captured graph"
    if isinstance(module, torch.fx.GraphModule) and getattr(module, "_in_spec", None):
        dims = graph_dynamic_shapes(module.graph, module._in_spec,
                                    list(inspect.signature(module.forward).parameters), kwargs)
        if dims is not None:
            if any(v is not None for v in pytree.tree_leaves(dims, is_leaf=_is_dims)):
                return dims, "from the captured graph"
            warnings.warn(CapaBoostWarning(
                f"{type(module).__name__} runs only at the example's input shapes (a "
                "torch.export capture without dynamic_shapes); exporting a static ONNX graph. "
                "Capture it with dynamic batch/sequence dims, or pass dynamic_shapes."),
                stacklevel=4,
            )
            return None, "static (the captured graph has no dynamic dims)"
    return auto_dynamic_shapes(module, args, kwargs), "auto (torch.export keeps what the model fixes)"


def _is_dims(x: Any) -> bool:
    return isinstance(x, dict) and all(isinstance(k, int) for k in x)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode and give it back in the mode it came in.

    A graph from `torch.export` has its mode baked in and refuses `.eval()`; it is left alone.
    """
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
    except NotImplementedError:
        pass
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def without_cache(kwargs: dict, output: Any) -> bool:
    """Set ``use_cache=False`` in `kwargs` (and return True) when `output` holds a Hugging Face
    ``Cache`` object, which no ONNX graph can return, and the user did not set it."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return False
    leaves = pytree.tree_leaves(output)
    if "use_cache" in kwargs or not any(isinstance(x, Cache) for x in leaves):
        return False
    kwargs["use_cache"] = False
    return True


def resize(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    # Cyclic reuse of the example's own values keeps token ids, masks and types in range.
    for dim, new in sizes.items():
        index = torch.arange(new, device=t.device) % t.shape[dim]
        t = t.index_select(dim, index)
    return t


def new_size(old: int, is_batch: bool) -> int:
    # Shrink when we can (never past an upper bound such as max_position_embeddings), but stay
    # >= 2: torch.export specialises sizes 0 and 1.
    if is_batch:
        return old + 1
    return old - 1 if old >= 3 else old + 1


def second_inputs(
    args: tuple, kwargs: dict, specs: list[tuple[str, str, list]], batch_only: bool
) -> tuple[tuple, dict] | None:
    flat, spec = pytree.tree_flatten((args, kwargs))
    tensors = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    symbol_size: dict[str, int] = {}
    changed = False
    for slot, (_, _, shape) in zip(tensors, specs, strict=True):
        t = flat[slot]
        sizes = {}
        for dim, d in enumerate(shape):
            if not isinstance(d, str) or dim >= t.ndim or (batch_only and dim != 0):
                continue
            sizes[dim] = symbol_size.setdefault(d, new_size(t.shape[dim], dim == 0))
        if sizes:
            flat[slot] = resize(t, sizes)
            changed = True
    if not changed:
        return None
    return pytree.tree_unflatten(flat, spec)


_AUTO_SYMBOL = re.compile(r"^s\d+$")  # torch.export's names for Dim.AUTO dims: s72, s53


def axis_names(inputs: list[tuple[str, list[Any]]]) -> dict[str, str]:
    """ONNX names for the exporter's symbolic input dims: ``batch`` and ``sequence``.

    `inputs`: (name, shape) per graph input, symbolic dims as strings. Every auto-named symbol
    (``s72``) at dim 0 becomes ``batch``, shared by all inputs (torch.export may give
    ``input_ids`` and ``attention_mask`` separate batch symbols; they are one batch). The first
    auto-named symbol at dim 1 becomes ``sequence``; another, independent one (say a decoder
    length beside an encoder length) becomes ``sequence_2``, and so on: a shared name would claim
    they are equal. Names chosen by the user (``Dim("tokens")``) are kept.

    Example::

        >>> axis_names([("input_ids", ["s72", "s53"]), ("attention_mask", ["s43", "s53"])])
        {'s72': 'batch', 's53': 'sequence', 's43': 'batch'}
    """
    mapping: dict[str, str] = {}
    sequences = 0
    for _, shape in inputs:
        for dim, d in enumerate(shape):
            if not isinstance(d, str) or not _AUTO_SYMBOL.match(d) or d in mapping:
                continue
            if dim == 0:
                mapping[d] = BATCH
            elif dim == 1:
                sequences += 1
                mapping[d] = SEQUENCE if sequences == 1 else f"{SEQUENCE}_{sequences}"
    return mapping


# --- dims a file fixes that the model runs at (issue 31) -------------------------------------

_SOURCE = re.compile(r"\['([^'\]]+)'\]\.size\(\)\[(\d+)\]$")


def _user_frame() -> str | None:
    """The innermost frame of the model's own code on the current stack (not torch's, not
    ours, not the standard library's): ``file:line in function: source``."""
    import linecache
    import os
    import sysconfig
    import traceback

    stdlib = sysconfig.get_paths()["stdlib"]
    skip = (f"{os.sep}torch{os.sep}", f"{os.sep}capaboost_fx{os.sep}", f"{os.sep}numpy{os.sep}",
            f"{os.sep}sympy{os.sep}", "<frozen", "<string>", "<eval")
    found = None
    for frame in traceback.extract_stack():
        name = frame.filename
        if any(s in name for s in skip) or (name.startswith(stdlib)
                                             and "site-packages" not in name):
            continue
        found = frame
    if found is None:
        return None
    code = (found.line or linecache.getline(found.filename, found.lineno or 0)).strip()
    return f"{os.path.basename(found.filename)}:{found.lineno} in {found.name}: {code}"


@contextlib.contextmanager
def specializations(found: dict[tuple[str, int], str]) -> Iterator[None]:
    """While a ``torch.export`` traces inside this block, record where the model's code fixed
    an input dim to a constant: ``found[(input name, dim)] = "file:line in fn: code"``.
    (torch.export's own ``replacements_slocs`` names only its framework frame.)"""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    original = ShapeEnv._set_replacement

    def record(self: Any, a: Any, tgt: Any, msg: str) -> None:
        try:
            if getattr(tgt, "is_Integer", False) and a in self.var_to_sources:
                for source in self.var_to_sources[a]:
                    m = _SOURCE.search(source.name)
                    if m and (m.group(1), int(m.group(2))) not in found:
                        where = _user_frame()
                        if where:
                            found[(m.group(1), int(m.group(2)))] = where
        except Exception:  # noqa: BLE001 - a diagnostic must never break the export
            pass
        return original(self, a, tgt, msg)

    ShapeEnv._set_replacement = record
    try:
        yield
    finally:
        ShapeEnv._set_replacement = original


def serving_dims(module: nn.Module, args: tuple, kwargs: dict,
                 file_inputs: list[tuple[str, list[Any]]]) -> dict[str, dict[int, int]]:
    """The batch and sequence dims (dims 0 and 1) the file at `file_inputs` (name, shape per
    input, in `flat_tensors` order) fixes to a size while the PyTorch module runs at another:
    ``{input name: {dim: size}}``. A dim the model itself fixes (an image's channels, a size
    its weights set) is not reported: the module refuses the other size too.

    Dims of one size are changed together (``input_ids`` and ``attention_mask`` share the
    sequence), the batch across all inputs."""
    tensors = flat_tensors(args, kwargs)
    if len(tensors) != len(file_inputs):
        return {}
    groups: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for slot, (t, (name, shape)) in enumerate(zip(tensors, file_inputs, strict=True)):
        for dim in (0, 1):
            if dim < t.ndim and dim < len(shape):
                groups.setdefault((dim, int(t.shape[dim])), []).append((slot, name))
    fixed: dict[str, dict[int, int]] = {}
    flat, spec = pytree.tree_flatten((args, kwargs))
    slots = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    for (dim, size), members in groups.items():
        static = [(s, n) for s, n in members if isinstance(file_inputs[s][1][dim], int)]
        if not static:
            continue
        changed = list(flat)
        for s, _ in members:
            changed[slots[s]] = resize(tensors[s], {dim: new_size(size, dim == 0)})
        a, k = pytree.tree_unflatten(changed, spec)
        try:
            with eval_mode(module), torch.no_grad():
                module(*a, **k)
        except Exception:  # noqa: BLE001 - the model refuses this size too: not the file's
            continue
        for _, name in static:
            fixed.setdefault(name, {})[dim] = size
    return fixed


def fixed_dims_message(where: str, fixed: Mapping[str, Mapping[int, int]],
                       lines: Mapping[tuple[str, int], str] | None = None) -> str:
    """What `fixed` means for a user of the file at `where`, and what to do."""
    parts = []
    for name, dims in fixed.items():
        for dim, size in dims.items():
            what = "batch" if dim == 0 else "sequence" if dim == 1 else f"dim {dim}"
            line = (lines or {}).get((name, dim))
            parts.append(f"input {name!r} dim {dim} ({what}) is fixed at {size}"
                         + (f" (fixed by the model's code at {line})" if line else ""))
    return (f"{where} accepts only the example's size for some inputs, though the PyTorch "
            f"model runs at others: {'; '.join(parts)}. No exporter made this dim dynamic. "
            "Export at the size you serve, pad requests to it, or export one file per size.")
