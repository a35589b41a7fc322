"""Checkpoint regions: which modules a model runs under activation checkpointing.

``torch.export`` traces through ``torch.utils.checkpoint`` and keeps every activation. While
capturing, `CheckpointRecorder` runs each checkpointed region plainly and records the module it
covers (Hugging Face ``gradient_checkpointing_enable()``, or ``checkpoint(...)`` in the user's
own blocks), so the training module can checkpoint those blocks again.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch.utils.checkpoint as torch_checkpoint
from torch import nn

_PATCH_LOCK = threading.RLock()


class CheckpointRecorder:
    """While exporting: a module call stack (global forward hooks) and, for every
    ``torch.utils.checkpoint`` region, the module it checkpoints. The region runs its function
    directly, so export records the plain ops."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.found: list[str] = []

    def _module_of(self, fn: Any) -> str | None:
        while isinstance(fn, functools.partial):
            fn = fn.func
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module) and id(owner) in self.names:
            return self.names[id(owner)]
        return self.stack[-1] if self.stack else None

    def _record(self, fn: Any) -> None:
        name = self._module_of(fn)
        if name is not None and name not in self.found:
            self.found.append(name)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        recorder = self

        def pre(module: nn.Module, args: Any) -> None:
            recorder.stack.append(recorder.names.get(id(module), "?"))

        def post(module: nn.Module, args: Any, out: Any) -> None:
            if recorder.stack:
                recorder.stack.pop()

        def without_reentrant(function: Any, *rest: Any, **kwargs: Any) -> Iterator[None]:
            recorder._record(function)
            yield

        class Reentrant:
            @staticmethod
            def apply(function: Any, preserve: Any, *args: Any) -> Any:
                recorder._record(function)
                return function(*args)

        if not hasattr(torch_checkpoint, "_checkpoint_without_reentrant_generator"):
            yield  # another torch: no recording (the private names moved); capture goes on
            return
        # Process-global while it lasts (global hooks, patched torch internals): one capture
        # at a time, whatever thread calls it.
        with _PATCH_LOCK:
            handles = [nn.modules.module.register_module_forward_pre_hook(pre),
                       nn.modules.module.register_module_forward_hook(post)]
            # `checkpoint()` looks these up at call time, so a region runs its function
            # plainly and is recorded, however the user reached checkpoint (import, partial).
            saved = (torch_checkpoint._checkpoint_without_reentrant_generator,
                     torch_checkpoint.CheckpointFunction)
            torch_checkpoint._checkpoint_without_reentrant_generator = without_reentrant
            torch_checkpoint.CheckpointFunction = Reentrant
            try:
                yield
            finally:
                (torch_checkpoint._checkpoint_without_reentrant_generator,
                 torch_checkpoint.CheckpointFunction) = saved
                for h in handles:
                    h.remove()


def hf_checkpointed(model: nn.Module) -> list[str]:
    """Innermost modules with Hugging Face's ``gradient_checkpointing`` flag on."""
    flagged = [n for n, m in model.named_modules()
               if getattr(m, "gradient_checkpointing", False) is True and n]
    return [n for n in flagged if not any(o.startswith(n + ".") for o in flagged)]


@contextlib.contextmanager
def hf_checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Trace checkpointed HF layers as plain code (their wrappers call a pre-bound function)."""
    saved = [(m, m.gradient_checkpointing) for m in model.modules()
             if getattr(m, "gradient_checkpointing", False) is True]
    for m, _ in saved:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, v in saved:
            m.gradient_checkpointing = v
