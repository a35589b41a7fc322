"""Diagnosis: why a capture failed and where (the model's own line), what to try; and the input
guards that turn torch.export's assertions into errors in the user's terms."""

from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CapaBoostError, InputError, close_names, forward_error


def model_frame(err: BaseException) -> str | None:
    """Where in the model's own code (not torch's, not ours) `err` was raised:
    ``file:line in function: source``, the innermost such frame."""
    import linecache
    import traceback

    skip = (f"{os.sep}torch{os.sep}", f"{os.sep}capaboost_fx{os.sep}", f"{os.sep}numpy{os.sep}",
            "<frozen", "<string>", "<eval", f"{os.sep}contextlib.py", f"{os.sep}functools.py")
    found = None
    for frame, line in traceback.walk_tb(err.__traceback__):
        name = frame.f_code.co_filename
        if not any(s in name for s in skip):
            found = (name, line, frame.f_code.co_name)
    if found is None and err.__cause__ is not None and err.__cause__ is not err:
        return model_frame(err.__cause__)
    if found is None:
        return None
    name, line, func = found
    code = linecache.getline(name, line).strip()
    return f"{os.path.basename(name)}:{line} in {func}: {code}"


def _over_limit(model: nn.Module, inputs: tuple[tuple, Mapping[str, Any]],
                text: str) -> str | None:
    """An example tensor longer than the model's own position limit (config, and named in
    torch's error `text`), said as such."""
    config = getattr(model, "config", None)
    limits = {k: v for k in _LIMITS if isinstance(v := getattr(config, k, None), int)
              and re.search(rf"\b{v}\b", text)}
    args, kwargs = inputs
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    named = [(params[i] if i < len(params) else f"argument {i}", a) for i, a in enumerate(args)]
    for name, t in [*named, *kwargs.items()]:  # positions: dim 1 of (batch, sequence, ...)
        n = t.shape[1] if isinstance(t, torch.Tensor) and t.dim() >= 2 else 0
        key = next((k for k, v in limits.items() if n > v), None)
        if key is not None:
            return (f"{name} has shape {tuple(t.shape)}: dim 1 is {n}, but the model accepts "
                    f"at most {limits[key]} positions (config.{key} = {limits[key]}). This is "
                    "the model's own limit, not a capture setting: truncate or split the input "
                    f"to at most {limits[key]}")
    return None


def explain_failure(model: nn.Module, mode: str, err: Exception,
                    names: tuple[str, ...] = (),
                    inputs: tuple[tuple, Mapping[str, Any]] = ((), {})) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    lines = text.splitlines()
    short = "\n    ".join(lines[:12]) + ("\n    ..." if len(lines) > 12 else "")
    where = model_frame(err)
    limit = _over_limit(model, inputs, text)
    if limit is not None:
        return (f"torch.export could not capture {type(model).__name__} in {mode} mode: "
                f"{limit}.\n  torch's error{f' at {where}' if where else ''}:\n    {short}")
    hints = []
    if "Cache" in text or "past_key_values" in text:
        hints.append("the model returns a KV cache: pass use_cache=False in the example, or "
                     "set model.config.use_cache = False")
    if "Constraints violated" in text or "specialized" in text.lower():
        hints.append("a dimension marked dynamic is fixed by the model; pass dynamic_shapes=... "
                     "giving it a Dim range, or dynamic_shapes={} for static shapes")
    if "data-dependent" in text.lower() or "GuardOnDataDependent" in text:
        if "labels" in names and where and ("loss" in where.lower() or "label" in where):
            hints.append("the model's loss code branches on label values: capture without "
                         "labels and compute the loss from the logits yourself")
        hints.append("the model branches on tensor values there; torch.export needs "
                     "torch._check or torch.cond (see torch.export docs on data-dependent "
                     "control flow)")
    if "meta" in text.lower() and ("device" in text.lower() or "item" in text.lower()):
        hints.append("capture runs on meta tensors (no weights are touched); the model reads a "
                     "tensor's values or device while tracing, which torch.export cannot do")
    if not hints:
        hints.append("check that the model runs eagerly with these example inputs, or pass "
                     "dynamic_shapes=... to fix which dims may vary (see torch.export.Dim)")
    if mode == "train":  # the eager path is for training; an export needs a graph
        hints.append("train it as it runs with capture='eager' (capture='auto', the default, "
                     "does so when the model runs on the example)")
    at = f"\n  in the model's code at {where}" if where else ""
    return (f"torch.export could not capture {type(model).__name__} in {mode} mode:{at}\n    "
            f"{short}\nTry: " + "; or ".join(hints) + ".")


