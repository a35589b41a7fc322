"""A catalogue of mistakes driven through every public entry point: each raises a
`CapaBoostError` (the original, if any, as its ``__cause__``) whose message names what was
wrong: the argument, the pattern, the file."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import capaboost_fx as cbx

VOCAB, POSITIONS = 50, 16
X = torch.randn(4, 8)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=POSITIONS, num_labels=3))


def _ids(b: int = 3, s: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s))


class Picky(nn.Module):
    """A model whose own forward refuses some inputs, as user code does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise ValueError("Picky takes at most 4 rows")
        return self.fc(x)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    warnings.simplefilter("ignore")
    bert = _bert()
    kw = {"input_ids": _ids(), "attention_mask": torch.ones(3, 7, dtype=torch.long),
          "labels": torch.tensor([0, 1, 2])}
    tm = cbx.transform(bert, cbx.Spec(targets=["*.query", "*.value"], rank=2), example_kwargs=kw)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    tmm = cbx.transform(mlp, cbx.Spec(targets=["0"], rank=2), (X,))
    eager = cbx.transform(Picky(), cbx.Spec(targets=["fc"], rank=2), (X,), capture="eager")
    eager_bert = cbx.transform(bert, cbx.Spec(targets=["*.query"], rank=2), capture="eager")
    d = tmp_path_factory.mktemp("catalogue")
    cbx.save_adapter(tmm, d / "mlp.safetensors")
    (d / "junk.safetensors").write_bytes(b"not a file")
    return {"bert": bert, "kw": kw, "tm": tm, "fm": cbx.fold(tm), "mlp": mlp, "tmm": tmm,
            "eager": eager, "eager_bert": eager_bert, "dir": d}


def _bert_call(k: dict, **change: torch.Tensor) -> Callable[[], object]:
    return lambda: k["tm"](**{**k["kw"], **change})


