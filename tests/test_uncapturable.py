"""Models torch.export cannot capture still train (the eager path, chosen automatically with a
warning that names the model's own line): Wav2Vec2 and HuBERT with SpecAugment and LayerDrop
on, LED with its data-dependent chunking. Same adapters, exact fold, ONNX where the model
itself exports."""

from __future__ import annotations

import pytest
import torch
import transformers

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
    assert tm.eager and "modeling_" in tm.capture_info.eager_reason
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
    assert tm.eager and len(cbx.adapters(tm)) == 12
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


def test_expert_parameters_on_the_eager_path_say_where_they_are_targets() -> None:
    """MoE expert weights (3-D parameters) are targets on the graph path
    (tests/test_families_onnx.py::test_moe_expert_parameters_as_targets);
    on the eager path the error says so instead of 'matched no linear op'."""
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(cbx.errors.TargetError, match="expert parameters.*graph path only"):
        cbx.transform(model, cbx.Spec(targets=["*.experts.gate_up_proj"], rank=2),
                      example_kwargs={"input_ids": ids}, capture="eager")
