"""ONNX export, verification, comparison and fusions (capaboost_fx.onnx).

The deploy module stand-in is what `fold` returns: ``torch.export.export(model.eval(), ...)
.module()``, exported with dynamic batch/sequence dims so that it runs at a second shape.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import numpy_helper
from torch import nn

from capaboost_fx.errors import ExportError, VerificationError
from capaboost_fx.onnx import (
    auto_dynamic_shapes,
    compare_onnx,
    export_onnx,
    onnx_stats,
    open_session,
    verify_onnx,
)

VOCAB = 100


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0  # padding, so the mask input is really used
    return transformers.BertForSequenceClassification(cfg), (ids,), {"attention_mask": mask}


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    return transformers.GPT2LMHeadModel(cfg), (ids,), {}


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        use_cache=False,
    )
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    return transformers.LlamaForCausalLM(cfg), (ids,), {}


def _vit():
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    return transformers.ViTForImageClassification(cfg), (pixels,), {}


CASES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit}


def _deploy(model, args, kwargs):
    """The stand-in for `fold(...)`: an exported GraphModule with dynamic batch/sequence."""
    model = model.eval()
    shapes = auto_dynamic_shapes(model, args, kwargs)
    return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False).module()


def _perturbed(module):
    """Same graph, other linear weights (what a fold does to its targets)."""
    other = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if p.ndim == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`exported(name)`: the family's deploy stand-in and a weight-perturbed copy, both exported.

    Built on first use and shared by the tests of this module (exports are the slow part).
    """
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model, args, kwargs = CASES[name]()
            folder = tmp_path_factory.mktemp(name)
            base = _deploy(model, args, kwargs)
            other = _perturbed(base)
            cache[name] = {
                "name": name,
                "args": args,
                "kwargs": kwargs,
                "base": base,
                "other": other,
                "folder": folder,
                "base_report": export_onnx(base, folder / "base.onnx", args, kwargs),
                "other_report": export_onnx(other, folder / "other.onnx", args, kwargs),
            }
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_export_verifies_at_two_shapes(exported, name):
    family = exported(name)
    rep = family["base_report"]
    assert rep.verified and rep.providers == ["CPUExecutionProvider"]
    assert rep.output_names == ["logits"]
    # The default file is the fused one for every family: GPT-2's addmm (a Gemm after the
    # attention fusion) no longer makes onnxruntime refuse it and fall back to the plain graph.
    assert rep.optimize == "ort" and rep.fusions, (rep.optimize, rep.verify_notes)
    assert len(rep.verified_shapes) == 2
    first, second = rep.verified_shapes
    name = rep.input_names[0]
    assert second[name][0] == first[name][0] + 1  # batch changed
    if family["name"] != "vit":
        assert second[name][1] == first[name][1] - 1  # sequence changed
    assert rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4
    # The file on disk keeps the batch dim symbolic.
    inputs = onnx_stats(rep.path).inputs
    assert isinstance(inputs[0]["shape"][0], str)
    assert sorted(os.listdir(family["folder"])) == ["base.onnx", "other.onnx"]
    assert json.loads(json.dumps(rep.to_dict()))["op_histogram"] == rep.op_histogram
    assert rep.node_count == sum(rep.op_histogram.values())
    assert rep.initializer_bytes > 0 and rep.file_bytes >= rep.initializer_bytes


