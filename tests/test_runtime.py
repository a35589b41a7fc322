"""onnxruntime sessions (capaboost_fx.onnx.runtime): provider choice, fallbacks, inputs by name."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import capaboost_fx.onnx.runtime as rt
from capaboost_fx.errors import ExportError, InputError, OnnxFileNotFoundError
from capaboost_fx.onnx import export_onnx
from capaboost_fx.onnx.runtime import open_session, resolve_providers, synthesize_inputs

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
NO_GPU = pytest.mark.skipif(rt.cuda_usable(), reason="this test needs a machine without CUDA")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask.unsqueeze(-1)
        return {"scores": self.lin(h), "pooled": h.sum(1)}


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    path = tmp_path_factory.mktemp("rt") / "two.onnx"
    # MASK is float (batch, seq): name its sequence dim dynamic ourselves.
    dims = {
        "ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},
        "mask": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},
    }
    export_onnx(model, path, (IDS, MASK), dynamic_shapes=dims)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in model(IDS, MASK).items()}
    return path, want


@NO_GPU
def test_cuda_asked_but_absent_falls_back_to_cpu_with_a_warning(model_file, caplog):
    with pytest.warns(
        RuntimeWarning, match=r"CUDAExecutionProvider.*running on \['CPUExecutionProvider'\]"
    ):
        sess = open_session(model_file[0], providers="cuda")
    assert sess.providers == [CPU] and not sess.on_gpu
    assert sess.requested_providers == [CUDA, CPU]
    assert any("asked for" in r.getMessage() for r in caplog.records)


@NO_GPU
def test_auto_takes_the_cpu_quietly_without_a_gpu(model_file):
    assert resolve_providers("auto") == [CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sess = open_session(model_file[0])
    assert sess.providers == [CPU]


def test_gpu_wheel_without_a_gpu_is_not_cuda(model_file, monkeypatch):
    """onnxruntime-gpu lists CUDA even where no GPU is visible: auto must not pick it."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not rt.cuda_usable()
    assert resolve_providers("auto") == [CPU]
    with pytest.warns(RuntimeWarning, match="no CUDA GPU is visible"):
        sess = open_session(model_file[0], providers=[CUDA])
    assert sess.providers == [CPU]


@NO_GPU
def test_silent_fallback_inside_onnxruntime_is_reported(model_file, monkeypatch):
    """Where onnxruntime itself drops CUDA after saying it has it, we still warn."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(rt, "cuda_usable", lambda: True)
    with pytest.warns(RuntimeWarning, match="could not start"):
        sess = open_session(model_file[0], providers="auto")  # auto now asks for CUDA
    assert sess.requested_providers == [CUDA, CPU] and sess.providers == [CPU]


def test_run_takes_numpy_torch_or_positional_and_returns_by_name(model_file):
    path, want = model_file
    sess = open_session(path, providers="cpu")
    assert sess.input_names == ["ids", "mask"]
    assert sorted(sess.output_names) == ["pooled", "scores"]
    by_numpy = sess.run({"ids": IDS.numpy(), "mask": MASK.numpy()})
    by_torch = sess.run({"mask": MASK, "ids": IDS})
    by_position = sess.run([IDS, MASK])
    for out in (by_numpy, by_torch, by_position):
        assert set(out) == {"scores", "pooled"}
        for k in want:
            np.testing.assert_allclose(out[k], want[k], rtol=1e-5, atol=1e-6)
    only = sess.run({"ids": IDS, "mask": MASK}, output_names=["pooled"])
    assert list(only) == ["pooled"]


def test_bad_inputs_name_what_is_wrong(model_file):
    sess = open_session(model_file[0], providers="cpu")
    with pytest.raises(InputError, match=r"missing \['mask'\].*unexpected \['attention_mask'\]"):
        sess.run({"ids": IDS, "attention_mask": MASK})
    with pytest.raises(InputError, match="got 1 positional inputs"):
        sess.run([IDS])
    with pytest.raises(InputError, match="bfloat16"):
        sess.run({"ids": IDS, "mask": MASK.bfloat16()})


def test_unknown_provider_is_an_input_error(model_file):
    with pytest.raises(InputError, match=r"unknown onnxruntime provider.*cdua"):
        open_session(model_file[0], providers="cdua")
    assert resolve_providers(["TensorrtExecutionProvider"]) == ["TensorrtExecutionProvider", CPU]


def test_session_options(model_file, tmp_path):
    out = tmp_path / "opt.onnx"
    sess = open_session(
        model_file[0],
        providers="cpu",
        graph_optimization_level="basic",
        optimized_model_path=out,
        intra_op_num_threads=1,
    )
    assert out.is_file() and out.stat().st_size > 0
    assert sess.inner.get_session_options().intra_op_num_threads == 1
    with pytest.raises(InputError, match="graph_optimization_level"):
        open_session(model_file[0], graph_optimization_level="max")


def test_missing_or_damaged_file(tmp_path):
    with pytest.raises(OnnxFileNotFoundError, match="not found"):
        open_session(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="cannot load"):
        open_session(bad)


def test_synthesized_inputs_fit_the_graph(model_file):
    sess = open_session(model_file[0], providers="cpu")
    feeds = synthesize_inputs(sess, batch_size=3, seq_len=5)
    assert feeds["ids"].shape == (3, 5) and feeds["ids"].dtype == np.int64
    assert feeds["mask"].shape == (3, 5) and feeds["mask"].dtype == np.float32
    assert sess.run(feeds)["scores"].shape == (3, 5, 3)


def test_docstring_warns_against_both_wheels():
    doc = rt.__doc__
    assert "onnxruntime-gpu" in doc and "must not be installed together" in doc
    assert "capaboost-fx[gpu]" in doc
