"""Blocks: which modules of the model become separately callable `BlockProgram`s (transformer
layers: ``fully_shard`` each, checkpoint each), and installing them in the shell.

Found automatically (the classes a Hugging Face model lists in ``_no_split_modules``, else the
entries of every outermost ``nn.ModuleList`` of >= 2), named by ``blocks=`` / ``checkpoint=``
patterns, or recorded as checkpointed by the model itself during capture.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import SpecTypeError, TargetNotFoundError, close_names
from ..spec import pattern_matches


def auto_blocks(model: nn.Module) -> list[str]:
    """Transformer layers: modules of the classes a Hugging Face model lists in
    ``_no_split_modules``, else the entries of every outermost ``nn.ModuleList`` of >= 2."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [n for n, m in model.named_modules() if n and type(m).__name__ in names]
    if not found:
        for n, m in model.named_modules():
            if isinstance(m, nn.ModuleList) and len(m) >= 2:
                found += [f"{n}.{i}" if n else str(i) for i in range(len(m))]
    return _outermost(found)


def _outermost(names: list[str]) -> list[str]:
    out = []
    for n in dict.fromkeys(names):
        if not any(n.startswith(o + ".") for o in names if o != n):
            out.append(n)
    return out


def modules_matching(model: nn.Module, patterns: Any, what: str) -> list[str]:
    """The modules `patterns` name; a pattern that names none is a `TargetNotFoundError`
    naming it, what it was matched against, and the closest module names."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise SpecTypeError(f"{what}= takes a pattern or a list of patterns (globs such as "
                            f"'model.layers.*'), got {patterns!r}.")
    names = [n for n, _ in model.named_modules() if n]
    out = []
    for p in patterns:
        hits = [n for n in names if pattern_matches(p, n)]
        if not hits:
            raise TargetNotFoundError(
                f"{what} entry {p!r} names no module of the model. Closest names: "
                f"{close_names(p, names)}. Use globs such as 'model.layers.*'."
            )
        out += hits
    return out


def plan_blocks(twin: nn.Module, blocks: Any, checkpoint: Any,
                 detected: list[str]) -> tuple[list[str], set[str], set[str]]:
    """(blocks to split, blocks to checkpoint, blocks the user named explicitly)."""
    if blocks == "auto":
        chosen, explicit = auto_blocks(twin), set()
    elif not blocks:
        chosen, explicit = [], set()
    else:
        chosen = modules_matching(twin, blocks, "blocks")
        explicit = set(chosen)
    if checkpoint is True:
        ck = list(chosen)
    elif checkpoint:
        ck = modules_matching(twin, checkpoint, "checkpoint")
        explicit |= set(ck)
    else:
        ck = []
    ck += [n for n in detected if n]  # the model's own checkpointing (HF or torch.utils)
    order = [n for n, _ in twin.named_modules()]
    split = _outermost(sorted(set(chosen) | set(ck), key=order.index))
    ck_blocks = {b for b in split if any(c == b or c.startswith(b + ".") for c in ck)}
    return split, ck_blocks, explicit