class InputGuard:
    """Runs torch.export's input guards; a violation becomes an `InputError` (which
    `call_error` then restates in the arguments' names and shapes)."""

    __name__ = "capaboost_input_guard"

    def __init__(self, fn: Any, mode: str) -> None:
        self.fn, self.mode = fn, mode

    def __call__(self, *args: Any) -> None:
        try:
            self.fn(*args)
        except AssertionError as e:
            text = str(e)
            if "size" in text or "shape" in text or re.search(r"\bs\d+\b", text):
                err = InputError(f"the input shapes do not fit those captured in {self.mode} "
                                 f"mode ({text})")
                err.guard = True  # call_error restates it in the arguments' names
                raise err from None
            raise InputError(
                f"input does not fit the graph captured in {self.mode} mode ({text}). This is "
                "not a shape: the example fixed a non-tensor argument's value; call with the "
                "same value, or leave the argument out of the example.") from None

    def __repr__(self) -> str:
        return f"InputGuard({self.mode})"


#: Config fields that bound a sequence dimension (Hugging Face names).
_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length",
           "n_ctx", "seq_length")


def _range(size: Any) -> tuple[int, int | None] | None:
    """(low, high or None) captured for a symbolic dim; None for a fixed one."""
    if not isinstance(size, torch.SymInt) or size.node.expr.is_number:
        return None
    expr = size.node.expr
    vr = size.node.shape_env.var_to_range.get(expr) if expr.is_Symbol else None
    if vr is None:
        return (0, None)
    low, high = vr.lower, vr.upper
    return (int(low) if low.is_Integer else 0), (int(high) if high.is_Integer else None)


def _int(size: Any) -> int:
    return int(size.node.expr) if isinstance(size, torch.SymInt) else int(size)


def _fmt(size: Any) -> str:
    r = _range(size)
    if r is None:
        return str(_int(size))
    return f"{r[0]}..{r[1]}" if r[1] is not None else f">={r[0]}"


LEGEND = "(n..m: the range captured for a dim; >=n: at least n)"


def unknown_arguments(module: nn.Module, kwargs: Mapping[str, Any], known: set[str],
                      err: BaseException) -> CapaBoostError | None:
    """A call whose keyword names no captured call used (a new structure is captured, and
    that capture failed): say which names are new, and the captured name each is closest
    to (``input_id`` -> ``input_ids``), rather than blame the capture."""
    new = [k for k in kwargs if k not in known]
    if not new or not known:
        return None
    close = {k: close_names(k, sorted(known), 1)[0] for k in new}
    likely = {k: c for k, c in close.items() if difflib.SequenceMatcher(None, k, c).ratio() > 0.8}
    hint = "; did you mean " + ", ".join(f"{c!r} for {k!r}" for k, c in likely.items()) \
        if likely else ""
    text = " ".join(str(err).split())
    first = (text[:300] + " ...") if len(text) > 300 else (text or type(err).__name__)
    return InputError(
        f"{type(module).__name__}: this call passes {new}, which no captured call did "
        f"(captured: {sorted(known)}){hint}? A call with other argument names is captured "
        f"anew, and that capture failed: {first}")


def _captured(name: str, val: torch.Tensor) -> str:
    dims = ", ".join(_fmt(s) for s in val.shape)
    return f"{name}: {str(val.dtype).replace('torch.', '')} ({dims})"


