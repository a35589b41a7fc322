"""MoE decoders and a multimodal model to ONNX: ops torch.onnx lacks (the experts' grouped
matmul, LLaVA's input checks) get translations (capaboost_fx.onnx.translations); the folded
MoE graph equals the base model's."""

from __future__ import annotations

import pytest
import torch
import transformers

import capaboost_fx as cbx

MOE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
           num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32, use_cache=False)


def _fold_nonzero(model, spec, **example):
    tm = cbx.transform(model, spec, **example)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.5)
    return tm, cbx.fold(tm)


@pytest.mark.parametrize("family", ["Qwen2Moe", "Mixtral"])
def test_moe_decoder_exports_and_equals_the_base_graph(family, tmp_path) -> None:
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**MOE)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    tm, folded = _fold_nonzero(model, cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4),
                               example_inputs=(ids,))
    with torch.no_grad():
        assert (folded(ids).logits - model(ids).logits).abs().max() > 1e-3
    report = cbx.export_onnx(folded, tmp_path / "folded.onnx", example_inputs=(ids,))
    assert report.max_abs_diff < 1e-4
    if family == "Qwen2Moe":  # one family is enough for the graph comparison (time)
        base = cbx.export_onnx(model, tmp_path / "base.onnx", example_inputs=(ids,))
        assert cbx.compare_onnx(base.path, report.path).same_graph


def test_llava_exports_past_its_input_checks(tmp_path) -> None:
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           image_size=16, patch_size=8, projection_dim=32)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, max_position_embeddings=64,
                                    use_cache=False)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=63,
        vision_feature_layer=-1)).eval()
    ids = torch.randint(0, 60, (2, 10))
    ids[:, 1:5] = 63  # 4 image tokens: (16 / 8)^2 patches
    batch = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16)}
    # No eager warm-up call: the hooks transformers installs on LLaVA's first call are undone
    # with their flag after each capture (tests/test_families.py), so the folded graph and its
    # ONNX export have the same outputs.
    spec = cbx.Spec(targets=["*.language_model.*.q_proj", "*.language_model.*.v_proj"], rank=4)
    with pytest.warns(UserWarning, match=r"pixel_values.shape\[0\] == 2"):
        _, folded = _fold_nonzero(model, spec, example_kwargs=batch)
    report = cbx.export_onnx(folded, tmp_path / "llava.onnx", example_kwargs=batch)
    assert report.max_abs_diff < 1e-4


# mT5 is T5's code (transformers copies it): its export is measured in the compatibility table
# (benchmarks/families.py), not repeated here.
SEQ2SEQ = {
    "t5": ("T5ForConditionalGeneration", "T5Config", ["*.q", "*.v"],
           dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                decoder_start_token_id=0)),
    "bart": ("BartForConditionalGeneration", "BartConfig", ["*.q_proj", "*.v_proj"],
             dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  max_position_embeddings=64)),
    "whisper": ("WhisperForConditionalGeneration", "WhisperConfig", ["*.q_proj", "*.v_proj"],
                dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     num_mel_bins=8, max_source_positions=16, max_target_positions=32,
                     decoder_start_token_id=1, pad_token_id=0)),
}


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_encoder_decoders_export_and_verify(name, tmp_path) -> None:
    """T5, BART, Whisper (their KV cache on by default: exported with use_cache=False)."""
    model_cls, config_cls, targets, cfg = SEQ2SEQ[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(
        vocab_size=64, **cfg)).eval()
    dec = torch.randint(3, 60, (2, 5))
    first = ({"input_features": torch.randn(2, 8, 32)} if name == "whisper"
             else {"input_ids": torch.randint(3, 60, (2, 8))})
    batch = {**first, "decoder_input_ids": dec}
    tm = cbx.transform(model, cbx.Spec(targets=targets, rank=4), example_kwargs=batch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.1)
    folded = cbx.fold(tm)
    with torch.no_grad():
        assert (folded(**batch).logits - model(**batch).logits).abs().max() > 1e-4
    report = cbx.export_onnx(folded, tmp_path / f"{name}.onnx", example_kwargs=batch)
    assert report.max_abs_diff < 1e-4


def test_moe_expert_parameters_as_targets(tmp_path) -> None:
    """Expert weights (experts × out × in, read by the experts' grouped matmul) as targets:
    per-expert A, B and masks; W + ΔW equals an independent per-expert reference; training
    reaches them; fold is exact; files round-trip; inspect lists them; ONNX exports."""
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(**MOE)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    spec = cbx.Spec(targets=["*.experts.gate_up_proj", "*.experts.down_proj"], rank=4)
    report = cbx.inspect(model, spec, example_inputs=(ids,))
    names = [t["name"] for t in report.targets]
    assert names == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                     for p in ("gate_up_proj", "down_proj")]
    tm, folded = _fold_nonzero(model, spec, example_inputs=(ids,))
    a = cbx.adapters(tm)[names[0]]
    assert a.groups == 4 and a.A.shape == (4, 4, 32) and a.mask_A.shape == (4, 2, 4, 32)
    ref = transformers.Qwen2MoeForCausalLM(config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, ad in cbx.adapters(tm).items():
            ref.get_parameter(name).add_(torch.stack([
                sum((ad.B[g] * ad.mask_B[g, i]) @ (ad.A[g] * ad.mask_A[g, i])
                    for i in range(ad.num_masks)) for g in range(ad.groups)]) * ad.scaling)
        tm.eval()
        y = tm(ids).logits
        torch.testing.assert_close(y, ref(ids).logits, rtol=1e-5, atol=1e-5)
        assert (y - model(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(folded(ids).logits, y, rtol=1e-6, atol=1e-6)
    tm.train()
    tm(ids, labels=ids).loss.backward()
    assert all(ad.B.grad is not None for ad in cbx.adapters(tm).values())
    cbx.save_adapter(tm, tmp_path / "experts.safetensors")
    back = cbx.load_adapter(model, tmp_path / "experts.safetensors", example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, y)
    out = cbx.export_onnx(folded, tmp_path / "experts.onnx", example_inputs=(ids,))
    assert out.max_abs_diff < 1e-4
