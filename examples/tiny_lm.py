"""A tiny causal LM and a character tokenizer made on the spot (no downloads), for the TRL
examples' ``--tiny`` runs and the tests; and the frame the TRL examples share (arguments, the
checks after training, fold, generate, export)."""

from __future__ import annotations

import argparse
import json
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- the examples' frame


def parser(description: str, steps: int, lr: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA + char tokenizer (CPU, <1 min)")
    p.add_argument("--model", help="local Hugging Face causal LM directory")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--capture", default="auto", choices=["auto", "graph", "eager"])
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    return p


@dataclass
class Run:
    """What an example trains and then checks: the model, its untouched state, the training
    module and its adapters' starting values."""

    args: argparse.Namespace
    out: Path
    tok: Any
    model: Any
    base_before: dict
    train_model: Any
    a0: dict
    t0: float


def prepare(args: argparse.Namespace, spec: Any, example_texts: list[str], prefix: str) -> Run:
    import capaboost_fx as cbx

    t0 = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix=prefix))
    tok, model = load(args.model, args.tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tok(example_texts, return_tensors="pt", padding=True)
    tm = cbx.transform(model, spec, example_kwargs={**batch, "labels": batch["input_ids"]},
                       capture=args.capture)
    tm.print_trainable_parameters()
    a0 = {n: a.A.detach().clone() for n, a in cbx.adapters(tm).items()}
    return Run(args, out, tok, model, before, tm, a0, t0)


def finish(run: Run, prompt: str, result: dict) -> dict:
    """Check that the adapters changed and the base did not, fold, generate, export."""
    import capaboost_fx as cbx

    tm = run.train_model
    folded = cbx.fold(tm)
    ids = run.tok([prompt], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fold_diff = (folded(ids).logits - tm.eval()(ids).logits).abs().max().item()
    ckpt = run.out / "run" / f"checkpoint-{run.args.steps}" / "model.safetensors"
    result.update({
        "capture": tm.capture_info.capture,
        "adapters_changed": all(not torch.equal(run.a0[n], a.A)
                                for n, a in cbx.adapters(tm).items()),
        "base_unchanged": all(torch.equal(v, run.model.state_dict()[k])
                              for k, v in run.base_before.items()),
        "checkpoint_bytes": ckpt.stat().st_size,
        "base_model_bytes": sum(v.numel() * v.element_size() for v in run.base_before.values()),
        "fold_max_abs_diff": fold_diff,
        "generated": run.tok.decode(folded.generate(ids, max_new_tokens=8, do_sample=False)[0]),
    })
    if not run.args.no_export:
        report = cbx.export_onnx(folded, run.out / "model.onnx", example_inputs=(ids,))
        result["onnx_verified_max_abs_diff"] = report.max_abs_diff
    result["seconds"] = round(time.perf_counter() - run.t0, 1)
    print(json.dumps(result, indent=2))
    return result
