"""A failed ONNX export is a short ExportError (the step, the op, the module, the model's line,
what to try), and the TorchScript exporter, pinned, runs without the dynamo exporter."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from capaboost_fx.errors import CapaBoostError, ExportError, InputError
from capaboost_fx.onnx import ExportOptions, export_onnx, open_session


@torch.library.custom_op("capaboost_test::untranslated", mutates_args=())
def untranslated(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@untranslated.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return untranslated(x)


class WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.inner = Doubler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.lin(x))


class Switched(nn.Module):
    """Branches on a buffer's value: torch.export cannot trace it, TorchScript traces the
    branch taken, which is the same for every input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 3)
        self.register_buffer("enabled", torch.tensor(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:  # a value, not a shape
            return torch.tanh(self.lin(x))
        return x[:, :3]


X = torch.randn(3, 8)


def test_an_op_without_translation_names_op_module_and_line(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(WithCustomOp(), tmp_path / "m.onnx", (X,))
    text = str(info.value)
    assert "failed at translation" in text
    assert "capaboost_test::untranslated" in text
    assert "in module: inner (Doubler)" in text
    assert "return untranslated(x)" in text  # the model's own line
    # export_onnx tried the TorchScript exporter itself: the error does not send you there
    assert "optimize='torchscript'" not in text and "newer torch" in text
    assert "also tried: TorchScript exporter skipped" in text
    assert len(text) < 1200 and "\x1b[" not in text
    assert info.value.__cause__ is not None  # the exporter's full error is kept
    assert isinstance(info.value, CapaBoostError) and os.listdir(tmp_path) == []


def test_a_data_dependent_branch_names_the_line_and_torchscript_exports_it(tmp_path):
    model = Switched().eval()
    # The default ("auto") takes the TorchScript exporter first: it traces the branch taken.
    rep = export_onnx(model, tmp_path / "d.onnx", (X,))
    assert rep.optimize == "torchscript" and rep.verified
    # optimize="ort": the dynamo exporter fails (warned, with the line), TorchScript is tried.
    with pytest.warns(RuntimeWarning, match="(?s)failed at torch.export.*if self.enabled"):
        rep = export_onnx(model, tmp_path / "d.onnx", (X,), optimize="ort")
    assert rep.optimize == "torchscript" and rep.verified
    # The pinned TorchScript path does not need the dynamo exporter to succeed first.
    rep = export_onnx(model, tmp_path / "m.onnx", (X,), optimize="torchscript")
    assert rep.optimize == "torchscript" and rep.verified and len(rep.verified_shapes) == 2
    assert rep.input_shapes["x"][0] == "batch" and rep.input_shapes["x"][1] == 8
    x = torch.randn(5, 8)
    got = open_session(rep.path, providers="cpu").run({"x": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-5, atol=1e-6)


def test_options_object_and_keywords_are_one_set_of_options(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    base = ExportOptions(optimize="none", verify=False)
    rep = export_onnx(model, tmp_path / "a.onnx", (X,), options=base, verify=True)
    assert rep.optimize == "none" and rep.verified  # the keyword replaced the object's field
    with pytest.raises(InputError, match="unknown option.*'optimise'.*optimize"):
        export_onnx(model, tmp_path / "b.onnx", (X,), optimise="none")
    with pytest.raises(InputError, match="optimize='fast'"):
        ExportOptions(optimize="fast")
    assert not (tmp_path / "b.onnx").exists()


def test_verify_onnx_with_its_arguments_swapped_says_so(tmp_path):
    from capaboost_fx.onnx import verify_onnx

    model = nn.Linear(8, 2)
    with pytest.raises(InputError, match="takes the ONNX file's path and the PyTorch module"):
        verify_onnx(model, tmp_path / "m.onnx", (X,))


def test_when_every_exporter_fails_the_error_lists_what_was_tried(tmp_path, monkeypatch):
    """Pinned TorchScript fails its check, its dynamo fallback fails to trace: the error
    is the last failure, and says what failed before it."""
    import capaboost_fx.onnx.candidates as candidates
    from capaboost_fx.errors import VerificationError

    def wrong(path, *args, **kwargs):
        raise VerificationError("output 'output' differs: boom")

    monkeypatch.setattr(candidates, "verify_onnx", wrong)
    with pytest.warns(RuntimeWarning, match="'torchscript' graph failed its check"), \
            pytest.raises(ExportError, match="(?s)failed at torch.export.*tried before: "
                                             "VerificationError: output 'output' differs"):
        export_onnx(Switched().eval(), tmp_path / "m.onnx", (X,), optimize="torchscript")
    assert os.listdir(tmp_path) == []
