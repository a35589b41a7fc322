"""Errors for models that cannot be captured, and the error hierarchy itself."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import capaboost_fx as cbx
import capaboost_fx.errors as errors


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on tensor values: torch.export cannot trace it
            return self.fc(x)
        return -self.fc(x)


def test_uncapturable_model_says_what_and_what_to_try() -> None:
    with pytest.raises(cbx.CaptureError) as info:
        cbx.transform(DataDependent(), cbx.Spec(targets=["fc"], rank=2), (torch.randn(3, 4),),
                      capture="graph")
    msg = str(info.value)
    assert "could not capture DataDependent in train mode" in msg
    assert "branches on tensor values" in msg and "torch.cond" in msg
    assert isinstance(info.value, RuntimeError)


def test_every_error_is_a_library_error_and_a_builtin() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.CapaBoostError) and c is not errors.CapaBoostError]
    assert len(classes) >= 12
    for c in classes:
        builtins = [b for b in c.__mro__[1:] if b.__module__ == "builtins" and b is not object]
        assert any(b is not Exception and b is not BaseException for b in builtins), c
        assert c.__name__ in cbx.__all__, c


def test_wrongly_shaped_example_inputs() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(cbx.CaptureError) as info:
        cbx.transform(model, cbx.Spec(targets=["0"], rank=2), (torch.randn(3, 9),))
    msg = str(info.value)
    assert "could not capture Sequential" in msg and "example inputs" in msg


@pytest.mark.parametrize("result,text", [
    (lambda shape: torch.ones(shape[1], shape[0], dtype=torch.bool), r"returned shape \(8, 4\), expected \(4, 8\)"),
    (lambda shape: torch.rand(shape), "returned dtype torch.float32, expected torch.bool"),
    (lambda shape: [[True] * shape[1]] * shape[0], "returned list, expected a bool tensor"),
])
def test_bad_registered_mask_function_is_a_spec_error(result, text) -> None:
    name = "bad-test"
    model = nn.Sequential(nn.Linear(8, 8))
    with (cbx.mask_scope({name: lambda shape, density, generator: result(shape)}),
          pytest.raises(cbx.SpecError, match=f"mask kind '{name}'.*{text}") as info):
        cbx.transform(model, cbx.Spec(targets=["0"], rank=4, mask=name), (torch.randn(3, 8),))
    assert isinstance(info.value, ValueError)


def test_mask_module_raises_only_library_errors() -> None:
    from capaboost_fx.masks import make_masks, nm_mask

    with pytest.raises(cbx.SpecError, match="register_mask"):
        cbx.register_mask("2:4")
    with pytest.raises(cbx.SpecError, match="unknown mask kind"):
        make_masks("nope", (4, 8), 2, 0.5, 0, "t", "A")
    with pytest.raises(cbx.TargetError, match="divisible by 4"):
        nm_mask(2, 4, (4, 10), torch.Generator())
    with (cbx.mask_scope({"raising-test": lambda *a: 1 / 0}),
          pytest.raises(cbx.SpecError, match="'raising-test'.*ZeroDivisionError")):
        make_masks("raising-test", (4, 8), 2, 0.5, 0, "t", "A")
