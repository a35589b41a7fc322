"""Optimized ONNX export (capaboost_fx.onnx): onnxruntime fusions by default, dims named batch /
sequence, int8, the fused graph checked with onnxruntime's optimizations on and off, the plain
graph as fallback, one latency timer, and the deprecated module paths."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from capaboost_fx.errors import VerificationError
from capaboost_fx.onnx import (
    axis_names,
    compare_onnx,
    export_onnx,
    onnx_stats,
    open_session,
)

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
        "fused": export_onnx(model, folder / "fused.onnx", example_kwargs=EXAMPLE,
                             optimize="ort"),
        "plain": export_onnx(model, folder / "plain.onnx", example_kwargs=EXAMPLE,
                             optimize="none"),
        "int8": export_onnx(model, folder / "int8.onnx", example_kwargs=EXAMPLE,
                            quantize="int8", optimize="ort"),
        "other": export_onnx(other, folder / "other.onnx", example_kwargs=EXAMPLE,
                             optimize="ort"),
    }
    return model, other, reports


def test_ort_export_is_fused_and_verified_with_and_without_ort_optimizations(files):
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


def test_fastest_measures_every_exporter_path_and_writes_the_winner(tmp_path):
    """optimize="fastest" makes, verifies and times the dynamo (+fusions) and TorchScript
    (+onnxruntime.transformers) graphs of a real fold; "torchscript+ort" pins one, and a fold's
    graph of that kind is the base model's graph."""
    import capaboost_fx as cbx

    model = _bert()
    tm = cbx.transform(model, cbx.Spec(targets=["*.query", "*.value"], rank=4),
                       example_kwargs=EXAMPLE)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.1)
    deploy = cbx.fold(tm, example_kwargs=EXAMPLE)
    rep = export_onnx(deploy, tmp_path / "best.onnx", example_kwargs=EXAMPLE,
                      optimize="fastest")
    assert set(rep.timings_ms) == {"ort", "none", "torchscript", "torchscript+ort"}
    assert rep.optimize == min(rep.timings_ms, key=rep.timings_ms.get) and rep.verified
    assert rep.input_shapes["input_ids"] == ["batch", "sequence"]
    with torch.no_grad():
        want = tm.eval()(**EXAMPLE).logits
    assert (want - model(**EXAMPLE).logits).abs().max() > 1e-3  # the adapters do something
    pinned = export_onnx(deploy, tmp_path / "ts.onnx", example_kwargs=EXAMPLE,
                         optimize="torchscript+ort")
    assert pinned.op_histogram.get("com.microsoft.Attention") == 2, pinned.op_histogram
    feeds = _batch(5, 13, seed=7)
    with torch.no_grad():
        want = tm(**feeds).logits
    got = open_session(pinned.path, providers="cpu").run(feeds)["logits"]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-4)
    base = export_onnx(model, tmp_path / "base_ts.onnx", example_kwargs=EXAMPLE,
                       optimize="torchscript+ort")
    assert compare_onnx(base.path, pinned.path, latency=False).same_graph
    assert model.config._attn_implementation == "sdpa"  # traced eager, given back


def test_fastest_without_an_eager_form_says_why(tmp_path):
    """A fold that keeps dense adapters has no eager class to trace: the dynamo paths only."""
    import capaboost_fx as cbx

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 8)
    tm = cbx.transform(mlp, cbx.Spec(targets=["0"], method="padapter", activation="relu",
                                     rank=2), example_inputs=(x,))
    deploy = cbx.fold(tm)
    rep = export_onnx(deploy, tmp_path / "m.onnx", example_inputs=(x,), optimize="fastest")
    assert rep.optimize == "none" and rep.verified
    assert any("TorchScript exporter skipped" in n for n in rep.verify_notes)
    with pytest.warns(RuntimeWarning, match="optimize='torchscript' could not be made"):
        pinned = export_onnx(deploy, tmp_path / "p.onnx", example_inputs=(x,),
                             optimize="torchscript")
    assert pinned.optimize == "none" and pinned.verified


def test_a_base_decoder_exports_without_its_cache_object(tmp_path):
    """An un-adapted Hugging Face decoder returns a KV cache object by default; the export
    turns use_cache off (with a note) instead of failing, and the caller's config is kept."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    rep = export_onnx(model, tmp_path / "llama.onnx", example_kwargs={"input_ids": ids},
                      optimize="none")
    assert rep.verified and rep.output_names == ["logits"]
    assert any("use_cache=False" in n for n in rep.verify_notes)
    assert model.config.use_cache is True


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
    import capaboost_fx.onnx.candidates as export_module

    real = export_module.verify_onnx

    def fused_is_wrong(path, *args, **kwargs):
        if Path(path).parent.name == "fused":  # the staged fused candidate
            raise VerificationError("output 'logits' differs: boom")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(export_module, "verify_onnx", fused_is_wrong)
    model = files[0]
    with pytest.warns(RuntimeWarning, match="falling back to the exporter's unfused graph"):
        rep = export_onnx(model, tmp_path / "m.onnx", example_kwargs=EXAMPLE, optimize="ort")
    assert rep.optimize == "none" and rep.fusions == {} and rep.verified
    assert "com.microsoft.Attention" not in rep.op_histogram
    assert "boom" in rep.verify_notes[0]


def test_unknown_options_are_refused(tmp_path):
    from capaboost_fx.errors import InputError

    with pytest.raises(InputError, match="optimize='fast'"):
        export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", (torch.ones(2, 2),), optimize="fast")
    with pytest.raises(InputError, match="quantize='int4'"):
        export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", (torch.ones(2, 2),), quantize="int4")


def test_top_level_names_come_from_the_package_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        import capaboost_fx as cbx
        from capaboost_fx.onnx import CompareReport, ExportReport, verify_onnx

        assert cbx.export_onnx is export_onnx and cbx.verify_onnx is verify_onnx
        assert cbx.ExportReport is ExportReport and cbx.CompareReport is CompareReport
    for gone in ("runtime", "onnx_export", "report"):  # no shims at 0.1
        assert not hasattr(cbx, gone)
