"""Spec validation, JSON round trip, and the errors users see for bad specs and inputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import capaboost_fx as cbx

BAD = [
    (dict(density=0.0), cbx.SpecError, "density"),
    (dict(density=1.5), cbx.SpecError, "(0, 1]"),
    (dict(num_masks=0), cbx.SpecError, "num_masks"),
    (dict(rank=0), cbx.SpecError, "rank"),
    (dict(rank=2.5), cbx.SpecTypeError, "int"),
    (dict(rank=True), cbx.SpecTypeError, "int"),
    (dict(mask="gaussian"), cbx.SpecError, "'gaussian'"),
    (dict(dropout=-0.1), cbx.SpecError, "dropout"),
    (dict(dropout=1.0), cbx.SpecError, "dropout"),
    (dict(alpha=0), cbx.SpecError, "alpha"),
    (dict(alpha=float("nan")), cbx.SpecTypeError, "finite"),
    (dict(seed=-1), cbx.SpecError, "seed"),
    (dict(targets=[]), cbx.SpecError, "targets"),
    (dict(targets=[3]), cbx.SpecTypeError, "list of strings"),
    (dict(targets=["re:("]), cbx.SpecError, "regex"),
    (dict(trainable="classifier", density="0.5"), cbx.SpecTypeError, "density"),
]


@pytest.mark.parametrize("kwargs,exc,text", BAD)
def test_invalid_values(kwargs: dict, exc: type, text: str) -> None:
    kwargs = {"targets": ["*.query"], **kwargs}
    with pytest.raises(exc, match=None) as info:
        cbx.Spec(**kwargs)
    assert text in str(info.value)
    assert isinstance(info.value, cbx.CapaBoostError)
    assert isinstance(info.value, (ValueError, TypeError))


def test_round_trip_through_json() -> None:
    spec = cbx.Spec(targets=["*.query", "re:.*value$"], exclude=["*.0.*"], rank=4, num_masks=3,
                    density=0.25, alpha=8, dropout=0.1, seed=5, trainable=["classifier"])
    again = cbx.Spec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert isinstance(again.alpha, float) and spec.scale == 2.0


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(cbx.SpecError, match="unknown key.*'rnak'"):
        cbx.Spec.from_dict({"targets": ["*.q"], "rnak": 4})
    with pytest.raises(cbx.SpecTypeError):
        cbx.Spec.from_dict(["targets"])


def test_single_string_is_one_pattern() -> None:
    assert cbx.Spec(targets="*.query").targets == ["*.query"]


def test_selects_globs_regex_and_exclude() -> None:
    spec = cbx.Spec(targets=["*.query", r"re:.*layer\.(0|1)\..*value$"], exclude=["*.3.*"])
    from capaboost_fx.spec import pattern_matches

    def selects(name: str) -> bool:
        return any(pattern_matches(p, name) for p in spec.targets) and not any(
            pattern_matches(p, name) for p in spec.exclude)

    assert selects("bert.encoder.layer.0.attention.self.query")
    assert selects("bert.encoder.layer.1.attention.self.value")
    assert not selects("bert.encoder.layer.2.attention.self.value")
    assert not selects("bert.encoder.layer.3.attention.self.query")  # exclude wins


MLP = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
X = (torch.randn(3, 8),)


def test_target_matching_nothing_lists_close_names() -> None:
    with pytest.raises(cbx.TargetNotFoundError) as info:
        cbx.transform(MLP, cbx.Spec(targets=["0", "*.query"]), X)
    msg = str(info.value)
    assert "'*.query'" in msg and "Closest target names" in msg and "'0'" in msg


def test_exclude_removing_everything() -> None:
    with pytest.raises(cbx.TargetNotFoundError, match="none can be adapted"):
        cbx.transform(MLP, cbx.Spec(targets=["0", "2"], exclude=["*"]), X)


def test_rank_above_min_features() -> None:
    with pytest.raises(cbx.TargetError, match="rank 4 exceeds min"):
        cbx.transform(MLP, cbx.Spec(targets=["4"], rank=4), X)


def test_trainable_that_does_not_exist() -> None:
    with pytest.raises(cbx.TargetNotFoundError, match="'clasifier'.*Closest"):
        cbx.transform(MLP, cbx.Spec(targets=["0"], trainable=["clasifier"]), X)


def test_trainable_module_and_parameter() -> None:
    tm = cbx.transform(MLP, cbx.Spec(targets=["0"], rank=2, trainable=["4", "2.bias"]), X)
    grads = {n for n, p in tm.named_parameters() if p.requires_grad}
    assert grads == {"wrapped.4.weight", "wrapped.4.bias", "wrapped.2.bias",
                     "wrapped.0.capaboost.A", "wrapped.0.capaboost.B"}


def test_input_errors() -> None:
    spec = cbx.Spec(targets=["0"], rank=2)
    with pytest.raises(cbx.InputError, match="example inputs"):
        cbx.transform(MLP, spec)
    with pytest.raises(cbx.InputError, match="tuple"):
        cbx.transform(MLP, spec, example_inputs={"x": X[0]})
    with pytest.raises(cbx.InputError, match="do not fit"):
        cbx.transform(MLP, spec, example_inputs=X, example_kwargs={"y": X[0]})
    tm = cbx.transform(MLP, spec, X)
    with pytest.raises(cbx.InputError, match="do not fit"):  # a new structure the model refuses
        tm(X[0], X[0])
    with pytest.raises(cbx.InputError,  # feature dim is not dynamic
                       match=r"input has shape \(3, 9\): dim 1 is 9, but it is fixed at 8"):
        tm(torch.randn(3, 9))


def test_sequence_beyond_captured_range() -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32,
                                 max_position_embeddings=32))
    tm = cbx.transform(model, cbx.Spec(targets=["*.query"], rank=2),
                       (torch.randint(0, 50, (2, 5)),))
    tm(torch.randint(0, 50, (4, 32)))
    with pytest.raises(cbx.InputError) as info:
        tm(torch.randint(0, 50, (4, 33)))
    msg = str(info.value)  # the model's own limit, in the argument's name, no symbols
    assert "input_ids has shape (4, 33): dim 1 is 33" in msg
    assert "accepts at most 32 positions (config.max_position_embeddings = 32)" in msg
    assert "dynamic_shapes" not in msg and not re.search(r"\bs\d+\b|VR\[", msg)


def test_batch_one_example_warns() -> None:
    with pytest.warns(UserWarning, match="fixed"):
        cbx.transform(MLP, cbx.Spec(targets=["0"], rank=2), (torch.randn(1, 8),))


def test_wrong_module_kinds() -> None:
    spec = cbx.Spec(targets=["0"], rank=2)
    tm = cbx.transform(MLP, spec, X)
    with pytest.raises(cbx.AlreadyTransformedError):
        cbx.transform(tm, spec, X)
    with pytest.raises(cbx.NotTransformedError, match="transform"):
        cbx.fold(MLP)
    with pytest.raises(cbx.NotTransformedError, match="already folded"):
        cbx.fold(cbx.fold(tm))
    with pytest.raises(cbx.SpecTypeError):
        cbx.transform(MLP, {"targets": ["0"]}, X)


def test_nan_delta_at_fold_names_the_target() -> None:
    tm = cbx.transform(MLP, cbx.Spec(targets=["0", "2"], rank=2), X)
    with torch.no_grad():
        cbx.adapters(tm)["2"].B[0, 0] = float("nan")
    with pytest.raises(cbx.FoldError, match="'2'"):
        cbx.fold(tm)


@pytest.mark.parametrize("kwargs,guess", [({"r": 8}, "rank"), ({"densty": 0.5}, "density"),
                                          ({"target": ["*.q"]}, "targets"),
                                          ({"lora_alpha": 16}, "alpha")])
def test_unknown_field_names_the_closest(kwargs: dict, guess: str) -> None:
    (key,) = kwargs
    with pytest.raises(cbx.SpecTypeError,
                       match=f"unknown field '{key}'; did you mean '{guess}'") as info:
        cbx.Spec(targets=["*.q"], **kwargs) if key != "target" else cbx.Spec(**kwargs)
    assert isinstance(info.value, TypeError)
    with pytest.raises(cbx.SpecTypeError, match="the fields are"):
        cbx.Spec(targets=["*.q"], zzzz=1)
    with pytest.raises(cbx.SpecTypeError, match="multiple values"):
        cbx.Spec(["*.q"], targets=["*.k"])
