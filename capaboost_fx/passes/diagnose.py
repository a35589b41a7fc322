"""Diagnosis: why a capture failed and where (the model's own line), what to try; and the input
guards that turn torch.export's assertions into errors in the user's terms."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import InputError


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


def explain_failure(model: nn.Module, mode: str, err: Exception,
                     names: tuple[str, ...] = ()) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    lines = text.splitlines()
    short = "\n    ".join(lines[:12]) + ("\n    ..." if len(lines) > 12 else "")
    where = model_frame(err)
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
    """Runs torch.export's input guards; a violation becomes an `InputError` that says what
    was captured and how to widen it."""

    __name__ = "capaboost_input_guard"

    def __init__(self, fn: Any, mode: str, range_constraints: Mapping[Any, Any]) -> None:
        self.fn, self.mode = fn, mode
        self.ranges = {str(k): str(v) for k, v in range_constraints.items()}

    def __call__(self, *args: Any) -> None:
        try:
            self.fn(*args)
        except AssertionError as e:
            text = str(e)
            shape = "size" in text or "shape" in text or re.search(r"\bs\d+\b", text)
            if shape:
                hint = ("Captured dynamic ranges: "
                        f"{self.ranges or 'none (all shapes static)'}. Re-run transform with "
                        "example inputs of a typical shape (batch >= 2, batch != sequence "
                        "length) or pass dynamic_shapes=... with wider Dim ranges.")
            else:
                hint = ("This is not a shape: the example fixed a non-tensor argument's value; "
                        "call with the same value, or leave the argument out of the example.")
            what = "shapes" if shape else "graph"
            raise InputError(
                f"input does not fit the {what} captured in {self.mode} mode ({text}). {hint}"
            ) from None

    def __repr__(self) -> str:
        return f"InputGuard({self.mode})"
