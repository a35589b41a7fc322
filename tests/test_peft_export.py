"""to_peft_lora: PEFT loads a CapaBoost adapter as rank-d·r LoRA with no error; rank report."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from models import CASES, first_tensor

import capaboost_fx as cbx


@pytest.mark.parametrize("name,spec", [
    ("bert", cbx.Spec(targets=["*.query", "*.value"], rank=4, num_masks=2, density=0.5,
                      trainable=["classifier"], overrides={"*.1.*": {"rank": 2, "alpha": 3.0}})),
    ("gpt2", cbx.Spec(targets=["*.c_attn"], rank=4, num_masks=3, density=0.5)),
    ("llama", cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, num_masks=2, density=0.5)),
])
def test_peft_loads_the_adapter_exactly(name: str, spec: cbx.Spec, tmp_path) -> None:
    case = next(c for c in CASES if c.name == name)
    torch.manual_seed(0)
    model = case.build().eval()
    tm = cbx.transform(model, spec, *case.inputs(*case.example)).eval()
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.2)
        if spec.trainable:
            tm.wrapped.classifier.weight.add_(1.0)
    out_dir = cbx.to_peft_lora(tm, tmp_path / "peft")
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["r"] == spec.rank * spec.num_masks
    base = case.build()
    base.load_state_dict(model.state_dict())
    if hasattr(base, "config"):
        base.config.use_cache = False
    loaded = peft.PeftModel.from_pretrained(base, str(out_dir)).eval()
    args, kwargs = case.inputs(*case.other)
    ours = first_tensor(tm(*args, **kwargs))
    theirs = first_tensor(loaded(*args, **kwargs))
    assert (ours - first_tensor(model(*args, **kwargs))).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_parameter_targets_are_refused(tmp_path) -> None:
    case = next(c for c in CASES if c.name == "transformer_encoder")
    tm = cbx.transform(case.build(), case.spec, *case.inputs(*case.example))
    with pytest.raises(cbx.TargetError, match="in_proj_weight.*PEFT"):
        cbx.to_peft_lora(tm, tmp_path / "p")


def test_rank_report() -> None:
    case = next(c for c in CASES if c.name == "bert")
    torch.manual_seed(0)
    spec = cbx.Spec(targets=["*.query"], rank=4, num_masks=2, density=0.5)
    tm = cbx.transform(case.build(), spec, *case.inputs(*case.example))
    rep = cbx.rank_report(tm)
    assert all(r["rank"] == 0 for r in rep.values())  # B = 0 at init
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_()
    rep = cbx.rank_report(tm, top=10)
    for r in rep.values():
        assert r["rank"] == r["max_rank"] == 8 and r["lora_rank"] == 4
        assert len(r["singular_values"]) == 10 and r["singular_values"][8] < 1e-10
        assert r["live_params"] < r["trainable_params"]
