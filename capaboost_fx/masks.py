"""Static masks, reproducible in every process, and the registry of mask kinds.

Each mask comes from its own ``torch.Generator`` seeded by a stable hash of
``(spec.seed, target name, factor, copy)``: the same masks on every rank and machine,
whatever order targets are visited in, with no communication and no global RNG.

Kinds:

- ``"random"`` (the paper's): exactly ``floor(numel · density)`` entries kept, chosen uniformly;
- ``"bernoulli"``: each entry kept independently with probability ``density``;
- ``"N:M"`` (e.g. ``"2:4"``): in every group of M consecutive entries along a factor's input
  (reduction) dimension — the columns of A (r × in) and of B (out × r) — exactly N are kept,
  the pattern sparse tensor cores accelerate. Its density is N/M;
- any function registered with `register_mask` (for the current context: a
  ``contextvars`` scope, so threads and tasks each see their own) or added for a block of
  code with ``with mask_scope({"name": fn}): ...``. The built-in kinds are a read-only table.

A mask function has one signature::

    fn(shape: tuple[int, int], density: float, generator: torch.Generator) -> torch.BoolTensor

It draws ONE mask of `shape` using only `generator` (called once per copy and factor).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import torch

from .errors import SpecError, TargetError

MaskFn = Callable[[tuple[int, int], float, torch.Generator], torch.Tensor]
NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, stable across processes (unlike Python's salted `hash`)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def kept_count(numel: int, density: float) -> int:
    """Entries a 'random' mask keeps: floor(numel * density), at least 1."""
    # The tiny epsilon keeps floor(10 * 0.3) == 3 despite 0.3 not being exact in binary.
    return max(1, min(numel, int(numel * density + 1e-9)))


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or NM_PATTERN.match(name):
        raise SpecError(f"register_mask: the name must be a non-empty string that is not an "
                        f"'N:M' pattern, got {name!r}.")


def _check_fn(name: str, fn: Any) -> None:
    if not callable(fn):
        raise SpecError(f"register_mask({name!r}) decorates a mask function "
                        "fn(shape, density, generator) -> bool tensor, got "
                        f"{type(fn).__name__}.")


@contextlib.contextmanager
def mask_scope(kinds: Mapping[str, MaskFn]) -> Iterator[None]:
    """Mask kinds usable as ``Spec(mask=name)`` inside the block only.

    Example:
        >>> with mask_scope({"rows": rows}):                      # doctest: +SKIP
        ...     tm = cbx.transform(model, cbx.Spec(targets=["*.q"], mask="rows"), ...)
    """
    for name, fn in kinds.items():
        _check_name(name)
        _check_fn(name, fn)
    token = _KINDS.set(MappingProxyType({**_KINDS.get(), **kinds}))
    try:
        yield
    finally:
        _KINDS.reset(token)


def register_mask(name: str) -> Callable[[MaskFn], MaskFn]:
    """Register a mask kind usable as ``Spec(mask=name)`` in the current context (the rest
    of this thread or task; `mask_scope` adds one for a block only).

    Example:
        >>> @register_mask("rows")
        ... def rows(shape, density, generator):
        ...     keep = torch.rand(shape[0], generator=generator) < density
        ...     return keep[:, None].expand(shape).clone()
    """
    _check_name(name)

    def deco(fn: MaskFn) -> MaskFn:
        _check_fn(name, fn)
        _KINDS.set(MappingProxyType({**_KINDS.get(), name: fn}))
        return fn

    return deco


def mask_kinds() -> list[str]:
    """Registered kinds (``"N:M"`` patterns are accepted besides these)."""
    return sorted(_KINDS.get())


def is_known_kind(kind: str) -> bool:
    m = NM_PATTERN.match(kind)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        return 0 < n <= mm
    return kind in _KINDS.get()


def nm_density(kind: str) -> float | None:
    """N/M for an ``"N:M"`` kind, None for other kinds."""
    m = NM_PATTERN.match(kind)
    return int(m.group(1)) / int(m.group(2)) if m else None


def random_mask(shape: tuple[int, int], density: float, generator: torch.Generator) -> torch.Tensor:
    numel = shape[0] * shape[1]
    keep = torch.randperm(numel, generator=generator)[: kept_count(numel, density)]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[keep] = True
    return mask.view(shape)


def bernoulli_mask(shape: tuple[int, int], density: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) < density


# The built-in kinds, read-only; a context adds its own on top (`register_mask`, `mask_scope`).
_KINDS: ContextVar[Mapping[str, MaskFn]] = ContextVar(
    "capaboost_fx_mask_kinds",
    default=MappingProxyType({"random": random_mask, "bernoulli": bernoulli_mask}))


def nm_mask(n: int, m: int, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Keep N of every M consecutive entries along dim 1 (the reduction dim of x @ W.T)."""
    rows, cols = shape
    if cols % m:
        raise TargetError(f"an {n}:{m} mask needs the input dimension ({cols}) divisible by {m}; "
                          "choose another mask or exclude this target.")
    scores = torch.rand(rows, cols // m, m, generator=generator)
    keep = scores.argsort(dim=-1)[..., :n]
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.view(rows, cols)


def make_masks(
    kind: str, shape: tuple[int, int], num_masks: int, density: float, seed: int, name: str,
    factor: str,
) -> torch.Tensor:
    """The ``num_masks`` masks of one factor (``"A"`` or ``"B"``), stacked: d × *shape, bool."""
    nm = NM_PATTERN.match(kind)
    if nm is None and kind not in _KINDS.get():
        raise SpecError(f"unknown mask kind {kind!r}; known: {mask_kinds()} or 'N:M' (e.g. "
                        "'2:4'), or add one with capaboost_fx.register_mask.")
    if nm is None and kind != "bernoulli" and density >= 1.0:
        return torch.ones((num_masks, *shape), dtype=torch.bool)
    masks = []
    for i in range(num_masks):
        gen = torch.Generator().manual_seed(stable_seed(seed, name, factor, i))
        if nm:
            mask = nm_mask(int(nm.group(1)), int(nm.group(2)), shape, gen)
        else:
            mask = _call_registered(kind, shape, density, gen, name, factor)
        masks.append(mask)
    return torch.stack(masks)


def _call_registered(kind: str, shape: tuple[int, int], density: float, gen: torch.Generator,
                     name: str, factor: str) -> torch.Tensor:
    """Run a registered mask function and check it returned a bool tensor of `shape`."""
    where = f"mask kind {kind!r} (target {name!r}, factor {factor})"
    try:
        mask = _KINDS.get()[kind](tuple(shape), density, gen)
    except Exception as e:  # the user's function failed: say which one, keep the cause
        raise SpecError(f"{where}: the mask function raised {type(e).__name__}: {e}") from e
    if not isinstance(mask, torch.Tensor):
        raise SpecError(f"{where}: the mask function returned {type(mask).__name__}, expected a "
                        f"bool tensor of shape {tuple(shape)}.")
    if tuple(mask.shape) != tuple(shape):
        raise SpecError(f"{where}: the mask function returned shape {tuple(mask.shape)}, "
                        f"expected {tuple(shape)} (rows x columns of the factor).")
    if mask.dtype != torch.bool:
        raise SpecError(f"{where}: the mask function returned dtype {mask.dtype}, expected "
                        "torch.bool (e.g. return `scores < density`, not the scores).")
    return mask.cpu()