@pytest.mark.parametrize("name", list(CASES))
def test_exported_file_runs_at_a_third_shape(exported, name):
    family = exported(name)
    """The final file (not the temporary one verify saw) runs at a new shape and matches."""
    args, kwargs = family["args"], family["kwargs"]
    big = tuple(torch.cat([a, a], 0) for a in args)
    big_kwargs = {k: torch.cat([v, v], 0) for k, v in kwargs.items()}
    sess = open_session(family["base_report"].path, providers="cpu")
    out = sess.run([*big, *big_kwargs.values()])
    with torch.no_grad():
        want = family["base"](*big, **big_kwargs).logits
    np.testing.assert_allclose(out["logits"], want.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_perturbed_weights_give_the_same_graph(exported, name):
    family = exported(name)
    base, other = family["base_report"].path, family["other_report"].path
    rep = compare_onnx(base, other, latency=False)
    assert rep.same_graph, rep.to_markdown()
    assert rep.op_diff == {}
    assert rep.base.node_count == rep.other.node_count
    assert rep.base.initializer_shapes == rep.other.initializer_shapes
    # Not the same file in disguise: some initializer holds other values...
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(base).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(other).graph.initializer}
    assert any(not np.array_equal(a[n], b[n]) for n in a if n in b and a[n].shape == b[n].shape)
    # ...and the outputs differ.
    feeds = [*family["args"], *family["kwargs"].values()]
    out_a = open_session(base, providers="cpu").run(feeds)["logits"]
    out_b = open_session(other, providers="cpu").run(feeds)["logits"]
    assert np.abs(out_a - out_b).max() > 1e-3


def test_corrupted_initializer_fails_verification(exported, tmp_path):
    family = exported("bert")
    model = onnx.load(family["base_report"].path)
    (weight,) = [t for t in model.graph.initializer if t.name == "classifier.weight"]
    values = numpy_helper.to_array(weight).copy()
    values[0, :] += 0.5
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    args, kwargs = family["args"], family["kwargs"]
    # Control: the intact file passes the same check.
    ok = verify_onnx(family["base_report"].path, family["base"], args, kwargs)
    assert ok.max_abs_diff < 1e-4 and len(ok.shapes) == 2
    with pytest.raises(VerificationError, match=r"output 'logits'.*max abs diff"):
        verify_onnx(bad, family["base"], args, kwargs)


