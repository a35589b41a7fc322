"""Match: shared and tied weights, naming, inspect's report."""

from __future__ import annotations

import pytest
import torch
from models import SharedLinearNet, reference_delta
from torch import nn

import capaboost_fx as cbx


def test_weight_used_twice_gets_one_adapter() -> None:
    torch.manual_seed(0)
    model = SharedLinearNet().double().eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    tm = cbx.transform(model, cbx.Spec(targets=["shared"], rank=4), (x,)).eval()
    assert list(cbx.adapters(tm)) == ["shared"]
    assert tm.capture_info.sites == {"train": 2, "eval": 2}
    with torch.no_grad():
        cbx.adapters(tm)["shared"].B.normal_()
    # Reference: the shared layer's weight replaced by W0 + ΔW serves both calls.
    ref = SharedLinearNet().double()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.shared.weight += reference_delta(cbx.adapters(tm)["shared"])
    torch.testing.assert_close(tm(x), ref(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cbx.fold(tm)(x), ref(x), rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                      n_positions=32, bos_token_id=0, eos_token_id=0))


def test_tied_weight_is_refused_when_named(gpt2) -> None:
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(cbx.TargetError, match="tied"):
        cbx.transform(gpt2, cbx.Spec(targets=["lm_head"], rank=2), (ids,))


def test_tied_weight_is_skipped_by_a_glob(gpt2) -> None:
    ids = torch.randint(0, 64, (2, 5))
    tm = cbx.transform(gpt2, cbx.Spec(targets=["*"], rank=2), (ids,))
    assert "lm_head" not in cbx.adapters(tm)
    assert "tied" in tm.capture_info.skipped["lm_head"]
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"} <= set(cbx.adapters(tm))


def test_inspect_reports_targets_and_the_rest(gpt2) -> None:
    ids = torch.randint(0, 64, (2, 5))
    report = cbx.inspect(gpt2, cbx.Spec(targets=["*.c_attn"], rank=4), (ids,))
    (row,) = report.targets
    assert row["name"] == "transformer.h.0.attn.c_attn"
    assert row["ops"] == ["addmm"] and row["layout"] == "in_out"
    assert (row["in_features"], row["out_features"]) == (16, 48)
    assert row["trainable_params"] == 4 * (16 + 48)
    assert 0.6 * row["trainable_params"] < row["live_params"] < 0.9 * row["trainable_params"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["transformer.h.0.mlp.c_fc"] == "not matched by targets"
    assert "tied" in reasons["lm_head"] and "could not be" in reasons["lm_head"]
    text = report.to_markdown()
    assert "transformer.h.0.attn.c_attn" in text and "not rewritten" in text
    everything = cbx.inspect(gpt2, None, (ids,))
    assert not everything.targets and len(everything.skipped) == len(report.skipped) + 1
    assert all(s["reason"].startswith("not matched") for s in everything.skipped)


def test_parameter_not_named_weight_keeps_its_name() -> None:
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
    report = cbx.inspect(enc, None, (torch.randn(2, 3, 8),))
    names = {s["name"] for s in report.skipped}
    assert "layers.0.self_attn.in_proj_weight" in names
    assert "layers.0.self_attn.out_proj" in names and "layers.0.linear1" in names


def test_rejections_have_kinds_and_trainable_is_not_called_unmatched() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    spec = cbx.Spec(targets=["*"], exclude=["2"], rank=2, trainable=["4"])
    report = cbx.inspect(mlp, spec, (x,))
    kinds = {s["name"]: (s["kind"], s["reason"]) for s in report.skipped}
    assert kinds["2"] == ("excluded", "excluded by '2'")
    assert {t["name"] for t in report.targets} == {"0", "4"}
    narrow = cbx.inspect(mlp, cbx.Spec(targets=["0"], rank=2, trainable=["4"]), (x,))
    rows = {s["name"]: s for s in narrow.skipped}
    assert rows["4"]["kind"] == "trainable" and "Spec.trainable" in rows["4"]["reason"]
    assert rows["2"]["kind"] == "not_matched"
    big_rank = cbx.inspect(mlp, cbx.Spec(targets=["*"], rank=12), (x,))
    assert {s["name"]: s["kind"] for s in big_rank.skipped}["4"] == "settings"
