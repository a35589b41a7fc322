"""Every exported file serves the sizes its model runs at, or says which it cannot (issue 31):
a dim the dynamo export fixes is warned about (input, dim, size, the model's line, what to do),
carried in the report and the file, and refused by `open_session` with that message; another
exporter that keeps it dynamic, verified at two sizes, is written instead where one can."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from capaboost_fx.errors import CapaBoostWarning, ExportError, InputError
from capaboost_fx.onnx import compare_onnx, export_onnx, open_session

IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


class SizeBranch(nn.Module):
    """Runs at any sequence length, but its code fixes the length under torch.export (a branch
    on the size: torch.export specialises it; TorchScript bakes the branch taken)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        h = self.emb(input_ids)
        if s == 8:  # the line that fixes the sequence
            h = h.view(b, 8, -1) * 2.0
        return self.head(h.mean(1))


class ExportOnlyCheck(nn.Module):
    """An export-only code path that fixes the sequence (as ``is_torchdynamo_compiling()``
    branches in Hugging Face models do): the TorchScript exporter does not take it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            torch._check(input_ids.shape[1] == 8)
        return self.head(torch.tanh(self.emb(input_ids)).mean(1))


def test_a_dim_the_model_code_fixes_is_warned_reported_and_refused(tmp_path):
    model = SizeBranch().eval()
    with pytest.warns(CapaBoostWarning) as caught:
        rep = export_onnx(model, tmp_path / "m.onnx", (IDS,))
    text = " ".join(str(w.message) for w in caught if issubclass(w.category, CapaBoostWarning))
    assert "input 'input_ids' dim 1 (sequence) is fixed at 8" in text
    assert "test_onnx_shapes.py" in text and "if s == 8" in text  # the model's line
    assert "pad" in text and "one file per size" in text  # what to do
    assert rep.fixed_dims == {"input_ids": {1: 8}}
    assert rep.input_shapes["input_ids"] == ["batch", 8]
    assert rep.to_dict()["fixed_dims"] == {"input_ids": {1: 8}}
    # The batch stays dynamic and verified; the example's length runs.
    sess = open_session(rep.path, providers="cpu")
    x = torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(sess.run({"input_ids": x})["logits" if "logits" in
                               sess.output_names else sess.output_names[0]], want,
                               rtol=1e-4, atol=1e-5)
    # Another length: our message, not onnxruntime's INVALID_ARGUMENT.
    with pytest.raises(InputError, match=r"input 'input_ids' dim 1 is 13.*accepts only 8.*"
                                         r"if s == 8.*pad requests"):
        sess.run({"input_ids": torch.randint(0, 50, (2, 13))})
    with pytest.raises(InputError, match="dim 1 is 13"):
        compare_onnx(rep.path, rep.path, runs=1, warmup=0, providers="cpu",
                     inputs={"input_ids": torch.randint(0, 50, (2, 13))})


def test_a_dim_the_dynamo_export_fixes_becomes_dynamic_with_torchscript(tmp_path):
    model = ExportOnlyCheck().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapaBoostWarning)  # nothing left fixed: no warning
        rep = export_onnx(model, tmp_path / "m.onnx", (IDS,), optimize="ort")
    assert rep.fixed_dims == {}
    assert rep.input_shapes["input_ids"] == ["batch", "sequence"]
    assert rep.optimize == "torchscript" and rep.verified
    assert rep.verified_shapes == [{"input_ids": [2, 8]}, {"input_ids": [3, 7]}]  # both changed
    assert any("keeps those dims dynamic" in n for n in rep.verify_notes)
    x = torch.randint(0, 50, (4, 13))
    got = open_session(rep.path, providers="cpu").run({"input_ids": x})
    with torch.no_grad():
        np.testing.assert_allclose(next(iter(got.values())), model(x).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_a_dim_the_model_itself_fixes_is_not_reported(tmp_path):
    """An image's channels, a flattened sequence: PyTorch refuses other sizes too."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapaBoostWarning)
        rep = export_onnx(model, tmp_path / "m.onnx", (torch.randn(2, 8, 4),))
    assert rep.fixed_dims == {} and rep.input_shapes["input"][1:] == [8, 4]


def test_a_data_dependent_failure_hints_only_what_was_not_tried(tmp_path):
    """torch.export fails, the TorchScript exporter (tried by export_onnx itself) fails its
    check: the error names both and does not send the user to optimize='torchscript'."""

    class ValueBranch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 9:  # a value: refused by torch.export; TorchScript bakes the
                return x * 2  # branch taken at the example (sum 8), wrong at batch 3
            return x - 1

    x = torch.ones(2, 4)
    with pytest.raises(ExportError) as info:
        export_onnx(ValueBranch().eval(), tmp_path / "m.onnx", (x,))
    text = str(info.value)
    assert "optimize='torchscript'" not in text
    assert "failed at torch.export" in text and "torch.cond" in text  # what can succeed
    assert "tried before: VerificationError" in text  # the TorchScript exporter, tried


def _tiny(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "encoder":
        model = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=3))
        return model, {"input_ids": IDS % 64}, ["*.query", "*.value"]
    if kind == "decoder":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2,
                                                 n_head=4, n_positions=64, bos_token_id=0,
                                                 eos_token_id=0))
        return model, {"input_ids": IDS % 64, "use_cache": False}, ["*.c_attn"]
    model = tf.ViTForImageClassification(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=8, num_labels=3))
    return model, {"pixel_values": torch.randn(2, 3, 16, 16)}, ["*.q_proj", "*.v_proj"]


@pytest.mark.parametrize("kind", ["encoder", "decoder", "vision"])
def test_the_default_export_follows_its_rule_for_a_model_and_its_fold(tmp_path, kind):
    """optimize="auto": the TorchScript exporter's plain graph where it makes one that
    verifies (encoder, vision), else the dynamo exporter's fused graph (GPT-2: TorchScript
    lacks aten::diff); base and fold get the same graph, the fold's adapters acting."""
    import capaboost_fx as cbx

    model, example, targets = _tiny(kind)
    model.eval()
    tm = cbx.transform(model, cbx.Spec(targets=targets, rank=2), example_kwargs=example)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.1)
    folded = cbx.fold(tm.eval(), example_kwargs=example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        base = export_onnx(model, tmp_path / "base.onnx", example_kwargs=example)
        fold = export_onnx(folded, tmp_path / "fold.onnx", example_kwargs=example)
    want = "ort" if kind == "decoder" else "torchscript"
    assert base.optimize == want and fold.optimize == want, (base.verify_notes,
                                                             fold.verify_notes)
    assert fold.verified and len(fold.verified_shapes) == 2 and fold.fixed_dims == {}
    cmp = compare_onnx(base.path, fold.path, latency=False)
    assert cmp.same_graph_up_to_folding, cmp.to_markdown()
    name = fold.input_names[0]
    x = {name: example[name]}
    got = open_session(fold.path, providers="cpu").run(x)[fold.output_names[0]]
    with torch.no_grad():
        want_fold = _first(folded(**example))
        base_out = _first(model(**example))
    np.testing.assert_allclose(got, want_fold.numpy(), rtol=1e-3, atol=1e-4)
    assert (want_fold - base_out).abs().max() > 1e-4  # the adapters act


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
