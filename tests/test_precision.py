"""Mixed precision: autocast training, and bf16 folds that round once."""

from __future__ import annotations

import copy

import torch
from models import CASES, first_tensor

import capaboost_fx as cbx

BERT = next(c for c in CASES if c.name == "bert")


def test_autocast_bf16_training() -> None:
    torch.manual_seed(0)
    tm = cbx.transform(BERT.build(), BERT.spec, *BERT.inputs(*BERT.example)).train()
    opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=1e-2)
    args, kwargs = BERT.inputs(4, 9)
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tm(*args, **kwargs)
            loss = (out.logits.float() - 1).pow(2).mean()
        assert out.logits.dtype == torch.bfloat16
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    a = next(iter(cbx.adapters(tm).values()))
    assert a.A.dtype == torch.float32 and torch.isfinite(a.B).all() and a.B.abs().sum() > 0
    assert losses[-1] < losses[0]


def _fold_error(dtype: torch.dtype) -> tuple[float, cbx.CapaBoostModel, cbx.FoldedModel]:
    torch.manual_seed(0)
    model = BERT.build().eval().to(dtype)
    tm = cbx.transform(model, BERT.spec, *BERT.inputs(*BERT.example)).eval()
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.05)
    deploy = cbx.fold(tm)
    args, kwargs = BERT.inputs(*BERT.other)
    ref = copy.deepcopy(tm).double()  # the unfolded model computed in float64
    exact = first_tensor(ref(*args, **kwargs))
    err = (first_tensor(deploy(*args, **kwargs)).double() - exact).abs().max().item()
    return err, tm, deploy


def test_bf16_fold_rounds_once() -> None:
    err_bf16, tm, deploy = _fold_error(torch.bfloat16)
    err_fp32, _, _ = _fold_error(torch.float32)
    # Adapters train in float32 even on a bf16 base.
    assert all(a.A.dtype == torch.float32 for a in cbx.adapters(tm).values())
    for name, a in cbx.adapters(tm).items():
        w0 = tm.wrapped.get_parameter(a.weight_fqn)
        delta = sum((a.B.double() * a.mask_B[i]) @ (a.A.double() * a.mask_A[i])
                    for i in range(a.num_masks)) * a.scaling
        once = (w0.double() + delta).to(torch.bfloat16)  # one rounding, from exact values
        merged = deploy.wrapped.get_parameter(a.weight_fqn)
        assert merged.dtype == torch.bfloat16
        # float32 accumulation may move a value across a bf16 rounding boundary at most once
        mismatch = (merged != once).float().mean().item()
        assert mismatch < 0.01, (name, mismatch)
    # bf16 outputs carry bf16 error; the fold adds nothing beyond that precision.
    assert err_fp32 < 1e-4
    assert err_bf16 < 0.1
    print(f"fold error vs float64 unfolded: bf16 {err_bf16:.3e}, float32 {err_fp32:.3e}")
