"""onnxruntime-genai export (capaboost_fx.onnx.genai): a CapaBoost-adapted tiny LLaMA and
Qwen2 (biased q/k/v), merged, built with onnxruntime_genai.models.builder offline, greedy tokens
equal transformers'."""

from __future__ import annotations

import pytest
import torch
import transformers
from models import reference_delta  # noqa: E402

import capaboost_fx as cbx
from capaboost_fx.onnx.genai import export_genai  # noqa: E402


def _tokenizer(folder):
    """A tiny byte-level BPE tokenizer, trained offline and saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world"] * 10
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


# Decoder families the builder supports: (config class, model class, adapter targets).
# Qwen2 has biased q/k/v projections, so the fold into a biased Linear and the builder's
# bias path are exercised as well as LLaMA's bias-free ones.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", ["*.q_proj", "*.v_proj"]),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", ["*.q_proj", "*.k_proj", "*.v_proj"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capaboost_decoder_builds_and_generates_the_same_tokens(tmp_path, family):
    config_name, model_name, targets = FAMILIES[family]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    tok = _tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-zero biases (HF initialises them to zero), so they count
        biases = [m.bias for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and m.bias is not None]
        for b in biases:
            b.copy_(torch.randn(b.shape) * 0.5)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None and biases
    ids = torch.randint(0, len(tok), (2, 8))
    spec = cbx.Spec(targets=targets, rank=4, num_masks=2, density=0.5)
    tm = cbx.transform(model, spec, example_kwargs={"input_ids": ids})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in cbx.adapters(tm).values():
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=gen) * 0.5)
    rep = export_genai(tm, tmp_path / "out", base_model=model, tokenizer_dir=tmp_path / "tok",
                       new_tokens=10)
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= set(rep.files)
    assert rep.verified and rep.tokens_match, rep
    assert len(rep.onnx_tokens) == 10 and rep.prompt_ids == tok("hello world, the quick "
                                                                "brown fox").input_ids
    # It is the adapted model that was built: the base model generates something else.
    with torch.no_grad():
        base = model.generate(torch.tensor([rep.prompt_ids]), do_sample=False,
                              max_new_tokens=10, min_new_tokens=10)[0, len(rep.prompt_ids):]
    assert base.tolist() != rep.onnx_tokens
    # The merged checkpoint holds the fold's weights; the caller's model is untouched.
    merged = model_cls.from_pretrained(rep.checkpoint_dir)
    for target in targets:  # layer 0's adapted projections (and biases, where there are any)
        key = "model.layers.0.self_attn." + target.removeprefix("*.")
        w = merged.get_submodule(key).weight
        delta = reference_delta(cbx.adapters(tm)[key]).to(w.dtype)
        torch.testing.assert_close(w, model.get_submodule(key).weight + delta)
        if model.get_submodule(key).bias is not None:  # the fold leaves biases as they were
            torch.testing.assert_close(merged.get_submodule(key).bias,
                                       model.get_submodule(key).bias)


def test_refuses_a_checkpoint_without_tokenizer(tmp_path):
    from capaboost_fx.errors import InputError

    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(InputError, match="no tokenizer"):
        export_genai(tmp_path / "hf", tmp_path / "out")
    with pytest.raises(InputError, match="precision='fp64'"):
        export_genai(tmp_path / "hf", tmp_path / "out", precision="fp64")
