"""Masks: exact counts, independence across targets/copies/seeds, identical across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import capaboost_fx as cbx
from capaboost_fx.masks import kept_count, make_masks

SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, torch
    from torch import nn
    import capaboost_fx as cbx
    torch.manual_seed(int(sys.argv[1]))  # the global RNG must not matter
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                          nn.Linear(20, 6))
    targets = sys.argv[2].split(",")
    spec = cbx.Spec(targets=targets, rank=4, num_masks=2, density=0.5, seed=7)
    tm = cbx.transform(model, spec, example_inputs=(torch.randn(4, 12),))
    h = hashlib.sha256()
    for name in sorted(cbx.adapters(tm)):
        a = cbx.adapters(tm)[name]
        h.update(name.encode()); h.update(a.mask_A.numpy().tobytes())
        h.update(a.mask_B.numpy().tobytes()); h.update(a.A.detach().numpy().tobytes())
    print(h.hexdigest())
    """
)


def _digest(global_seed: int, targets: str) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(global_seed), targets],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_masks_identical_across_processes_and_visit_order() -> None:
    a = _digest(1, "0,2,4")
    b = _digest(99, "4,2,0")  # other global seed, other order of targets
    assert len(a) == 64 and a == b


@pytest.mark.parametrize("shape,density", [((8, 40), 0.5), ((33, 7), 0.3), ((5, 5), 0.9),
                                           ((1, 3), 0.2), ((64, 8), 1.0)])
def test_exact_count(shape: tuple[int, int], density: float) -> None:
    m = make_masks("random", shape, 3, density, 0, "t", "A")
    numel = shape[0] * shape[1]
    expect = numel if density == 1.0 else max(1, int(numel * density + 1e-9))
    assert expect == kept_count(numel, density) or density == 1.0
    assert m.dtype == torch.bool and m.shape == (3, *shape)
    assert all(int(m[i].sum()) == expect for i in range(3))


def test_masks_differ_across_targets_copies_seeds() -> None:
    base = make_masks("random", (8, 32), 2, 0.5, 0, "layer.0.q", "A")
    assert not torch.equal(base[0], base[1])  # copies
    assert not torch.equal(base, make_masks("random", (8, 32), 2, 0.5, 0, "layer.0.v", "A"))
    assert not torch.equal(base, make_masks("random", (8, 32), 2, 0.5, 1, "layer.0.q", "A"))
    assert not torch.equal(base, make_masks("random", (8, 32), 2, 0.5, 0, "layer.0.q", "B"))
    assert torch.equal(base, make_masks("random", (8, 32), 2, 0.5, 0, "layer.0.q", "A"))


def test_adapters_have_their_own_masks() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    tm = cbx.transform(model, cbx.Spec(targets=["0", "1"], rank=4),
                       example_inputs=(torch.randn(3, 16),))
    a, b = cbx.adapters(tm)["0"], cbx.adapters(tm)["1"]
    assert not torch.equal(a.mask_A, b.mask_A)
    assert a.mask_A.shape == (2, 4, 16) and a.mask_B.shape == (2, 16, 4)
    assert int(a.mask_A[0].sum()) == 32 and int(a.mask_B[1].sum()) == 32
