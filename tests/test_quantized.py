"""A quantized frozen base (QLoRA-style): torchao NF4 and int8 weight-only weights. The adapters
train in float32 on top (eager path, chosen automatically), the update equals an independent
reference, fold merges into a dense weight (error measured), files and PEFT export work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import qwen2_moe_config
from torch import nn

import capaboost_fx as cbx


def nf4(w: torch.Tensor) -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4(w)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(256, 256)
        self.down = nn.Linear(256, 64, bias=False)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.down(F.gelu(self.up(x)))))


def quantize_nf4(net: Net) -> Net:
    for m in (net.up, net.down):
        m.weight = nn.Parameter(nf4(m.weight.detach().clone()), requires_grad=False)
    return net


def quantize_int8(net: Net) -> Net:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(net, Int8WeightOnlyConfig(), filter_fn=lambda m, n: n in ("up", "down"))
    return net


def _bnb_linear(m: nn.Linear, bits: int) -> nn.Module:
    import bitsandbytes as bnb

    if bits == 4:
        q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(m.weight.detach().clone(), requires_grad=False,
                                     quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(m.weight.detach().clone(), requires_grad=False,
                                     has_fp16_weights=False)
    if m.bias is not None:
        q.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")  # bitsandbytes quantizes when the module moves to its device


def quantize_bnb4(net: Net) -> Net:
    net.up, net.down = _bnb_linear(net.up, 4), _bnb_linear(net.down, 4)
    return net


def quantize_bnb8(net: Net) -> Net:
    net.up, net.down = _bnb_linear(net.up, 8), _bnb_linear(net.down, 8)
    return net


def _bnb_runs() -> bool:
    try:
        quantize_bnb4(Net())(torch.randn(2, 256))
        return True
    except Exception:  # noqa: BLE001 - no bitsandbytes, or no CPU kernels for it here
        return False


QUANTIZERS = {"nf4": quantize_nf4, "int8": quantize_int8}
if _bnb_runs():  # bitsandbytes >= 0.49 runs on this machine's CPU (checked, see README)
    QUANTIZERS.update(bnb4=quantize_bnb4, bnb8=quantize_bnb8)
SPEC = cbx.Spec(targets=["up", "down"], rank=4, num_masks=2, density=0.5, seed=7)


def _reference_delta(a, x: torch.Tensor) -> torch.Tensor:
    """s · Σ_i (B ⊙ M^B_i)(A ⊙ M^A_i) x, one copy at a time (not the library's factors())."""
    out = 0
    for i in range(a.num_masks):
        out = out + x @ (a.A * a.mask_A[i]).T @ (a.B * a.mask_B[i]).T
    return a.scaling * out


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_quantized_base_trains_adapters_and_folds(kind) -> None:
    base = QUANTIZERS[kind](Net())
    raw = {n: type(p).__name__ for n, p in base.named_parameters()}
    assert raw["up.weight"] != "Parameter"  # really quantized
    x = torch.randn(8, 256)
    with _no_warning():  # the eager path is chosen, not warned about
        tm = cbx.transform(base, SPEC, (x,))
    assert tm.capture_info.capture == "eager" and "quantized" in tm.capture_info.eager_reason
    a_up, a_down = cbx.adapters(tm)["up"], cbx.adapters(tm)["down"]
    assert a_up.A.dtype == torch.float32 and a_up.A.requires_grad
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in (a_up, a_down):
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.1)
    # training reaches the adapters only; the quantized base stays as it was (trained before
    # any eval call: bitsandbytes 0.50 on CPU repacks a 4-bit weight for inference on its
    # first no-grad eval call, after which its backward fails)
    tm.train()
    tm(x).square().mean().backward()
    assert a_up.A.grad is not None and a_down.B.grad is not None
    assert {n: type(p).__name__ for n, p in base.named_parameters()} == raw
    # the adapted layer equals the quantized layer's own output + the reference delta
    tm.eval()
    with torch.no_grad():
        y_base = base.eval()(x)
        up_base = base.up(x)  # the quantized module's own output
    h = {}
    handle = tm.wrapped.up.register_forward_hook(lambda m, i, o: h.update(up=o))
    with torch.no_grad():
        y = tm(x)
    handle.remove()
    torch.testing.assert_close(h["up"], up_base + _reference_delta(a_up, x),
                               rtol=1e-5, atol=1e-5)
    assert (y - y_base).abs().max() > 1e-3  # the adapters act
    # fold: a dense merged weight; the error against the unfolded module is measured here.
    # bitsandbytes' CPU kernels are not exact in the input: 4-bit computes eval calls in bf16
    # (its weight repacked with bf16 scales), 8-bit casts inputs to fp16 and quantizes them,
    # so their unfolded outputs are accurate to ~1e-3 and the dense fold differs by that
    tm.eval()
    folded = cbx.fold(tm)
    assert type(folded.wrapped.up) is nn.Linear
    assert type(folded.wrapped.up.weight) is nn.Parameter
    with torch.no_grad():
        err = (folded(x) - tm(x)).abs().max().item()
        scale = tm(x).abs().max().item()
    assert err < (2e-2 if kind.startswith("bnb") else 1e-4) * max(scale, 1.0), (err, scale)


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", cbx.CapaBoostWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_quantized_base_adapter_files_and_peft_export(kind, tmp_path) -> None:
    base = QUANTIZERS[kind](Net())
    x = torch.randn(4, 256)
    tm = cbx.transform(base, SPEC, (x,))
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.1)
    tm.eval()
    cbx.save_adapter(tm, tmp_path / "a.safetensors")
    header = cbx.read_header(tmp_path / "a.safetensors")
    assert header["targets"]["up"]["weight_shape"] == [256, 256]  # logical, not packed
    back = cbx.load_adapter(QUANTIZERS[kind](Net()), tmp_path / "a.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), tm(x))
    # the same adapter loads onto the float model it was quantized from (to merge in fp32)
    fp = cbx.load_adapter(Net(), tmp_path / "a.safetensors", (x,))
    assert fp.executor.kind == "graph"
    out = cbx.to_peft_lora(tm, tmp_path / "peft")
    assert (out / "adapter_model.safetensors").is_file()


def test_capture_graph_on_a_quantized_base_says_what_to_do() -> None:
    base = quantize_nf4(Net())
    with pytest.raises(cbx.CaptureError, match="capture='auto'"):
        cbx.transform(base, SPEC, (torch.randn(4, 256),), capture="graph")


def test_inspect_lists_the_linear_modules_of_a_quantized_base() -> None:
    report = cbx.inspect(quantize_nf4(Net()), SPEC)
    assert sorted(t["name"] for t in report.targets) == ["down", "up"]
    assert [s["name"] for s in report.skipped] == ["head"]
    up = next(t for t in report.targets if t["name"] == "up")
    assert up["in_features"] == up["out_features"] == 256 and up["trainable_params"] == 2048


def test_fold_requantizes_on_request_with_the_error_measured() -> None:
    """dequantize + ΔW, then NF4 again: the folded layer is quantized like the base, and its
    error against the unfolded module is the quantization error's size, not more."""
    base = quantize_nf4(Net())
    x = torch.randn(8, 256)
    tm = cbx.transform(base, SPEC, (x,))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.1)
    tm.eval()

    def renf4(linear: nn.Linear) -> nn.Linear:
        linear.weight = nn.Parameter(nf4(linear.weight.detach()), requires_grad=False)
        return linear

    dense, again = cbx.fold(tm), cbx.fold(tm, requantize=renf4)
    assert dense.fold_info == {"dequantized": ["down", "up"], "requantized": []}
    assert again.fold_info["requantized"] == ["down", "up"]
    assert type(again.wrapped.up.weight).__name__ == "NF4Tensor"
    with torch.no_grad():
        y = tm(x)
        err_dense = (dense(x) - y).abs().max().item()
        err_again = (again(x) - y).abs().max().item()
        err_base = (Net()(x) - base(x)).abs().max().item()  # NF4's own error on this net
    assert err_dense < 1e-4
    assert 0 < err_again < 4 * err_base, (err_again, err_base)
    with pytest.raises(cbx.FoldError, match="requantize"):
        cbx.fold(cbx.transform(Net(), SPEC, (x,)), requantize=renf4)


