"""transform -> train -> fold on every model family, against independent references."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from models import CASE_IDS, CASES, Case, first_tensor, to_dtype
from torch import nn

import capaboost_fx as cbx

torch.set_num_threads(2)


def _weight(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter a target name stands for, looked up on the plain model."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_submodule(name).weight


def reference_model(model: nn.Module, tm: cbx.CapaBoostModel, case: Case) -> nn.Module:
    """The original model with W0 + s * sum_i (B*M^B_i)(A*M^A_i), computed as d products."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, a in cbx.adapters(tm).items():
            delta = torch.zeros(a.B.shape[0], a.A.shape[1], dtype=torch.float64)
            for i in range(a.mask_A.shape[0]):
                delta += (a.B.double() * a.mask_B[i]) @ (a.A.double() * a.mask_A[i])
            delta *= a.scaling
            w = _weight(ref, name)
            w += (delta.T if case.layouts.get(name) == "in_out" else delta).to(w.dtype)
    return ref


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _op_histogram(graph: torch.fx.Graph) -> Counter:
    return Counter(str(n.target) for n in graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload))


def _export_base(model: nn.Module, inputs: tuple[tuple, dict]) -> torch.fx.Graph:
    """The untouched model captured directly, batch and sequence dims dynamic."""
    auto = torch.export.Dim.AUTO
    args, kwargs = inputs
    model = copy.deepcopy(model)
    if hasattr(model, "config"):
        model.config.use_cache = False
    ds_args = tuple({0: auto, 1: auto} for _ in args)
    ds_kwargs = {k: {0: auto, 1: auto} for k in kwargs}
    ds = (*ds_args, ds_kwargs) if kwargs else ds_args
    if kwargs and not args:
        ds = ds_kwargs
    return torch.export.export(model, args, kwargs, dynamic_shapes=ds, strict=False).module().graph


def _call(m: nn.Module, inputs: tuple[tuple, dict]):
    args, kwargs = inputs
    return m(*args, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_lifecycle(case: Case) -> None:
    torch.manual_seed(0)
    model = case.build().double().eval()
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    example = to_dtype(case.inputs(*case.example), torch.float64)
    other = to_dtype(case.inputs(*case.other), torch.float64)

    tm = cbx.transform(model, case.spec, *example)
    assert isinstance(tm, cbx.CapaBoostModel)
    names = set(cbx.adapters(tm))
    # Independent oracle: fnmatch globs over the model's own module names.
    import fnmatch

    weights = {(f.rpartition(".")[0] if f.endswith(".weight") else
                ("" if f == "weight" else f)) for f, p in model.named_parameters() if p.dim() == 2}
    expected = {n for n in weights if any(fnmatch.fnmatchcase(n, p) for p in case.spec.targets)
                and not any(fnmatch.fnmatchcase(n, p) for p in case.spec.exclude)}
    assert names and names == expected

    # Only adapters and spec.trainable require grad.
    adapter_params = {id(p) for a in cbx.adapters(tm).values() for p in a.parameters()}
    for n, p in tm.named_parameters():
        expect = id(p) in adapter_params or any(
            n.startswith(f"wrapped.{t}.") or n == f"wrapped.{t}" for t in case.spec.trainable)
        assert p.requires_grad == expect, n

    # Step 0: B = 0, so the output equals the original's, at a shape other than the example's.
    tm.eval()
    out0 = _call(tm, other)
    assert type(out0) is type(_call(model, other))
    torch.testing.assert_close(first_tensor(out0), first_tensor(_call(model, other)),
                               rtol=0, atol=1e-12)

    # Non-zero adapters: equal to the independent reference, different from the base.
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.A.normal_(0, 0.3)
            a.B.normal_(0, 0.3)
    ref = reference_model(model, tm, case).eval()
    out = first_tensor(_call(tm, other))
    torch.testing.assert_close(out, first_tensor(_call(ref, other)), rtol=1e-9, atol=1e-10)
    assert (out - first_tensor(_call(model, other))).abs().max() > 1e-3

    # Fold: same outputs, no adapter state, base architecture and parameter count.
    deploy = cbx.fold(tm)
    torch.testing.assert_close(first_tensor(_call(deploy, other)), out, rtol=1e-9, atol=1e-10)
    assert not any(isinstance(m, cbx.CapaBoostAdapter) for m in deploy.modules())
    assert not any("mask" in n for n, _ in deploy.named_buffers())
    assert sum(p.numel() for p in deploy.parameters()) == sum(
        p.numel() for p in model.parameters())
    base_graph = _export_base(model, example)
    assert _op_histogram(deploy.graph) == _op_histogram(base_graph)
    assert len(deploy.graph.find_nodes(op="get_attr")) == len(base_graph.find_nodes(op="get_attr"))
    # merged_state_dict loads into the eager model and gives the same outputs.
    eager = copy.deepcopy(model)
    eager.load_state_dict(cbx.merged_state_dict(tm))
    torch.testing.assert_close(first_tensor(_call(eager, other)), out, rtol=1e-9, atol=1e-10)

    # Training on batches shaped unlike the example changes only trainable parameters and
    # lowers the loss on a fixed batch.
    frozen = {n: p.detach().clone() for n, p in tm.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in tm.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in tm.parameters() if p.requires_grad], lr=3e-3)
    batches = [other, to_dtype(case.inputs(2, case.other[1] - 2 if case.name != "vit" else 3),
                               torch.float64)]
    with torch.no_grad():
        loss_before = case.loss(_call(tm.eval(), other)).item()
    tm.train()
    for step in range(8):
        opt.zero_grad()
        case.loss(_call(tm, batches[step % 2])).backward()
        opt.step()
    tm.eval()
    with torch.no_grad():
        loss_after = case.loss(_call(tm, other)).item()
    assert loss_after < loss_before
    for n, p in tm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, trained[n]) for n, p in tm.named_parameters() if n in trained)

    # The fold after training still matches, and the caller's model was never touched.
    torch.testing.assert_close(first_tensor(_call(cbx.fold(tm), other)),
                               first_tensor(_call(tm, other)), rtol=1e-9, atol=1e-10)
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("bert", "llama", "mlp")],
                         ids=lambda c: c.name)