class MLP(nn.Module):
    def __init__(self, extra: bool = False, dropout: float = 0.0):
        super().__init__()
        layers = [nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout)]
        if extra:
            layers += [nn.Linear(16, 16), nn.ReLU()]
        layers += [nn.Linear(16, 4)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def test_structurally_different_model_is_not_the_same_graph(tmp_path):
    torch.manual_seed(0)
    export_onnx(MLP(), tmp_path / "a.onnx", (X,))
    export_onnx(MLP(extra=True), tmp_path / "b.onnx", (X,))
    rep = compare_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", latency=False)
    assert not rep.same_graph
    assert rep.other.node_count > rep.base.node_count
    assert sum(rep.op_diff.values()) == rep.other.node_count - rep.base.node_count
    assert rep.op_diff.get("Relu") == 1
    assert rep.initializer_shapes_only_in_other == {"float32[16,16]": 1, "float32[16]": 1}
    assert rep.base.inputs[0]["shape"][1] == 8  # (batch, features): features static
    assert rep.initializer_shapes_only_in_base == {}
    md = rep.to_markdown()
    assert "**no**" in md and "| Relu | 1 | 2 | +1 |" in md and "float32[16,16]: 1" in md


def test_compare_latency_is_measured_for_both(exported):
    family = exported("bert")
    base, other = family["base_report"].path, family["other_report"].path
    rep = compare_onnx(base, other, runs=7, warmup=1, batch_size=4, seq_len=16)
    assert rep.same_graph
    for lat in (rep.latency_base, rep.latency_other):
        assert lat.runs == 7 and lat.providers == ["CPUExecutionProvider"]
        assert 0 < lat.min_ms <= lat.p10_ms <= lat.median_ms <= lat.p90_ms
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["latency_other"]["runs"] == 7 and data["batch_size"] == 4
    assert "latency median ms (batch 4, seq 16)" in rep.to_markdown()


def test_eager_model_in_train_mode_is_exported_in_eval_and_restored(tmp_path):
    model = MLP(dropout=0.5).train()
    rep = export_onnx(model, tmp_path / "m.onnx", (X,))
    assert rep.max_abs_diff < 1e-5  # dropout would make this fail
    assert model.training and model.net[2].training
    assert "Dropout" not in rep.op_histogram


def test_output_names_follow_the_output_structure(tmp_path):
    class Two(nn.Module):
        def forward(self, x):
            return x.sum(-1), {"scores": x * 2, "rest": (x + 1,)}

    rep = export_onnx(Two(), tmp_path / "t.onnx", (X,))
    assert rep.output_names == ["output_0", "output_1_scores", "output_1_rest_0"]
    out = open_session(rep.path, providers="cpu").run({"x": X.numpy()})
    np.testing.assert_allclose(out["output_1_scores"], (X * 2).numpy())


def test_batch_of_one_still_gives_a_dynamic_graph(tmp_path):
    """Measured on torch 2.13: torch.onnx.export does not specialise a size-1 dim under
    Dim.AUTO (torch.export.export does), so an eager model exported at batch 1 stays dynamic."""
    rep = export_onnx(MLP(), tmp_path / "one.onnx", (X[:1],), input_names=["features"])
    assert isinstance(rep.input_shapes["features"][0], str)
    assert [s["features"] for s in rep.verified_shapes] == [[1, 8], [2, 8]]


def test_static_graph_is_verified_at_one_shape_with_a_note(tmp_path):
    rep = export_onnx(MLP(), tmp_path / "s.onnx", (X,), dynamic_shapes={"x": None})
    assert rep.input_shapes == {"x": [3, 8]}
    assert len(rep.verified_shapes) == 1
    assert any("no dynamic input dims" in n for n in rep.verify_notes)


def test_static_capture_gives_an_honest_static_graph(tmp_path):
    """The brief's plain stand-in, torch.export without dynamic shapes, runs at one shape only;
    the ONNX exporter would drop its guards and claim dynamic dims that then fail."""
    static = torch.export.export(MLP().eval(), (X,), strict=False).module()
    with pytest.warns(UserWarning, match="runs only at the example's input shapes"):
        rep = export_onnx(static, tmp_path / "st.onnx", (X,))
    assert rep.input_shapes == {"x": [3, 8]} and rep.dynamic_shapes.startswith("static")
    assert len(rep.verified_shapes) == 1


def test_user_input_names_and_dynamic_shapes(tmp_path):
    dims = {"x": {0: torch.export.Dim("batch", min=2, max=64)}}
    rep = export_onnx(
        MLP(), tmp_path / "u.onnx", (X,), dynamic_shapes=dims, input_names=["features"]
    )
    assert rep.dynamic_shapes == "user" and rep.input_names == ["features"]
    assert rep.input_shapes["features"][1] == 8 and isinstance(rep.input_shapes["features"][0], str)
    assert [s["features"] for s in rep.verified_shapes] == [[3, 8], [4, 8]]


def test_auto_dims_are_what_the_traced_graph_leaves_dynamic(tmp_path):
    """One rule for dynamic dims: Dim.AUTO on dims 0 and 1 of every input (capture's rule),
    and torch.export, tracing the model, keeps static what the model fixes (a Linear's
    features, a conv's channels): the file's dims are the traced graph's."""
    class Inputs(nn.Module):
        def forward(self, pixels, ids, features, embeds, scale):
            return pixels

    shapes = auto_dynamic_shapes(
        Inputs(),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 7)),
        {"embeds": torch.zeros(2, 5, 4), "scale": torch.zeros(2)},
    )
    assert {k: sorted(v) for k, v in shapes.items()} == {
        "pixels": [0, 1], "ids": [0, 1], "features": [0, 1], "embeds": [0, 1], "scale": [0]}
    rep = export_onnx(MLP(), tmp_path / "mlp.onnx", (X,))
    assert rep.input_shapes["x"] == ["batch", 8] and rep.dynamic_shapes.startswith("auto")
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    rep = export_onnx(conv, tmp_path / "conv.onnx", (torch.randn(2, 3, 8, 8),))
    assert rep.input_shapes["input"] == ["batch", 3, 8, 8]
    assert [s["input"][0] for s in rep.verified_shapes] == [2, 3]


def test_export_failure_is_an_export_error(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent branch: torch.export cannot capture it
                return x
            return -x

    with pytest.raises(ExportError, match="ONNX export of Bad .* failed at torch.export") as info:
        export_onnx(Bad(), tmp_path / "b.onnx", (X,))
    assert "\x1b[" not in str(info.value) and "if x.sum() > 0" in str(info.value)
    assert os.listdir(tmp_path) == []
