"""Sequential (Pfeiffer) CapaBoost adapters: method='sadapter'.

Reference written independently: d separate masked copies of a bottleneck after the op's
output, y + s·Σᵢ[(B⊙Nᵢ) act((A⊙Mᵢ) y + b_d) + b_u], in float64."""

from __future__ import annotations

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
    pytest.importorskip("onnxruntime")
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
