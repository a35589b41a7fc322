"""Train a few steps, fold, export to ONNX: onnxruntime matches PyTorch at two shapes, and the
folded graph is the base model's graph (same operators, node count, initializer shapes)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES, first_tensor
from torch import nn

import capaboost_fx as cbx

FAMILIES = [c for c in CASES if c.name in ("bert", "gpt2", "llama", "vit")]


def _train(tm, case, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=5e-2)
    tm.train()
    for b, s in [(4, 9), (2, 5), (4, 9)][:steps]:
        args, kwargs = case.inputs(b, s if case.name != "vit" else 3)
        case.loss(tm(*args, **kwargs)).backward()
        opt.step()
        opt.zero_grad()
    tm.eval()


@pytest.mark.parametrize("case", FAMILIES, ids=lambda c: c.name)
def test_folded_onnx_is_the_base_graph(case, tmp_path) -> None:
    torch.manual_seed(0)
    model = case.build().eval()
    with torch.no_grad():
        # Like pretrained weights, no two tensors equal: the exporter's optimizer merges
        # initializers with identical values (e.g. all-zero fresh biases), which a trained
        # head would then no longer share.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    args, kwargs = case.inputs(*case.example)
    tm = cbx.transform(model, case.spec, args, kwargs)
    _train(tm, case)
    deploy = cbx.fold(tm)
    folded = cbx.export_onnx(deploy, tmp_path / "folded.onnx", args, kwargs)
    assert folded.max_abs_diff is not None and folded.max_abs_diff < 1e-4  # two shapes checked
    base_model = copy.deepcopy(model)
    if hasattr(base_model, "config"):
        base_model.config.use_cache = False
    cbx.export_onnx(base_model, tmp_path / "base.onnx", args, kwargs)
    cmp = cbx.compare_onnx(tmp_path / "base.onnx", tmp_path / "folded.onnx", runs=3,
                           batch_size=2, seq_len=8)
    assert cmp.same_graph, cmp.to_markdown()
    assert cmp.base.node_count == cmp.other.node_count
    assert cmp.base.initializer_bytes == cmp.other.initializer_bytes
    # And it is the trained model, not the base: its outputs differ from the base's.
    sess = cbx.onnx.open_session(tmp_path / "folded.onnx")
    feeds = dict(zip(sess.input_names, [t.numpy() for t in (*args, *kwargs.values())],
                     strict=True))
    onnx_out = torch.from_numpy(next(iter(sess.run(feeds).values())))
    torch.testing.assert_close(onnx_out, first_tensor(tm(*args, **kwargs)), rtol=1e-4,
                               atol=1e-4)
    assert (onnx_out - first_tensor(model(*args, **kwargs))).abs().max() > 1e-3


def test_unfolded_export_shows_its_extra_cost(tmp_path) -> None:
    case = next(c for c in CASES if c.name == "bert")
    torch.manual_seed(0)
    model = case.build().eval()
    args, kwargs = case.inputs(*case.example)
    tm = cbx.transform(model, case.spec, args, kwargs).eval()
    with pytest.warns(UserWarning, match="export fold\\(train_model\\) to deploy"):
        cbx.export_onnx(tm, tmp_path / "unfolded.onnx", args, kwargs, optimize="none")
    # The same exporter for both (the default writes TorchScript's graph of the fold, and the
    # dynamo exporter's of a training module): the difference is the adapters' alone.
    cbx.export_onnx(cbx.fold(tm), tmp_path / "folded.onnx", args, kwargs, optimize="none")
    cmp = cbx.compare_onnx(tmp_path / "folded.onnx", tmp_path / "unfolded.onnx", latency=False)
    assert not cmp.same_graph
    assert cmp.other.node_count > cmp.base.node_count
    assert cmp.other.initializer_bytes > cmp.base.initializer_bytes


def test_parallel_adapter_exports(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5)).eval()
    spec = cbx.Spec(targets=["0", "2"], rank=3, num_masks=2, method="padapter",
                    activation="relu")
    x = torch.randn(4, 12)
    tm = cbx.transform(model, spec, (x,)).eval()
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_()
    report = cbx.export_onnx(cbx.fold(tm), tmp_path / "pa.onnx", (x,))
    assert report.max_abs_diff < 1e-4
    assert report.op_histogram.get("Relu", 0) == 2  # one dense adapter per target


def test_folded_module_captured_with_labels_serves_and_exports_without_them(tmp_path) -> None:
    """The README's serving call: capture with labels (training), serve with input_ids and
    attention_mask only, in PyTorch and through ONNX."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=2))
    ids, mask = torch.randint(0, 100, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    tm = cbx.transform(model, cbx.Spec(targets=["*.query"], rank=2),
                       example_kwargs={"input_ids": ids, "attention_mask": mask,
                                       "labels": torch.tensor([0, 1, 1])})
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.3)
    deploy = cbx.fold(tm)
    serve = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        want = deploy(**serve).logits
    report = cbx.export_onnx(deploy, tmp_path / "serve.onnx", example_kwargs=serve)
    from capaboost_fx.onnx import open_session

    sess = open_session(report.path if hasattr(report, "path") else tmp_path / "serve.onnx",
                        providers="cpu")
    assert sorted(sess.input_names) == ["attention_mask", "input_ids"]
    got = sess.run({"input_ids": ids, "attention_mask": mask})["logits"]
    torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4, atol=1e-5)
