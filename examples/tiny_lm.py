"""A tiny causal LM and a character tokenizer made on the spot (no downloads), for the TRL
examples' ``--tiny`` runs and the tests."""

from __future__ import annotations

import string

import torch
import transformers

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per printable character, plus <pad> <s> </s> <unk> and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(tok: transformers.PreTrainedTokenizerFast, seed: int = 0
               ) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tok), max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    return transformers.LlamaForCausalLM(cfg)


def load(model_dir: str | None, tiny: bool) -> tuple:
    """(tokenizer, model): the tiny pair, or a local Hugging Face checkpoint directory."""
    if tiny or not model_dir:
        tok = char_tokenizer()
        return tok, tiny_llama(tok)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return tok, transformers.AutoModelForCausalLM.from_pretrained(model_dir)