# (name, call, expected class, text the message must hold (regex))
CATALOGUE: list[tuple[str, Callable[[dict], Callable[[], object]], type, str]] = [
    # transform: patterns that match nothing, wrong argument types
    ("transform: override typo", lambda k: lambda: cbx.transform(
        k["bert"], cbx.Spec(targets=["*.query"], overrides={"*.vlaue": {"rank": 1}}),
        example_kwargs=k["kw"]), cbx.TargetNotFoundError,
     r"overrides pattern '\*\.vlaue' matched none of the 1 targets.*Closest target names"),
    ("transform: exclude typo", lambda k: lambda: cbx.transform(
        k["mlp"], cbx.Spec(targets=["*"], exclude=["3"]), (X,)), cbx.TargetNotFoundError,
     r"exclude entry '3' matched none.*Closest names: \['0', '2'\]"),
    ("transform: trainable typo", lambda k: lambda: cbx.transform(
        k["mlp"], cbx.Spec(targets=["0"], trainable=["hed"]), (X,)), cbx.TargetNotFoundError,
     r"trainable entry 'hed'.*Closest names"),
    ("transform: blocks typo", lambda k: lambda: cbx.transform(
        k["mlp"], cbx.Spec(targets=["0"]), (X,), blocks=["layers.*"]),
     cbx.TargetNotFoundError, r"blocks entry 'layers\.\*' names no module.*Closest names"),
    ("transform: checkpoint typo (eager)", lambda k: lambda: cbx.transform(
        k["mlp"], cbx.Spec(targets=["0"]), (X,), checkpoint=["lyr"], capture="eager"),
     cbx.TargetNotFoundError, r"checkpoint entry 'lyr' names no module"),
    ("transform: blocks of a wrong type", lambda k: lambda: cbx.transform(
        k["mlp"], cbx.Spec(targets=["0"]), (X,), blocks=3), cbx.SpecTypeError, r"blocks="),
    ("transform: modes typo", lambda k: lambda: cbx.transform(
        k["mlp"], cbx.Spec(targets=["0"]), (X,), modes=("trian",)), cbx.SpecError,
     r"modes.*'trian'"),
    ("transform: model is None", lambda k: lambda: cbx.transform(
        None, cbx.Spec(targets=["0"]), (X,)), cbx.SpecTypeError, r"model must be"),
    ("transform: example of 600 positions on a 16-position model", lambda k: lambda:
     cbx.transform(k["bert"], cbx.Spec(targets=["*.query"]), (_ids(2, 40),), capture="graph"),
     cbx.CaptureError, r"input_ids has shape \(2, 40\).*accepts at most 16 positions "
                       r"\(config\.max_position_embeddings = 16\)"),
    # inspect
    ("inspect: spec of a wrong type", lambda k: lambda: cbx.inspect(k["mlp"], "0", (X,)),
     cbx.SpecTypeError, r"spec must be"),
    ("inspect: capture typo", lambda k: lambda: cbx.inspect(
        k["mlp"], cbx.Spec(targets=["0"]), (X,), capture="graf"), cbx.SpecError, r"'graf'"),
    # calling the training module
    ("call: 3-D input_ids", lambda k: _bert_call(k, input_ids=_ids(3, 7)[..., None]),
     cbx.InputError, r"input_ids has shape \(3, 7, 1\), rank 3; the module takes input_ids "
                     r"of rank 2"),
    ("call: float input_ids", lambda k: _bert_call(k, input_ids=_ids().float()),
     cbx.ForwardInputError, r"input_ids has dtype torch\.float32.*integer torch\.int64"),
    ("call: sequence beyond the model's positions", lambda k: _bert_call(
        k, input_ids=_ids(3, 20), attention_mask=torch.ones(3, 20, dtype=torch.long)),
     cbx.ForwardInputError, r"input_ids has shape \(3, 20\): dim 1 is 20, but the model "
                            r"accepts at most 16 positions"),
    ("call: labels of another batch", lambda k: _bert_call(k, labels=torch.tensor([0, 1])),
     cbx.ForwardInputError, r"labels\.shape\[0\] is 2 but input_ids\.shape\[0\] is 3"),
    ("call: misspelled keyword", lambda k: lambda: k["tm"](
        input_id=_ids(), attention_mask=torch.ones(3, 7, dtype=torch.long),
        labels=torch.tensor([0, 1, 2])),
     cbx.InputError, r"passes \['input_id'\], which no captured call did \(captured: "
                     r"\['attention_mask', 'input_ids', 'labels'\]\); did you mean 'input_ids'"),
    ("call: ids outside the vocabulary", lambda k: _bert_call(k, input_ids=_ids() + VOCAB),
     cbx.ForwardLookupError, r"input_ids holds values .*vocabulary has 50 entries"),
    ("call: wrong feature size", lambda k: lambda: k["tmm"](torch.randn(4, 9)),
     cbx.InputError, r"input has shape \(4, 9\): dim 1 is 9, but it is fixed at 8"),
    ("call: integer features", lambda k: lambda: k["tmm"](torch.ones(4, 8, dtype=torch.long)),
     cbx.ForwardInputError, r"input has dtype torch\.int64"),
    ("call: None for a tensor", lambda k: lambda: k["tmm"](None), cbx.InputError,
     r"input is None"),
    ("call (eager): the model's own code raises", lambda k: lambda: k["eager"](
        torch.randn(6, 8)), cbx.ForwardValueError,
     r"Picky's own forward \(run eagerly\) raised ValueError at .*Picky takes at most 4 rows"),
    # fold and the folded module
    ("call (eager): another rank than the calls that ran", lambda k: lambda: (
        k["eager"](X), k["eager"](torch.randn(8))),
     cbx.ForwardValueError, r"x has shape \(8,\), rank 1; the calls that ran passed x of "
                            r"rank 2 \(e\.g\. \(4, 8\)\)\. Picky's own forward"),
    ("call (eager): ids outside the vocabulary", lambda k: lambda: k["eager_bert"](
        input_ids=_ids() + VOCAB),
     cbx.ForwardLookupError, r"input_ids holds values .*vocabulary has 50 entries.*own forward"),
    ("fold: a plain model", lambda k: lambda: cbx.fold(k["mlp"]), cbx.NotTransformedError,
     r"fold\(\) needs a transformed module, got Sequential"),
    ("folded call: float input_ids", lambda k: lambda: k["fm"](
        input_ids=_ids().float(), attention_mask=k["kw"]["attention_mask"]),
     cbx.ForwardInputError, r"FoldedModel: input_ids has dtype torch\.float32"),
    ("folded call: sequence beyond the model's positions", lambda k: lambda: k["fm"](
        **{**k["kw"], "input_ids": _ids(3, 20),
           "attention_mask": torch.ones(3, 20, dtype=torch.long)}),
     cbx.ForwardInputError, r"accepts at most 16 positions"),
    # adapter files
    ("save_adapter: path of a wrong type", lambda k: lambda: cbx.save_adapter(k["tmm"], 3),
     cbx.SpecTypeError, r"save_adapter\(\) needs a file path"),
    ("save_adapter: missing directory", lambda k: lambda: cbx.save_adapter(
        k["tmm"], k["dir"] / "no" / "a.safetensors"), cbx.FileWriteError, r"does not exist"),
    ("load_adapter: missing file", lambda k: lambda: cbx.load_adapter(
        k["mlp"], k["dir"] / "missing.safetensors", (X,)), cbx.AdapterFileNotFoundError,
     r"missing\.safetensors"),
    ("load_adapter: damaged file", lambda k: lambda: cbx.load_adapter(
        k["mlp"], k["dir"] / "junk.safetensors", (X,)), cbx.AdapterFileError,
     r"junk\.safetensors"),
    ("load_adapter: another model", lambda k: lambda: cbx.load_adapter(
        k["bert"], k["dir"] / "mlp.safetensors", example_kwargs=k["kw"]),
     cbx.AdapterFileError, r"saved for another model"),
    ("load_adapter: path of a wrong type", lambda k: lambda: cbx.load_adapter(
        k["mlp"], 3, (X,)), cbx.SpecTypeError, r"needs a file path"),
    # ONNX
    ("export_onnx: not a module", lambda k: lambda: cbx.export_onnx(
        None, k["dir"] / "a.onnx", (X,)), cbx.CapaBoostError, r"NoneType"),
    ("export_onnx: example the module refuses", lambda k: lambda: cbx.export_onnx(
        cbx.fold(k["tmm"]), k["dir"] / "b.onnx", (torch.randn(4, 9),)), cbx.InputError,
     r"input has shape \(4, 9\)"),
]


