"""Why an ONNX export failed, in a few lines: the stage, the first failing op, the module it came
from, the model's own line, and what to try. The exporter's full error stays the cause.

``torch.onnx.export(dynamo=True)`` fails in one of two places:

- step 1, ``torch.export`` cannot trace the model (a branch on tensor values, numpy on
  tensors, ...): the model's own line is found in the traceback (`model_frame`);
- step 3, an ATen or custom op has no ONNX translation: the fx node being translated is read
  from the exporter's frames, and with it the module (``nn_module_stack``) and the source line
  (``stack_trace``) it was traced from.

Its own message is a page of generic advice with terminal colours; `export_failure` turns it
into an `ExportError` that names what failed and where.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from capaboost_fx.errors import ExportError
from capaboost_fx.passes.diagnose import model_frame

__all__ = ["ExportFailure", "export_failure", "first_line"]

_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def first_line(err: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` (no terminal colours), at most `limit` characters."""
    text = _COLOURS.sub("", str(err)).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _failing_node(errors: list[BaseException]) -> torch.fx.Node | None:
    """The fx node the ONNX translator was working on when it failed (its frames hold it)."""
    for err in errors:
        for frame, _ in traceback.walk_tb(err.__traceback__):
            node = frame.f_locals.get("node")
            if isinstance(node, torch.fx.Node):
                return node
    return None


def _module_of(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return f"{path or '<root>'} ({cls})"


def _source_of(node: torch.fx.Node) -> str | None:
    lines = [s.strip() for s in (node.meta.get("stack_trace") or "").strip().splitlines()]
    if len(lines) < 2:
        return None
    where = re.match(r'File "([^"]+)", line (\d+), in (\S+)', lines[-2])
    if not where:
        return None
    name = where.group(1).rsplit("/", 1)[-1]
    return f"{name}:{where.group(2)} in {where.group(3)}: {lines[-1]}"


@dataclass(frozen=True)
class ExportFailure:
    """What `export_failure` found: which step failed, on what, where, and what to try."""

    stage: str  # "torch.export" (tracing the model) or "translation" (an op to ONNX)
    cause: str  # the innermost error's first line
    op: str | None = None  # the op without an ONNX translation
    module: str | None = None  # "encoder.layer.0.attention (BertAttention)"
    source: str | None = None  # the model's line
    hint: str = ""

    def message(self, what: str) -> str:
        lines = [f"ONNX export of {what} failed at {self.stage}: {self.cause}"]
        if self.op:
            lines.append(f"  op without an ONNX translation: {self.op}")
        if self.module:
            lines.append(f"  in module: {self.module}")
        if self.source:
            lines.append(f"  model code: {self.source}")
        if self.hint:
            lines.append(f"  try: {self.hint}")
        lines.append("  (the exporter's full error is this exception's __cause__)")
        return "\n".join(lines)


def _hint(stage: str, cause: str, torchscript: bool) -> str:
    ts = ("optimize='torchscript' (the TorchScript exporter: it traces the example's path and "
          "has its own op translations; check the file's outputs, which export_onnx verifies)")
    if stage == "translation":
        return (f"{ts}, or a newer torch whose exporter translates the op" if torchscript else
                "a newer torch whose exporter translates the op, or replace the op in the model")
    if "data-dependent" in cause.lower() or "GuardOnDataDependent" in cause:
        fix = ("torch.export cannot branch on tensor values: rewrite that line with torch.cond "
               "or torch._check")
        return f"{fix}, or {ts}" if torchscript else fix
    return ts if torchscript else "check that the module runs under torch.export.export"


def export_failure(err: BaseException, what: str, *, torchscript: bool,
                   tracing: bool = False) -> ExportError:
    """A short `ExportError` for a failed ``torch.onnx.export(dynamo=True)``, `err` as its cause.
    `what`: the module and the target file; `torchscript`: the TorchScript exporter is an
    option for this module (it has an eager form); `tracing`: `err` came from
    ``torch.export.export`` itself."""
    errors = _chain(err)
    names = {type(e).__name__ for e in errors}
    node = _failing_node(errors) if "ConversionError" in names or "DispatchError" in names \
        else None
    innermost = errors[-1]
    if node is not None:
        dispatch = next((e for e in errors if type(e).__name__ == "DispatchError"), innermost)
        target: Any = node.target
        op = getattr(target, "name", lambda: None)() or str(target)
        found = ExportFailure("translation", first_line(dispatch), op=op, module=_module_of(node),
                              source=_source_of(node))
    else:
        stage = "torch.export" if tracing or "TorchExportError" in names else "export"
        found = ExportFailure(stage, first_line(innermost), source=model_frame(innermost))
    hint = _hint(found.stage, found.cause, torchscript)
    found = ExportFailure(found.stage, found.cause, found.op, found.module, found.source, hint)
    return ExportError(found.message(what))
