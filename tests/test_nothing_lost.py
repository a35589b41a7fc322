"""Nothing the user owns changes: the caller's model, bit for bit, through every operation and
every failure."""

from __future__ import annotations

import pytest
import torch
from models import CASES

import capaboost_fx as cbx

BERT = next(c for c in CASES if c.name == "bert")


def _state(model: torch.nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "use_cache": getattr(getattr(model, "config", None), "use_cache", None),
    }


def _same(a: dict, b: dict) -> bool:
    return (a["tensors"].keys() == b["tensors"].keys()
            and all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
            and a["grad"] == b["grad"] and a["training"] == b["training"]
            and a["use_cache"] == b["use_cache"])


def test_every_operation_and_failure_leaves_the_model_alone(tmp_path) -> None:
    torch.manual_seed(0)
    model = BERT.build().train()
    model.config.use_cache = True
    before = _state(model)
    args, kwargs = BERT.inputs(*BERT.example)

    tm = cbx.transform(model, BERT.spec, args, kwargs)
    opt = torch.optim.SGD([p for p in tm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        BERT.loss(tm(*args, **kwargs)).backward()
        opt.step()
        opt.zero_grad()
    cbx.fold(tm)
    cbx.merged_state_dict(tm)
    path = cbx.save_adapter(tm, tmp_path / "a.safetensors")
    loaded = cbx.load_adapter(model, path, args, kwargs)
    BERT.loss(loaded(*args, **kwargs)).backward()
    cbx.inspect(model, BERT.spec, args, kwargs)
    cbx.export_onnx(cbx.fold(tm), tmp_path / "m.onnx", args, kwargs)

    failures = [
        lambda: cbx.transform(model, cbx.Spec(targets=["*.nothing"]), args, kwargs),
        lambda: cbx.transform(model, cbx.Spec(targets=["*.query"], trainable=["nope"]),
                              args, kwargs),
        lambda: cbx.transform(model, BERT.spec, (), {"input_ids": args}),
        lambda: cbx.load_adapter(model, tmp_path / "missing.safetensors", args, kwargs),
        lambda: cbx.save_adapter(tm, tmp_path / "no" / "dir.safetensors"),
        lambda: cbx.export_onnx(cbx.fold(tm), tmp_path / "no" / "m.onnx", args, kwargs),
    ]
    for fail in failures:
        with pytest.raises(cbx.CapaBoostError):
            fail()
    with torch.no_grad():
        next(iter(cbx.adapters(tm).values())).B.fill_(float("inf"))
    with pytest.raises(cbx.FoldError):
        cbx.fold(tm)
    assert _same(before, _state(model))
