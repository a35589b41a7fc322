"""Train/eval switch: dropout and batch norm behave as on the original model in each mode."""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES, BatchNormNet, first_tensor
from torch import nn

import capaboost_fx as cbx

DROPOUT_CASES = [c for c in CASES if c.name in ("mlp", "bert", "gpt2", "llama", "vit")]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.name)
def test_eval_deterministic_train_not(case) -> None:
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = case.inputs(*case.example)
    tm = cbx.transform(model, case.spec, args, kwargs)
    args2, kwargs2 = case.inputs(*case.other)
    tm.eval()
    e1, e2 = first_tensor(tm(*args2, **kwargs2)), first_tensor(tm(*args2, **kwargs2))
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, first_tensor(model.eval()(*args2, **kwargs2)),
                               rtol=1e-5, atol=1e-6)
    tm.train()
    t1, t2 = first_tensor(tm(*args2, **kwargs2)), first_tensor(tm(*args2, **kwargs2))
    assert not torch.equal(t1, t2)
    assert not torch.equal(t1, e1)


def test_train_mode_matches_original_train_mode_under_same_seed() -> None:
    """Dropout masks come from the global RNG exactly as in the original model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 4)).train()
    tm = cbx.transform(model, cbx.Spec(targets=["2"], rank=2), example_inputs=(torch.randn(3, 8),))
    x = torch.randn(5, 8)
    torch.manual_seed(123)
    ours = tm.train()(x)
    torch.manual_seed(123)
    theirs = model(x)
    torch.testing.assert_close(ours, theirs)


def test_batch_norm_statistics_follow_the_mode() -> None:
    torch.manual_seed(0)
    model = BatchNormNet().train()
    ref = copy.deepcopy(model)
    tm = cbx.transform(model, cbx.Spec(targets=["fc1", "fc2"], rank=2),
                       example_inputs=(torch.randn(6, 10),))
    assert tm.training
    bn = tm.wrapped.bn
    for _ in range(3):
        x = torch.randn(8, 10)
        torch.testing.assert_close(tm(x), ref(x))  # batch statistics in train mode
    torch.testing.assert_close(bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref.bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 3
    # The caller's model saw none of it.
    assert int(model.bn.num_batches_tracked) == 0
    tm.eval()
    ref.eval()
    x = torch.randn(4, 10)
    torch.testing.assert_close(tm(x), ref(x))  # running statistics in eval mode
    mean = bn.running_mean.clone()
    tm(x)
    assert torch.equal(bn.running_mean, mean)


def test_mode_is_inherited_from_the_model() -> None:
    m = nn.Sequential(nn.Linear(4, 4))
    spec = cbx.Spec(targets=["0"], rank=2)
    assert cbx.transform(m.train(), spec, (torch.randn(2, 4),)).training
    assert not cbx.transform(m.eval(), spec, (torch.randn(2, 4),)).training


def test_adapter_dropout_follows_the_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # no dropout of its own
    tm = cbx.transform(model, cbx.Spec(targets=["0"], rank=4, dropout=0.5),
                       example_inputs=(torch.randn(3, 8),))
    with torch.no_grad():
        cbx.adapters(tm)["0"].B.normal_()
    x = torch.randn(5, 8)
    tm.eval()
    assert torch.equal(tm(x), tm(x))
    tm.train()
    assert not torch.equal(tm(x), tm(x))
    tm.eval()
    torch.testing.assert_close(cbx.fold(tm)(x), tm(x))  # no dropout in the fold