def _given(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{name}: {str(value.dtype).replace('torch.', '')} {tuple(value.shape)}"
    return f"{name}={value!r}"[:80]


def _limit(config: Any, high: int) -> str | None:
    for key in _LIMITS:
        if getattr(config, key, None) == high:
            return key
    return None


def _kind(t: torch.Tensor) -> str:
    return "floating-point" if t.is_floating_point() or t.is_complex() else "integer"


def _structure(name: str, c: torch.Tensor, g: Any) -> str | None:
    if not isinstance(g, torch.Tensor):
        what = "None" if g is None else f"a {type(g).__name__}"
        return (f"{name} is {what}; the module was captured with a tensor there: "
                f"{_captured(name, c)}")
    if g.dim() != c.dim():
        return (f"{name} has shape {tuple(g.shape)}, rank {g.dim()}; the module takes "
                f"{name} of rank {c.dim()}, as captured: {_captured(name, c)} {LEGEND}")
    if _kind(g) != _kind(c):
        ids = " (ids index an embedding: pass a torch.long tensor)" if _kind(c) == "integer" else ""
        return (f"{name} has dtype {g.dtype}; the module was captured with {_kind(c)} "
                f"{c.dtype} there{ids}")
    return None


def _size(name: str, d: int, c: torch.Tensor, g: torch.Tensor, config: Any) -> str | None:
    r, n, shape = _range(c.shape[d]), g.shape[d], tuple(g.shape)
    if r is None:
        if n == _int(c.shape[d]):
            return None
        return (f"{name} has shape {shape}: dim {d} is {n}, but it is fixed at "
                f"{_int(c.shape[d])} in the captured graph ({_captured(name, c)}); the model's "
                "weights or the dynamic_shapes given to transform fix it")
    low, high = r
    if high is None or n <= high:
        return None
    key = _limit(config, high)
    if key:
        return (f"{name} has shape {shape}: dim {d} is {n}, but the model accepts at most "
                f"{high} positions (config.{key} = {high}). This is the model's own limit, "
                f"not a capture setting: truncate or split the input to at most {high} (e.g. "
                f"tokenizer(..., truncation=True, max_length={high}))")
    return (f"{name} has shape {shape}: dim {d} is {n}, above the range {low}..{high} captured "
            "for it. torch.export found that bound in the model's code (or it is the Dim(max=...) "
            f"you gave transform in dynamic_shapes): keep this dim <= {high}, or re-run "
            "transform with a wider Dim if the model allows more")


def _relation(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> str | None:
    seen: dict[Any, tuple[str, int, int]] = {}
    for name, c, g in pairs:
        for d, size in enumerate(c.shape):
            if not isinstance(size, torch.SymInt) or not size.node.expr.is_Symbol:
                continue
            first = seen.setdefault(size.node.expr, (name, d, g.shape[d]))
            if first[2] != g.shape[d]:
                return (f"{name}.shape[{d}] is {g.shape[d]} but {first[0]}.shape[{first[1]}] is "
                        f"{first[2]}: the captured graph treats them as one size, so they must be "
                        "equal")
    return None


def input_mismatch(inputs: list[tuple[str, Any]], given: list[Any], config: Any) -> str | None:
    """How the call's flat inputs differ from the captured ones (`inputs`: ``(name, meta
    value)`` per placeholder), in the arguments' names: rank or dtype first (a wrong rank
    explains every later symptom), then a size outside its captured range or the model's
    limit, then sizes the graph needs equal."""
    pairs = [(n, c, g) for (n, c), g in zip(inputs, given, strict=False)
             if isinstance(c, torch.Tensor)]
    for n, c, g in pairs:
        if (why := _structure(n, c, g)) is not None:
            return why
    for n, c, g in pairs:
        for d in range(c.dim()):
            if (why := _size(n, d, c, g, config)) is not None:
                return why
    return _relation(pairs)


def _vocabulary(err: BaseException, inputs: list[tuple[str, Any]], given: list[Any],
                config: Any) -> str | None:
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or "index out of range" not in str(err):
        return None
    for (name, _), g in zip(inputs, given, strict=False):
        if isinstance(g, torch.Tensor) and _kind(g) == "integer" and g.numel() and (
                int(g.max()) >= vocab or ("label" not in name and int(g.min()) < 0)):
            return (f"{name} holds values {int(g.min())}..{int(g.max())}, but the model's "
                    f"vocabulary has {vocab} entries (config.vocab_size): ids must be in "
                    f"0..{vocab - 1}")
    return None


def _config(module: nn.Module) -> Any:
    try:
        return getattr(module, "config", None)
    except Exception:  # noqa: BLE001 - a model without config
        return None


def refused_call(module: nn.Module, sizes: Mapping[str, int] | None,
                 variants: list[tuple[list, list]], err: BaseException) -> CapaBoostError | None:
    """The error for a call no captured graph fits and for which capturing one failed
    (`err`): how its arguments differ from those captured (`variants`), or, for `sizes` the
    model's code fixed, that. None: nothing to say beyond `err`."""
    why = None
    for inputs, given in variants:
        try:
            why = why or input_mismatch(inputs, given, _config(module))
        except Exception:  # noqa: BLE001 - a diagnosis must not hide the error it explains
            pass
    tail = f"; a graph for this call could not be captured either ({type(err).__name__})"
    if why is not None:
        return forward_error(err, f"{type(module).__name__}: {why}{tail}.", blame=True)
    if sizes is None:
        return None
    return InputError(f"{type(module).__name__}: the model fixes {dict(sizes)} and refuses "
                      f"this call's sizes there{tail}: {err}")


def call_error(err: BaseException, module: nn.Module, mode: str,
               inputs: list[tuple[str, Any]], given: list[Any]) -> CapaBoostError:
    """The library error for `err`, raised while `module` ran a captured graph in `mode`:
    which argument is to blame and how, in its own name and shape, when that can be told."""
    config = _config(module)
    try:
        why = input_mismatch(inputs, given, config) or _vocabulary(err, inputs, given, config)
    except Exception:  # noqa: BLE001 - a diagnosis must not hide the error it explains
        why = None
    what = f"{type(module).__name__} ({mode} graph)"
    captured = "; ".join(_captured(n, c) for n, c in inputs if isinstance(c, torch.Tensor))
    called = "; ".join(_given(n, g) for (n, _), g in zip(inputs, given, strict=False))
    if why is not None:
        return forward_error(err, f"{what}: {why}.", blame=True)
    if getattr(err, "guard", False):
        named = [n for n, _ in inputs if re.search(rf"\b{re.escape(n)}\b", str(err))]
        if len(named) > 1:  # a relation between the inputs: the call's, not the capture's
            return InputError(
                f"{what}: this call's {' and '.join(named)} do not fit together as the model's "
                f"code requires ({err}). Called with {called}. Check the batch: the graph "
                "takes any sizes that satisfy this relation.")
        return InputError(
            f"{what}: {err}. Called with {called}; captured for {captured} {LEGEND}. Re-run "
            "transform with example inputs of a typical shape (batch >= 2, batch != sequence "
            "length) or pass dynamic_shapes=... with wider Dim ranges.")
    where = model_frame(err)
    at = f" at {where}" if where else ""
    return forward_error(
        err, f"{what} raised {type(err).__name__}{at}: {err}\nCalled with {called}; captured "
        f"for {captured}.")


def forward_failure(err: BaseException, model: nn.Module,
                    given: Mapping[str, Any] | None = None,
                    seen: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None
                    ) -> CapaBoostError:
    """The library error for `err`, raised by `model`'s own forward running eagerly. With the
    call's tensors by name (`given`) and what an earlier call that ran passed (`seen`: dtype
    and shape by name), an argument of another rank or dtype kind, or ids beyond the
    vocabulary, is named first."""
    where = model_frame(err)
    at = f" at {where}" if where else ""
    why, given = None, given or {}
    try:
        why = _unlike_earlier(given, seen or {}) or _vocabulary(
            err, [(n, None) for n in given], list(given.values()), _config(model))
    except Exception:  # noqa: BLE001 - a diagnosis must not hide the error it explains
        pass
    lead = f"{why}. " if why else ""
    return forward_error(err, f"{lead}{type(model).__name__}'s own forward (run eagerly) raised "
                              f"{type(err).__name__}{at}: {err}", blame=why is not None)


def _unlike_earlier(given: Mapping[str, Any],
                    seen: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> str | None:
    for name, g in given.items():
        if name not in seen or not isinstance(g, torch.Tensor):
            continue
        dtype, shape = seen[name]
        if g.dim() != len(shape):
            return (f"{name} has shape {tuple(g.shape)}, rank {g.dim()}; the calls that ran "
                    f"passed {name} of rank {len(shape)} (e.g. {shape})")
        if _kind(g) != _kind(torch.empty(0, dtype=dtype)):
            return (f"{name} has dtype {g.dtype}; the calls that ran passed {dtype}"
                    + (" (ids index an embedding: pass a torch.long tensor)"
                       if _kind(torch.empty(0, dtype=dtype)) == "integer" else ""))
    return None
