"""The adapter's algebra: gradients, rank, and d=1/density=1 being plain LoRA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import capaboost_fx as cbx
from capaboost_fx.adapter import AdapterSite, CapaBoostAdapter
from capaboost_fx.spec import Spec

SHAPES = [(24, 40, 4, 2), (64, 32, 8, 2), (48, 48, 4, 4), (16, 100, 8, 3), (10, 12, 8, 2)]


def _adapter(in_f: int, out_f: int, r: int, d: int, density: float = 0.5) -> CapaBoostAdapter:
    a = CapaBoostAdapter(AdapterSite(in_f, out_f, name="t"),
                         Spec(targets=["t"], rank=r, num_masks=d, density=density,
                              alpha=2.0 * r, seed=3), dtype=torch.float64)
    with torch.no_grad():
        a.B.normal_()
        a.A.normal_()
    return a


def test_gradient_is_sum_over_masked_copies() -> None:
    torch.manual_seed(0)
    a = _adapter(20, 12, 4, 3)
    x = torch.randn(7, 20, dtype=torch.float64)
    g = torch.randn(7, 12, dtype=torch.float64)
    (a(x) * g).sum().backward()
    # d separate copies, each its own leaf, written without the adapter's stacking.
    grads_a, grads_b = torch.zeros_like(a.A), torch.zeros_like(a.B)
    for i in range(3):
        A = a.A.detach().clone().requires_grad_(True)
        B = a.B.detach().clone().requires_grad_(True)
        y = a.scaling * F.linear(F.linear(x, A * a.mask_A[i]), B * a.mask_B[i])
        (y * g).sum().backward()
        grads_a += A.grad
        grads_b += B.grad
    torch.testing.assert_close(a.A.grad, grads_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.B.grad, grads_b, rtol=1e-12, atol=1e-12)
    # Entries no mask keeps get no gradient.
    assert torch.all(a.A.grad[~a.mask_A.any(0)] == 0)
    assert torch.all(a.B.grad[~a.mask_B.any(0)] == 0)


@pytest.mark.parametrize("in_f,out_f,r,d", SHAPES)
def test_rank_rises_to_d_times_r(in_f: int, out_f: int, r: int, d: int) -> None:
    torch.manual_seed(1)
    dw = _adapter(in_f, out_f, r, d).delta_weight(torch.float64)
    assert dw.shape == (out_f, in_f)
    assert torch.linalg.matrix_rank(dw).item() == min(d * r, in_f, out_f)
    assert torch.linalg.matrix_rank(_adapter(in_f, out_f, r, 1).delta_weight(
        torch.float64)).item() == min(r, in_f, out_f)
    # density 1: the copies coincide and the rank falls back to r.
    assert torch.linalg.matrix_rank(_adapter(in_f, out_f, r, d, 1.0).delta_weight(
        torch.float64)).item() == min(r, in_f, out_f)


class LoRALinear(nn.Module):
    """Plain LoRA (as loralib), written independently."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def test_one_mask_full_density_is_plain_lora() -> None:
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(6, 16)
    spec = cbx.Spec(targets=["0"], rank=4, num_masks=1, density=1.0, alpha=8.0)
    tm = cbx.transform(base, spec, example_inputs=(x,))
    a = cbx.adapters(tm)["0"]
    assert bool(a.mask_A.all()) and bool(a.mask_B.all())
    lora = nn.Sequential(LoRALinear(base[0], 4, 8.0), nn.ReLU(), base[2])
    with torch.no_grad():
        a.B.normal_()
        lora[0].lora_A.copy_(a.A)
        lora[0].lora_B.copy_(a.B)
    torch.testing.assert_close(tm(x), lora(x), rtol=1e-6, atol=1e-6)
    # And the same gradients.
    tm(x).pow(2).sum().backward()
    lora(x).pow(2).sum().backward()
    torch.testing.assert_close(a.A.grad, lora[0].lora_A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.B.grad, lora[0].lora_B.grad, rtol=1e-5, atol=1e-6)


def test_init_kaiming_a_zero_b() -> None:
    spec = Spec(targets=["x"], rank=8, num_masks=2, density=0.5, alpha=16)
    a = CapaBoostAdapter(AdapterSite(64, 32, name="x"), spec)
    assert torch.count_nonzero(a.B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5)
    assert a.A.abs().max() <= bound and a.A.std() > bound / 4
    b = CapaBoostAdapter(AdapterSite(64, 32, name="x"), spec)
    assert torch.equal(a.A, b.A)  # init is seeded too
    assert a.num_trainable() == 8 * 64 + 32 * 8
    assert 0.7 < a.num_live() / a.num_trainable() < 0.8  # about 1 - (1 - 0.5)^2
