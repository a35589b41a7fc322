"""Static random masks, reproducible in every process.

Each mask comes from its own ``torch.Generator`` seeded by a stable hash of
``(spec.seed, target name, factor, copy)``: the same masks on every rank and machine,
whatever order targets are visited in, with no communication and no global RNG.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, stable across processes (unlike Python's salted `hash`)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def kept_count(numel: int, density: float) -> int:
    """Entries a 'random' mask keeps: floor(numel * density), at least 1."""
    # The tiny epsilon keeps floor(10 * 0.3) == 3 despite 0.3 not being exact in binary.
    return max(1, min(numel, int(numel * density + 1e-9)))


def random_mask(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """A bool mask keeping exactly ``floor(numel * density)`` entries, chosen uniformly."""
    numel = 1
    for s in shape:
        numel *= s
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(numel, generator=gen)[: kept_count(numel, density)]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[keep] = True
    return mask.view(shape)


def make_masks(
    kind: str, shape: tuple[int, ...], num_masks: int, density: float, seed: int, name: str,
    factor: str,
) -> torch.Tensor:
    """The ``num_masks`` masks of one factor (``"A"`` or ``"B"``), stacked: d x *shape, bool."""
    if kind != "random":  # Spec validation keeps other kinds out; this guards direct callers.
        raise ValueError(f"unknown mask kind {kind!r}")
    if density >= 1.0:
        return torch.ones((num_masks, *shape), dtype=torch.bool)
    return torch.stack(
        [random_mask(shape, density, stable_seed(seed, name, factor, i)) for i in range(num_masks)]
    )
