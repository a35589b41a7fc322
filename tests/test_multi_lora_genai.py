"""onnxruntime-genai multi-LoRA (capaboost_fx.onnx.genai_multi_lora): one decoder folder, fine-tunes
switched per generator by their .onnx_adapter files, greedy tokens equal to each fine-tune's
folded transformers generate (tiny LLaMA, offline)."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_onnx_genai import _tokenizer

import capaboost_fx as cbx

pytest.importorskip("onnxruntime_genai")
from capaboost_fx.onnx.genai_multi_lora import (  # noqa: E402
    export_genai_multi_lora,
    generate_with_adapter,
)


def test_genai_folder_switches_fine_tunes_per_generator(tmp_path) -> None:
    tok = _tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, len(tok), (2, 8))
    tms = []
    for seed in (1, 2):
        spec = cbx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], rank=4, num_masks=2,
                        density=0.5, seed=seed)
        tm = cbx.transform(model, spec, example_kwargs={"input_ids": ids})
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for a in cbx.adapters(tm).values():
                a.B.copy_(torch.randn(a.B.shape, generator=gen) * 0.5)
        tms.append(tm)
    rep = export_genai_multi_lora(tms[0], tmp_path / "llm", tokenizer_dir=tmp_path / "tok")
    assert rep.tokens_match and len(rep.onnx_tokens) == 10  # no adapter: tms[0]'s own
    files = [cbx.save_onnx_adapter(tm, tmp_path / f"{i}.onnx_adapter",
                                   base=tmp_path / "llm" / "model.onnx")
             for i, tm in enumerate(tms)]
    prompt = rep.prompt_ids

    def folded_tokens(m) -> list[int]:
        with torch.no_grad():
            out = m.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10,
                             min_new_tokens=10,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        return out[0, len(prompt):].tolist()

    want = [folded_tokens(cbx.fold(tm)) for tm in tms]
    base = folded_tokens(model)
    assert want[0] != want[1] and base not in want  # the three answers differ
    for i in (1, 0, 1):  # switched per generator on the one folder
        assert generate_with_adapter(tmp_path / "llm", prompt, 10, files[i]) == want[i]
    other = cbx.transform(model, cbx.Spec(targets=["*.q_proj"], rank=2),
                          example_kwargs={"input_ids": ids})
    with pytest.raises(cbx.AdapterMismatchError, match="lacks"):
        cbx.save_onnx_adapter(other, tmp_path / "x.onnx_adapter",
                              base=tmp_path / "llm" / "model.onnx")