def test_float32_fold_tolerance(case: Case) -> None:
    """In float32 the fold rounds W0 + ΔW once; outputs agree to float32 precision."""
    torch.manual_seed(1)
    model = case.build().eval()
    tm = cbx.transform(model, case.spec, *case.inputs(*case.example)).eval()
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.1)
    other = case.inputs(*case.other)
    torch.testing.assert_close(first_tensor(_call(cbx.fold(tm), other)),
                               first_tensor(_call(tm, other)), rtol=1e-4, atol=1e-5)


def test_caller_requires_grad_untouched() -> None:
    model = CASES[0].build()
    model[0].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cbx.transform(model, CASES[0].spec, *CASES[0].inputs(3, 7))
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training  # mode untouched too


class StoresOnSelf(torch.nn.Module):
    """Keeps a size and a tensor on itself in forward (as Funnel does): capture must not
    leave symbolic sizes or fake tensors behind on the twin that fold later copies."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seq_len = x.size(1)
        self.last_mean = x.mean()
        return self.out(torch.relu(self.fc(x))).sum(1) / self.seq_len


def test_fold_a_model_that_stores_sizes_and_tensors_on_self() -> None:
    import capaboost_fx as cbx

    model = StoresOnSelf()
    x = torch.randn(3, 5, 8)
    tm = cbx.transform(model, cbx.Spec(targets=["fc"], rank=2), (x,))
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_()
    tm.eval()
    folded = cbx.fold(tm)
    state = cbx.merged_state_dict(tm)
    y = torch.randn(4, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(y), tm(y))
        assert (tm(y) - model(y)).abs().max() > 1e-4
    assert "seq_len" not in vars(model) or model.seq_len == 7  # only eager calls store it
    assert set(state) == set(model.state_dict())


class FixesItsSequence(torch.nn.Module):
    """Reads the sequence length as a Python int (as Funnel and Mamba do): export fixes it."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(1, 32, 8))
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[1])
        return self.fc(x + self.pos[:, :n]).mean(1)


def test_a_dim_the_model_fixes_gets_a_graph_per_size() -> None:
    import warnings

    import capaboost_fx as cbx

    model = FixesItsSequence()
    with pytest.warns(UserWarning, match=r"shape\[1\] == 5.*model's own code fixes"):
        tm = cbx.transform(model, cbx.Spec(targets=["fc"], rank=2), (torch.randn(3, 5, 8),))
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_()
    tm.eval()
    x = torch.randn(4, 9, 8)
    with pytest.warns(cbx.CapaBoostWarning, match="captured for it"):
        y = tm(x)
    ref = model(x) + 0  # the eager model plus the adapter, computed independently
    a = cbx.adapters(tm)["fc"]
    h = x + model.pos[:, :9]
    delta = sum(h @ (a.A * a.mask_A[i]).T @ (a.B * a.mask_B[i]).T for i in range(a.num_masks))
    torch.testing.assert_close(y, ref + (a.scaling * delta).mean(1), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same size again: no capture, no warning
        tm(torch.randn(2, 9, 8))
    sizes = [c["fixed_sizes"] for c in tm.capture_info.later_captures]
    assert {"x.shape[1]": 9} in sizes
    folded = cbx.fold(tm)
    with torch.no_grad():
        torch.testing.assert_close(folded(torch.randn(2, 11, 8)).shape, torch.Size([2, 8]))
    tm.executor.MAX_SHAPES = 3
    with pytest.raises(cbx.InputError, match="pad or bucket"):
        for n in (12, 13, 14, 15):
            tm(torch.randn(2, n, 8))


def test_funnel_fixes_its_sequence_and_still_takes_any_length() -> None:
    import transformers

    import capaboost_fx as cbx

    torch.manual_seed(0)
    cfg = transformers.FunnelConfig(vocab_size=64, block_sizes=[1, 1], d_model=32, n_head=4,
                                    d_head=8, d_inner=64, num_labels=2)
    model = transformers.FunnelForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    with pytest.warns(UserWarning, match=r"input_ids.shape\[1\] == 8"):
        tm = cbx.transform(model, cbx.Spec(targets=["*.q_head", "*.v_head"], rank=4),
                           example_kwargs={"input_ids": ids})
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_()
    tm.eval()
    x = torch.randint(0, 64, (3, 12))
    with torch.no_grad(), pytest.warns(UserWarning, match=r"input_ids.shape\[1\]"):
        y = tm(input_ids=x).logits
    folded = cbx.fold(tm)  # the model stores self.seq_len in forward: fold still copies it
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=x).logits, y, rtol=1e-5, atol=1e-5)
        assert (y - model(input_ids=x).logits).abs().max() > 1e-4
