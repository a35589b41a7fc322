"""Sequential (Pfeiffer) CapaBoost adapters: method='sadapter'.

Reference written independently: d separate masked copies of a bottleneck after the op's
output, y + s·Σᵢ[(B⊙Nᵢ) act((A⊙Mᵢ) y + b_d) + b_u], in float64."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import capaboost_fx as cbx


class Net(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16, bias=bias)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _reference(model: Net, a: cbx.CapaBoostAdapter, x: torch.Tensor, act) -> torch.Tensor:
    y = model.fc1(x)
    update = torch.zeros_like(y)
    for i in range(a.num_masks):
        down = (a.A * a.mask_A[i]).double()
        up = (a.B * a.mask_B[i]).double()
        update = update + act(y @ down.T + a.bias_down.double()) @ up.T + a.bias_up.double()
    return model.fc2(torch.tanh(y + a.scaling * update))


def _nonzero(tm) -> cbx.CapaBoostAdapter:
    (a,) = cbx.adapters(tm).values()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.3)
    return a


@pytest.mark.parametrize("activation,act", [("identity", lambda t: t), ("relu", torch.relu)])
def test_matches_d_masked_copies_and_folds_exactly(activation, act, tmp_path) -> None:
    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(5, 12, dtype=torch.float64)
    spec = cbx.Spec(targets=["fc1"], method="sadapter", rank=4, num_masks=3, density=0.5,
                    activation=activation)
    tm = cbx.transform(model, spec, example_inputs=(x,))
    torch.testing.assert_close(tm.eval()(x), model(x), rtol=0, atol=1e-12)  # B = 0, b = 0
    a = _nonzero(tm)
    assert a.sequential and a.in_features == a.out_features == 16
    with torch.no_grad():
        out = tm(x)
        torch.testing.assert_close(out, _reference(model, a, x, act), rtol=1e-10, atol=1e-10)
        assert (out - model(x)).abs().max() > 1e-3
        deploy = cbx.fold(tm)
        torch.testing.assert_close(deploy(x), out, rtol=1e-10, atol=1e-10)
    if activation == "identity":  # folds into fc1's weight and bias: the base architecture
        assert not hasattr(deploy, "capaboost_dense")
        merged = cbx.merged_state_dict(tm)
        eager = Net().double()
        eager.load_state_dict(merged)
        torch.testing.assert_close(eager.eval()(x), out, rtol=1e-10, atol=1e-10)
    else:
        assert len(deploy.capaboost_dense) == 1
        with pytest.raises(cbx.FoldError, match="dense"):
            cbx.merged_state_dict(tm)
    # Accounting: A, B and the two biases are trainable; biases are never masked.
    row = cbx.inspect(model, spec, (x,)).targets[0]
    assert row["trainable_params"] == 4 * 16 + 16 * 4 + 4 + 16
    assert row["live_params"] == a.num_live() < row["trainable_params"]
    # Adapter file round trip keeps the biases.
    path = tmp_path / "seq.safetensors"
    cbx.save_adapter(tm, path)
    loaded = cbx.load_adapter(model, path, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), out, rtol=1e-12, atol=1e-12)


def test_op_without_bias_keeps_a_dense_adapter_and_trains() -> None:
    torch.manual_seed(0)
    model = Net(bias=False)
    x = torch.randn(6, 12)
    tm = cbx.transform(model, cbx.Spec(targets=["fc1"], method="sadapter", rank=2),
                       example_inputs=(x,))
    _nonzero(tm)
    tm.train()
    tm(x).sum().backward()
    a = next(iter(cbx.adapters(tm).values()))
    assert a.bias_up.grad is not None and a.A.grad is not None
    tm.eval()
    with torch.no_grad():
        torch.testing.assert_close(cbx.fold(tm)(x), tm(x), rtol=1e-5, atol=1e-6)


def test_official_init_and_onnx_export(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 12)
    tm = cbx.transform(model, cbx.Spec(targets=["fc1"], method="sadapter", rank=4,
                                       init="official"), example_inputs=(x,))
    a = next(iter(cbx.adapters(tm).values()))
    assert 0.01 < a.B.std() < 0.03 and 0.01 < a.A.std() < 0.03  # N(0, 0.02), up not zeroed
    deploy = cbx.fold(tm)
    cbx.export_onnx(deploy, tmp_path / "seq.onnx", example_inputs=(x,))  # verified inside
    base = tmp_path / "base.onnx"
    cbx.export_onnx(model, base, example_inputs=(x,))
    # Identity sequential adapter after a biased op: folded into fc1, the base graph again.
    assert cbx.compare_onnx(base, tmp_path / "seq.onnx", latency=False).same_graph


# ----------------------------------------------------------------------------- module outputs


def _hook_reference(model: nn.Module, adapters: dict, call) -> torch.Tensor:
    """Eager reference: a forward hook on each named module adds the d masked bottleneck
    copies to its output (float64), written without the graph passes."""
    import copy

    ref = copy.deepcopy(model).double()
    for a in adapters.values():
        def hook(_m, _inp, y, a=a):
            update = torch.zeros_like(y)
            for i in range(a.num_masks):
                down = (a.A * a.mask_A[i]).double()
                up = (a.B * a.mask_B[i]).double()
                update = update + torch.relu(y @ down.T + a.bias_down.double()) @ up.T \
                    + a.bias_up.double()
            return y + a.scaling * update
        ref.get_submodule(a.output_of).register_forward_hook(hook)
    return call(ref)


def _nonzero_all(tm) -> dict:
    torch.manual_seed(2)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            for p in a.parameters():
                p.normal_(0, 0.2)
    return cbx.adapters(tm)


@pytest.mark.parametrize("family,pattern,width", [
    ("llama", "model.layers.*.mlp", 32),       # LlamaMLP: its output is down_proj's
    ("bert", r"re:.*layer\.\d+\.output", 32),  # BertOutput: LayerNorm(dense + residual)
])
def test_after_a_module_output_matches_eager_hooks(family, pattern, width, tmp_path) -> None:
    from models import CASES

    case = next(c for c in CASES if c.name == family)
    torch.manual_seed(0)
    model = case.build().double().eval()
    args, kwargs = case.inputs(3, 7)
    spec = cbx.Spec(targets=[pattern], method="sadapter", rank=4, num_masks=2, density=0.5,
                    activation="relu")
    tm = cbx.transform(model, spec, args, kwargs).eval()
    adapters = _nonzero_all(tm)
    assert len(adapters) == 2 and all(a.output_of and a.weight_fqn is None
                                      for a in adapters.values())
    assert all(a.in_features == a.out_features == width for a in adapters.values())
    with torch.no_grad():
        got = _first(tm(*args, **kwargs))
        want = _first(_hook_reference(model, adapters, lambda m: m(*args, **kwargs)))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert (got - _first(model(*args, **kwargs))).abs().max() > 1e-3
        # Another shape (a new variant is captured) and the fold (one dense adapter each).
        args2, kwargs2 = case.inputs(5, 11)
        torch.testing.assert_close(
            _first(tm(*args2, **kwargs2)),
            _first(_hook_reference(model, adapters, lambda m: m(*args2, **kwargs2))),
            rtol=1e-9, atol=1e-9)
        deploy = cbx.fold(tm)
        assert len(deploy.capaboost_dense) == 2
        torch.testing.assert_close(_first(deploy(*args, **kwargs)), got, rtol=1e-9, atol=1e-9)
    # Trains: gradients reach every adapter parameter, none the base.
    tm.train()
    _first(tm(*args, **kwargs)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for a in adapters.values() for p in a.parameters())
    assert all(p.grad is None for p in model.parameters())
    # inspect accounts for them; the adapter file round-trips.
    rows = cbx.inspect(model, spec, args, kwargs).targets
    assert [r["ops"] for r in rows] == [["module output"]] * 2
    assert sum(r["trainable_params"] for r in rows) == sum(
        a.num_trainable() for a in adapters.values())
    path = tmp_path / "mod.safetensors"
    cbx.save_adapter(tm, path)
    loaded = cbx.load_adapter(model, path, args, kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(loaded(*args, **kwargs)), got, rtol=1e-12, atol=1e-12)


def _first(out):
    from models import first_tensor

    return first_tensor(out)


@pytest.mark.parametrize("inner", ["fc1", "fc2"])  # fc2's output is the block's output
def test_module_output_and_op_inside_it_compose_in_order(inner, tmp_path) -> None:
    """An adapter on an op's output and one on the whole block's output: the block's adapter
    sees the op's adapted output flowing through the rest of the block."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    class Net2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.head = Block(), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.block(x) + x)

    torch.manual_seed(0)
    model = Net2().double().eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    spec = cbx.Spec(targets=["block", f"block.{inner}"], method="sadapter", rank=2,
                    activation="relu")
    tm = cbx.transform(model, spec, (x,)).eval()
    ad = _nonzero_all(tm)
    assert set(ad) == {"block", f"block.{inner}"} and ad["block"].output_of == "block"

    def bottleneck(a, y):
        return y + a.scaling * sum(
            torch.relu(y @ (a.A * a.mask_A[i]).double().T + a.bias_down.double())
            @ (a.B * a.mask_B[i]).double().T + a.bias_up.double() for i in range(a.num_masks))
    with torch.no_grad():
        a = ad[f"block.{inner}"]
        h = model.block.fc1(x)
        h = bottleneck(a, h) if inner == "fc1" else h
        y = model.block.fc2(torch.tanh(h))
        y = bottleneck(a, y) if inner == "fc2" else y
        want = model.head(bottleneck(ad["block"], y) + x)
        torch.testing.assert_close(tm(x), want, rtol=1e-10, atol=1e-10)
        deploy = cbx.fold(tm)
        torch.testing.assert_close(deploy(x), want, rtol=1e-10, atol=1e-10)
    if importlib.util.find_spec("onnxruntime") is not None:  # exported, verified inside
        report = cbx.export_onnx(deploy.float(), tmp_path / "nested.onnx",
                                 example_inputs=(x.float(),))
        assert report.verified and report.op_histogram.get("Relu") == 2  # two dense adapters


def test_module_targets_need_sadapter_and_a_single_output() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            y = self.fc(x)
            return y, y * 2

    class Net3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair, self.out = Pair(), nn.Linear(6, 2)

        def forward(self, x):
            a, b = self.pair(x)
            return self.out(a + b)

    x = torch.randn(3, 6)
    with pytest.raises(cbx.TargetNotFoundError, match="sadapter"):
        cbx.transform(Net3(), cbx.Spec(targets=["pair"]), (x,))
    with pytest.raises(cbx.TargetError, match="2 tensors"):
        cbx.transform(Net3(), cbx.Spec(targets=["pair"], method="sadapter"), (x,))

    class Twice(nn.Module):  # blk(blk(x)): one tensor leaves, but from the second call
        def __init__(self) -> None:
            super().__init__()
            self.blk = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.blk(self.blk(x)))

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Twice()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(cbx.TargetError, match="called 2 times"):
        cbx.transform(Holder(), cbx.Spec(targets=["inner.blk"], method="sadapter"), (x,))
