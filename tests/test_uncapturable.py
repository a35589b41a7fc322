"""Models torch.export cannot capture still train (the eager path, chosen automatically with a
warning that names the model's own line): Wav2Vec2 and HuBERT with SpecAugment and LayerDrop
on, LED with its data-dependent chunking. Same adapters, exact fold, ONNX where the model
itself exports."""

from __future__ import annotations

import pytest
import torch
import transformers
from models import qwen2_moe_config

import capaboost_fx as cbx

SPEECH = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
              num_feat_extract_layers=2, num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4, mask_time_prob=0.5, mask_time_length=2,
              layerdrop=0.5)
SPEECH_CASES = {
    "wav2vec2": lambda: transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**SPEECH)),
    "hubert": lambda: transformers.HubertForCTC(transformers.HubertConfig(**SPEECH)),
}
SPEC = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, num_masks=2, density=0.5)


def _nonzero(tm) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.5)


@pytest.mark.parametrize("name", sorted(SPEECH_CASES))
def test_speech_models_train_with_specaugment_and_layerdrop(name, tmp_path) -> None:
    torch.manual_seed(0)
    model = SPEECH_CASES[name]().train()
    x = torch.randn(2, 800)
    with pytest.warns(cbx.CapaBoostWarning, match="_compute_mask_indices") as record:
        tm = cbx.transform(model, SPEC, (x,))
    assert "capture='graph'" in str(record[0].message)  # how to get the error instead
    assert tm.capture_info.capture == "eager" and "modeling_" in tm.capture_info.eager_reason
    assert len(cbx.adapters(tm)) == 4
    # training-time features on: masked time steps and dropped layers differ call to call
    labels = torch.randint(1, 32, (2, 5))
    tm.train()
    torch.manual_seed(1)
    losses = [tm(x, labels=labels).loss for _ in range(4)]
    assert len({round(float(v), 4) for v in losses}) > 1
    sum(losses).backward()
    assert any(a.A.grad is not None for a in cbx.adapters(tm).values())
    _nonzero(tm)
    tm.eval()
    folded = cbx.fold(tm)
    with torch.no_grad():
        y = tm(x).logits
        torch.testing.assert_close(folded(x).logits, y, rtol=1e-5, atol=1e-5)
        assert (y - model.eval()(x).logits).abs().max() > 1e-3
    report = cbx.export_onnx(folded, tmp_path / f"{name}.onnx", example_inputs=(x,))
    assert report.max_abs_diff < 1e-4


def test_led_trains_folds_and_generates_eagerly() -> None:
    torch.manual_seed(0)
    cfg = transformers.LEDConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
        attention_window=[4, 4])
    model = transformers.LEDForConditionalGeneration(cfg)
    ids, labels = torch.randint(3, 64, (2, 16)), torch.randint(3, 64, (2, 6))
    spec = cbx.Spec(targets=["*.query", "*.value", "*.q_proj", "*.v_proj"], rank=4)
    with pytest.warns(cbx.CapaBoostWarning, match=r"modeling_led\.py:\d+ in _chunk"):
        tm = cbx.transform(model, spec, example_kwargs={"input_ids": ids, "labels": labels})
    assert tm.capture_info.capture == "eager" and len(cbx.adapters(tm)) == 12
    with pytest.raises(cbx.CaptureError, match="in the model's code at modeling_led.py"):
        cbx.transform(model, spec, example_kwargs={"input_ids": ids}, capture="graph")
    tm.train()
    tm(input_ids=ids, labels=labels).loss.backward()
    assert all(a.A.grad is not None for a in cbx.adapters(tm).values())
    _nonzero(tm)
    tm.eval()
    folded = cbx.fold(tm)
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids, labels=labels).logits,
                                   tm(input_ids=ids, labels=labels).logits, rtol=1e-5, atol=1e-5)
    out = tm.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, folded.generate(ids, max_new_tokens=4, do_sample=False))


def test_expert_parameters_as_eager_targets(tmp_path) -> None:
    """MoE expert weights (experts × out × in parameters) on the eager path (a quantized MoE
    goes there): W + ΔW for each call of the experts module, equal to an independent
    per-expert reference and to the graph path's adapters with the same values; training
    reaches them; disable_adapter gives the base; the fold is exact and carries no hook; the
    adapter file round-trips; the caller's model is untouched."""
    cfg = qwen2_moe_config()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 8))
    spec = cbx.Spec(targets=["*.experts.gate_up_proj", "*.experts.down_proj", "*.q_proj"],
                    rank=2, num_masks=2, density=0.5)
    report = cbx.inspect(model, spec, capture="eager")
    names = sorted(t["name"] for t in report.targets)
    assert [n for n in names if "experts" in n] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")]
    tm = cbx.transform(model, spec, capture="eager")
    graph = cbx.transform(model, spec, example_inputs=(ids,), capture="graph")
    assert tm.capture_info.capture == "eager" and graph.capture_info.capture == "graph"
    assert sorted(cbx.adapters(tm)) == names
    _nonzero(tm)
    with torch.no_grad():
        for name, a in cbx.adapters(graph).items():
            a.load_state_dict(cbx.adapters(tm)[name].state_dict())
    expert = cbx.adapters(tm)["model.layers.0.mlp.experts.gate_up_proj"]
    assert expert.groups == 4 and expert.A.shape == (4, 2, 32)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, ad in cbx.adapters(tm).items():
            if ad.groups:  # ΔW[g] = s Σ_i (B_g ⊙ M^B_gi)(A_g ⊙ M^A_gi), from the paper's formula
                ref.get_parameter(name).add_(torch.stack([
                    sum((ad.B[g] * ad.mask_B[g, i]) @ (ad.A[g] * ad.mask_A[g, i])
                        for i in range(ad.num_masks)) for g in range(ad.groups)]) * ad.scaling)
            else:
                ref.get_parameter(f"{name}.weight").add_(sum(
                    (ad.B * ad.mask_B[i]) @ (ad.A * ad.mask_A[i])
                    for i in range(ad.num_masks)) * ad.scaling)
        tm.eval()
        y = tm(ids).logits
        torch.testing.assert_close(y, ref(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graph.eval()(ids).logits, y, rtol=1e-5, atol=1e-5)
        assert (y - model(ids).logits).abs().max() > 1e-3
        with tm.disable_adapter():
            torch.testing.assert_close(tm(ids).logits, model(ids).logits)
        folded = cbx.fold(tm)
        torch.testing.assert_close(folded(ids).logits, y, rtol=1e-5, atol=1e-5)
    hooks = [h for m in folded.modules() for h in (*m._forward_pre_hooks.values(),
                                                   *m._forward_hooks.values())]
    assert not hooks and not any(isinstance(m, cbx.CapaBoostAdapter) for m in folded.modules())
    tm.train()
    tm(ids, labels=ids).loss.backward()
    assert all(a.A.grad is not None and a.A.grad.abs().sum() > 0
               for a in cbx.adapters(tm).values() if a.groups)
    cbx.save_adapter(tm, tmp_path / "experts.safetensors")
    back = cbx.load_adapter(model, tmp_path / "experts.safetensors", capture="eager")
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