def test_quantized_moe_trains_its_experts() -> None:
    """A QLoRA-style MoE: NF4 attention weights (128 × 128: NF4's block sizes) send transform to the eager path on its own,
    where the experts' stacked weights are targets too (tests/test_uncapturable.py checks their
    algebra); they train and fold into dense stacked weights."""
    import transformers

    cfg = qwen2_moe_config(hidden_size=128, num_hidden_layers=1, num_key_value_heads=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for name in ("q_proj", "k_proj"):
        lin = getattr(model.model.layers[0].self_attn, name)
        lin.weight = nn.Parameter(nf4(lin.weight.detach().clone()), requires_grad=False)
    ids = torch.randint(0, 64, (2, 8))
    spec = cbx.Spec(targets=["*.experts.gate_up_proj", "*.experts.down_proj", "*.q_proj"],
                    rank=2)
    tm = cbx.transform(model, spec, example_inputs=(ids,))
    assert tm.capture_info.capture == "eager" and "quantized" in tm.capture_info.eager_reason
    assert len(cbx.adapters(tm)) == 3
    opt = torch.optim.SGD([p for p in tm.parameters() if p.requires_grad], lr=0.5)
    tm.train()
    for _ in range(2):
        tm(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    expert = cbx.adapters(tm)["model.layers.0.mlp.experts.gate_up_proj"]
    assert float(expert.B.detach().abs().sum()) > 0  # trained
    tm.eval()
    folded = cbx.fold(tm)
    with torch.no_grad():
        y = tm(ids).logits
        assert (y - model(ids).logits).abs().max() > 1e-4
        torch.testing.assert_close(folded(ids).logits, y, rtol=1e-3, atol=1e-3)
    w = folded.wrapped.model.layers[0].mlp.experts.gate_up_proj
    torch.testing.assert_close(w, model.model.layers[0].mlp.experts.gate_up_proj
                               + expert.delta_weight().to(w.dtype))
