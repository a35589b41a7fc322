"""Optimized ONNX export (capaboost_fx.onnx): onnxruntime fusions by default, dims named batch /
sequence, int8, the fused graph checked with onnxruntime's optimizations on and off, the plain
graph as fallback, one latency timer, and the deprecated module paths."""

from __future__ import annotations

import copy
import importlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from capaboost_fx.errors import VerificationError
from capaboost_fx.onnx import (
    axis_names,
    compare_onnx,
    export_onnx,
    measure_latency,
    onnx_stats,
    open_session,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

VOCAB = 100


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def _batch(batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq - seq // 4:] = 0  # padding, so the mask is really used
    return {"input_ids": ids, "attention_mask": mask}


EXAMPLE = _batch(2, 8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny BERT exported fused (default), plain and int8; a weight-perturbed copy fused."""
    folder = tmp_path_factory.mktemp("opt")
    model = _bert()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if p.ndim == 2 and "embeddings" not in name:
                p.add_(0.05 * torch.randn_like(p))
    reports = {
        "fused": export_onnx(model, folder / "fused.onnx", example_kwargs=EXAMPLE),
        "plain": export_onnx(model, folder / "plain.onnx", example_kwargs=EXAMPLE,
                             optimize="none"),
        "int8": export_onnx(model, folder / "int8.onnx", example_kwargs=EXAMPLE,
                            quantize="int8"),
        "other": export_onnx(other, folder / "other.onnx", example_kwargs=EXAMPLE),
    }
    return model, other, reports


def test_default_export_is_fused_and_verified_with_and_without_ort_optimizations(files):
    _, _, reports = files
    rep = reports["fused"]
    assert rep.optimize == "ort" and rep.verified
    assert {"attention", "skip_layer_normalization", "bias_gelu"} <= set(rep.fusions)
    assert rep.op_histogram["com.microsoft.Attention"] == 2
    assert rep.op_histogram["com.microsoft.SkipLayerNormalization"] == 4
    assert "Softmax" not in rep.op_histogram  # attention is one operator now
    assert rep.verified_levels == ["all", "disable"]
    assert len(rep.verified_shapes) == 2 and rep.max_abs_diff < 1e-4
    plain = reports["plain"]
    assert plain.optimize == "none" and plain.fusions == {}
    assert "com.microsoft.Attention" not in plain.op_histogram
    assert rep.node_count < plain.node_count / 2
    assert json.loads(json.dumps(rep.to_dict()))["fusions"] == rep.fusions


def test_dynamic_dims_are_named_batch_and_sequence(files):
    _, _, reports = files
    for key in ("fused", "plain", "int8"):
        rep = reports[key]
        assert rep.input_shapes == {
            "input_ids": ["batch", "sequence"],
            "attention_mask": ["batch", "sequence"],
        }, key
        assert onnx_stats(rep.path).outputs[0]["shape"] == ["batch", 3]


def test_axis_names_share_batch_and_keep_independent_sequences_apart():
    got = axis_names([("ids", ["s72", "s53"]), ("mask", ["s43", "s53"]), ("dec", ["s72", "s9"])])
    assert got == {"s72": "batch", "s53": "sequence", "s43": "batch", "s9": "sequence_2"}
    assert axis_names([("x", ["tokens", 8])]) == {}  # a user's own name is kept


def test_fused_file_serves_other_shapes_and_the_fold_keeps_its_graph(files):
    model, other, reports = files
    feeds = _batch(5, 13, seed=7)
    got = open_session(reports["fused"].path, providers="cpu").run(feeds)["logits"]
    with torch.no_grad():
        want = model(**feeds).logits
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-4)
    # New weights, same fused graph (what test_deploy checks for real folds).
    cmp = compare_onnx(reports["fused"].path, reports["other"].path, latency=False)
    assert cmp.same_graph, cmp.to_markdown()
    assert reports["other"].fusions == reports["fused"].fusions


def test_fused_path_is_not_slower_than_the_plain_one(files):
    """The default is the faster-or-equal path (interleaved rounds; tiny model, loose bound)."""
    _, _, reports = files
    sessions = {
        key: open_session(reports[key].path, providers="cpu", intra_op_num_threads=1)
        for key in ("fused", "plain")
    }
    stats = measure_latency(sessions, _batch(8, 32), runs=25, warmup=3)
    assert stats["fused"].runs == 25 and len(stats["plain"].samples_ms) == 25
    assert stats["fused"].median_ms <= 1.1 * stats["plain"].median_ms, stats


def test_int8_export_is_quantized_and_agrees_on_argmax(files):
    model, _, reports = files
    rep = reports["int8"]
    assert rep.quantize == "int8" and rep.verified
    assert rep.quantized_ops.get("MatMulInteger", 0) >= 8
    assert rep.initializer_bytes < 0.5 * reports["fused"].initializer_bytes
    assert rep.max_abs_diff > 0 and "logits" in rep.argmax_agreement
    feeds = _batch(64, 16, seed=3)
    got = open_session(rep.path, providers="cpu").run(feeds)["logits"]
    with torch.no_grad():
        want = model(**feeds).logits.numpy()
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    assert agree >= 0.8, agree
    assert np.abs(got - want).max() < 0.5


def test_a_fused_graph_that_fails_verification_falls_back_to_the_plain_one(
    files, tmp_path, monkeypatch
):
    import capaboost_fx.onnx.export as export_module

    real = export_module.verify_onnx

    def fused_is_wrong(path, *args, **kwargs):
        if Path(path).parent.name == "fused":  # the staged fused candidate
            raise VerificationError("output 'logits' differs: boom")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(export_module, "verify_onnx", fused_is_wrong)
    model = files[0]
    with pytest.warns(RuntimeWarning, match="falling back to the exporter's unfused graph"):
        rep = export_onnx(model, tmp_path / "m.onnx", example_kwargs=EXAMPLE)
    assert rep.optimize == "none" and rep.fusions == {} and rep.verified
    assert "com.microsoft.Attention" not in rep.op_histogram
    assert "boom" in rep.verify_notes[0]


def test_unknown_options_are_refused(tmp_path):
    from capaboost_fx.errors import InputError

    with pytest.raises(InputError, match="optimize='fast'"):
        export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", (torch.ones(2, 2),), optimize="fast")
    with pytest.raises(InputError, match="quantize='int4'"):
        export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", (torch.ones(2, 2),), quantize="int4")


@pytest.mark.parametrize(
    "module, name, home",
    [
        ("capaboost_fx.onnx_export", "export_onnx", "capaboost_fx.onnx.export"),
        ("capaboost_fx.onnx_export", "compare_onnx", "capaboost_fx.onnx.stats"),
        ("capaboost_fx.onnx_export", "optimize_transformer", "capaboost_fx.onnx.optimize"),
        ("capaboost_fx.runtime", "open_session", "capaboost_fx.onnx.runtime"),
        ("capaboost_fx.runtime", "synthesize_inputs", "capaboost_fx.onnx.runtime"),
    ],
)
def test_old_module_paths_still_work_and_warn(module, name, home):
    old = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} is deprecated; use {home}"):
        value = getattr(old, name)
    assert value is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


def test_top_level_names_come_from_the_package_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        import capaboost_fx as cbx
        from capaboost_fx.onnx import CompareReport, ExportReport, verify_onnx

        assert cbx.export_onnx is export_onnx and cbx.verify_onnx is verify_onnx
        assert cbx.ExportReport is ExportReport and cbx.CompareReport is CompareReport
    with pytest.warns(DeprecationWarning):
        cbx.runtime.open_session  # noqa: B018