@pytest.mark.parametrize("name,make,cls,text", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_call_raises_a_library_error_naming_the_culprit(
        kit: dict, name: str, make: Callable, cls: type, text: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(cbx.CapaBoostError) as info:
            make(kit)()
    err = info.value
    assert isinstance(err, cls), f"{name}: {type(err).__name__}: {err}"
    msg = str(err)
    assert re.search(text, msg, re.S), f"{name}: {msg}"
    assert not re.search(r"\bs\d+\b|VR\[|int_oo", msg.split("torch's error")[0]), msg


def test_call_errors_keep_the_builtin_family_and_the_cause(kit: dict) -> None:
    with pytest.raises(RuntimeError) as info:  # torch raised a RuntimeError: still one
        kit["tm"](**{**kit["kw"], "input_ids": _ids().float()})
    assert isinstance(info.value, cbx.InputError)
    assert "Expected tensor for argument #1 'indices'" in str(info.value.__cause__)
    with pytest.raises(ValueError) as info:  # the model's own ValueError: still one
        kit["eager"](torch.randn(6, 8))
    assert isinstance(info.value, cbx.ForwardError)
    assert str(info.value.__cause__) == "Picky takes at most 4 rows"
    with pytest.raises(IndexError) as info:  # embedding index out of range: still IndexError
        kit["tm"](**{**kit["kw"], "input_ids": _ids() + VOCAB})
    assert isinstance(info.value, cbx.ForwardLookupError) and "input_ids" in str(info.value)


def test_the_inputs_that_fit_still_run(kit: dict) -> None:
    out = kit["tm"](**kit["kw"])
    assert out.logits.shape == (3, 3)
    assert kit["fm"](**{**kit["kw"], "input_ids": _ids(5, 16),
                        "attention_mask": torch.ones(5, 16, dtype=torch.long),
                        "labels": torch.tensor([0, 1, 2, 0, 1])}).logits.shape == (5, 3)


def test_out_of_memory_is_not_wrapped(kit: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training loops catch it to shrink the batch: it passes through as torch raised it."""
    variant = kit["tmm"].executor.variants[0]

    def oom(*a: object, **k: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(variant, "run", oom)
    with pytest.raises(torch.OutOfMemoryError):
        kit["tmm"](X)


def test_spec_patterns_that_match_are_accepted(tmp_path: Path) -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    spec = cbx.Spec(targets=["*"], exclude=["2"], overrides={"0": {"rank": 1}})
    for capture in ("graph", "eager"):
        ck = ["0"] if capture == "graph" else None
        tm = cbx.transform(mlp, spec, (X,), capture=capture, checkpoint=ck)
        assert list(cbx.adapters(tm)) == ["0"] and cbx.adapters(tm)["0"].rank == 1


def test_override_naming_a_candidate_that_is_not_a_target_says_so() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    spec = cbx.Spec(targets=["0"], overrides={"2": {"rank": 1}})
    with pytest.raises(cbx.TargetNotFoundError, match=r"It matches '2', which is not a target "
                                                      r"\(not matched by targets\)"):
        cbx.transform(mlp, spec, (X,))


def test_inputs_that_disagree_with_each_other_blame_the_batch_not_the_capture() -> None:
    """A causal LM's labels of another length than its input_ids: the graph's guard relates
    the two inputs, so the message says the batch is wrong (not "re-run transform")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32,
        use_cache=False))
    ids = _ids(2, 12)
    tm = cbx.transform(model, cbx.Spec(targets=["*.q_proj"], rank=2),
                       example_kwargs={"input_ids": ids, "labels": ids})
    with pytest.raises(cbx.InputError) as info:
        tm(input_ids=ids, labels=ids[:, :5])
    msg = str(info.value)
    assert re.search(r"this call's input_ids and labels do not fit together", msg), msg
    assert "labels: int64 (2, 5)" in msg and "Re-run transform" not in msg
