"""save_adapter / load_adapter: exact round trip, small files, clear failures, no pickle."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from models import CASES, first_tensor

import capaboost_fx as cbx

BERT = next(c for c in CASES if c.name == "bert")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = BERT.build().eval()
    example = BERT.inputs(*BERT.example)
    spec = cbx.Spec(targets=["*.query", "*.value"], rank=4, num_masks=2, density=0.5,
                    trainable=["classifier"], seed=3)
    tm = cbx.transform(model, spec, *example)
    opt = torch.optim.Adam([p for p in tm.parameters() if p.requires_grad], lr=1e-2)
    tm.train()
    for _ in range(3):
        opt.zero_grad()
        BERT.loss(tm(*example[0], **example[1])).backward()
        opt.step()
    return model, example, tm.eval()


def test_round_trip_is_bit_exact(trained, tmp_path) -> None:
    model, example, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    fresh = BERT.build()
    fresh.load_state_dict(model.state_dict())  # "a fresh copy of the base model"
    loaded = cbx.load_adapter(fresh, path, *example).eval()
    args, kwargs = BERT.inputs(*BERT.other)
    assert torch.equal(first_tensor(loaded(*args, **kwargs)), first_tensor(tm(*args, **kwargs)))
    for name, a in cbx.adapters(tm).items():
        b = cbx.adapters(loaded)[name]
        assert torch.equal(a.mask_A, b.mask_A) and torch.equal(a.mask_B, b.mask_B)
    assert torch.equal(loaded.wrapped.classifier.weight, tm.wrapped.classifier.weight)


def test_file_holds_only_the_trainable_tensors(trained, tmp_path) -> None:
    _, _, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    ab = sum(a.A.numel() + a.B.numel() for a in cbx.adapters(tm).values()) * 4
    masks = sum((a.mask_A.numel() + 7) // 8 + (a.mask_B.numel() + 7) // 8
                for a in cbx.adapters(tm).values())
    head = sum(p.numel() * 4 for p in tm.wrapped.classifier.parameters())
    size = os.path.getsize(path)
    header = cbx.read_header(path)
    assert header["spec"] == tm.spec.to_dict() and header["trainable"] == [
        "classifier.weight", "classifier.bias"]
    payload = ab + masks + head
    overhead = size - payload
    assert 0 < overhead < len(json.dumps(header)) + 4096  # header + safetensors index
    model_bytes = sum(p.numel() * 4 for p in tm.wrapped.parameters())
    assert size < model_bytes / 10


def test_loading_onto_another_base_fails_clearly(trained, tmp_path) -> None:
    _, _, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(
        vocab_size=99, num_labels=3, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64))
    args, kwargs = BERT.inputs(*BERT.example)
    with pytest.raises(cbx.AdapterFileError, match="another base model.*shapes differing"):
        cbx.load_adapter(other, path, args, kwargs)


def test_truncated_and_foreign_files_fail_clearly(trained, tmp_path) -> None:
    model, example, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(cbx.AdapterFileError, match="truncated or damaged"):
        cbx.load_adapter(model, cut, *example)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(cbx.AdapterFileError):
        cbx.load_adapter(model, junk, *example)
    with pytest.raises(cbx.AdapterFileNotFoundError):
        cbx.load_adapter(model, tmp_path / "missing.safetensors", *example)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(cbx.AdapterFileError, match="not written by capaboost_fx"):
        cbx.load_adapter(model, plain, *example)


def test_newer_format_version_is_refused(trained, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, example, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["capaboost_fx"])
    header["format_version"] = 99
    future = tmp_path / "future.safetensors"
    save_file(tensors, future, metadata={"capaboost_fx": json.dumps(header)})
    with pytest.raises(cbx.AdapterFileError, match="format 99.*Upgrade"):
        cbx.read_header(future)


def test_failed_save_leaves_the_existing_file(trained, tmp_path, monkeypatch) -> None:
    _, _, tm = trained
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"precious")
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        cbx.save_adapter(tm, path)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["a.safetensors"]
    with pytest.raises(cbx.FileWriteError, match="does not exist"):
        cbx.save_adapter(tm, tmp_path / "nope" / "a.safetensors")


def test_save_needs_a_training_module(trained, tmp_path) -> None:
    model, _, tm = trained
    with pytest.raises(cbx.NotTransformedError):
        cbx.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(cbx.NotTransformedError):
        cbx.save_adapter(cbx.fold(tm), tmp_path / "a.safetensors")


def test_saved_file_has_the_usual_mode(trained, tmp_path) -> None:
    _, _, tm = trained
    old = os.umask(0o022)
    try:
        path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def _rewrite_header(path, out, edit) -> None:
    """Copy an adapter file to `out` with `edit(header)` applied (tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["capaboost_fx"])
    edit(header)
    save_file(tensors, out, metadata={"capaboost_fx": json.dumps(header)})


def test_edited_header_is_refused(trained, tmp_path) -> None:
    model, example, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    assert len(cbx.read_header(path)["header_sha256"]) == 64
    edited = tmp_path / "edited.safetensors"
    _rewrite_header(path, edited, lambda h: h["spec"].update(density=0.7))
    with pytest.raises(cbx.AdapterFileError, match="header.*does not match its sha256.*edited"):
        cbx.load_adapter(model, edited, *example)


def test_file_without_header_checksum_loads_with_a_warning(trained, tmp_path) -> None:
    model, example, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    old = tmp_path / "old.safetensors"  # as written before the header checksum existed
    _rewrite_header(path, old, lambda h: [h.pop("header_sha256"), h.pop("base_weights")])
    with pytest.warns(cbx.CapaBoostWarning, match="no header checksum"):
        loaded = cbx.load_adapter(model, old, *example)
    for name, a in cbx.adapters(tm).items():
        assert torch.equal(cbx.adapters(loaded)[name].B, a.B)


def test_directory_path_says_it_is_a_directory(trained, tmp_path) -> None:
    model, example, tm = trained
    cbx.save_adapter(tm, tmp_path / "a.safetensors")
    with pytest.raises(cbx.AdapterFileNotFoundError,
                       match=r"is a directory that holds no capaboost_fx adapter.*\.safetensors file.*\[.a\.safetensors.\]"):
        cbx.load_adapter(model, tmp_path, *example)


def test_other_base_weights_warn(trained, tmp_path) -> None:
    import warnings

    model, example, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", cbx.CapaBoostWarning)
        cbx.load_adapter(model, path, *example)  # the same base: silent
        cbx.load_adapter(copy.deepcopy(model).to(torch.bfloat16), path,
                         *example)  # same weights in another dtype: silent
    other = BERT.build()  # same names and shapes, other (random) weights
    with pytest.warns(cbx.CapaBoostWarning, match=r"4 of the 4 targeted base weights hold other"):
        cbx.load_adapter(other, path, *example)


def test_other_architecture_names_missing_weights(trained, tmp_path) -> None:
    from torch import nn

    model, example, tm = trained
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    mlp = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(cbx.AdapterFileError, match=r"saved for another model: 6 of the 6 .*"
                       r"not in this Sequential, e\.g\. \['bert\.encoder\.layer\.0"):
        cbx.load_adapter(mlp, path, (torch.randn(3, 32),))
