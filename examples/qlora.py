"""QLoRA-style fine-tuning: a 4-bit base loaded the way you load it for PEFT, CapaBoost adapters
on top, TRL's SFTTrainer with its own defaults (bf16 autocast, gradient checkpointing), then
fold and generate.

The PEFT script

    model = AutoModelForCausalLM.from_pretrained(DIR, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    trainer = SFTTrainer(model=model, peft_config=LoraConfig(...), ...)

becomes

    trainer = SFTTrainer(model=cbx.transform(model, spec, example_kwargs=batch), ...)

The quantized weights stay frozen and quantized (the eager path: each target's adapter is
added at its linear module); checkpoints hold the adapters only. `cbx.fold` merges each
target into a dense ``dequantize(W0) + ΔW`` (``fold(..., requantize=fn)`` quantizes it again);
the folded model generates the same tokens as the training module.

    python examples/qlora.py --tiny                     # bitsandbytes NF4, a tiny decoder
    python examples/qlora.py --tiny --quant torchao     # torchao int8 weight-only
    python examples/qlora.py --model DIR                # a local Hugging Face causal LM
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import capaboost_fx as cbx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_lm import char_tokenizer, parser, tiny_llama  # noqa: E402

TEXTS = [f"{a} likes {b}." for a in ("ann", "bob", "cy", "dee") for b in ("tea", "jam", "figs")]


def quantization_config(kind: str):
    import transformers

    if kind == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    if kind == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


def main(argv: list[str] | None = None) -> dict:
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    p = parser(__doc__.split("\n\n")[0], steps=8, lr=1e-2)
    p.add_argument("--quant", default="nf4", choices=["nf4", "int8", "torchao"])
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="qlora_"))
    model_dir = args.model
    if args.tiny or not model_dir:  # a tiny decoder saved as a directory, loaded as usual
        model_dir = out / "base"
        tok = char_tokenizer()
        tiny_llama(tok).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization_config(args.quant))

    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    batch = tok(TEXTS[:2], return_tensors="pt", padding=True)
    tm = cbx.transform(model, spec, example_kwargs={**batch, "labels": batch["input_ids"]})
    tm.print_trainable_parameters()
    b0 = {n: a.B.detach().clone() for n, a in cbx.adapters(tm).items()}
    config = SFTConfig(output_dir=str(out / "run"), max_steps=args.steps, learning_rate=args.lr,
                       per_device_train_batch_size=4, logging_steps=1, save_steps=args.steps,
                       max_length=32, use_cpu=True, report_to="none", seed=0)
    trainer = SFTTrainer(model=tm, args=config, processing_class=tok,
                         train_dataset=Dataset.from_dict({"text": TEXTS}))
    trainer.train()
    trainer.accelerator.unwrap_model(tm, keep_fp32_wrapper=False)  # accelerate's bf16 wrapper
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    folded = cbx.fold(tm)
    prompt = tok(["ann likes"], return_tensors="pt")
    with torch.no_grad():
        ours = tm.eval().generate(**prompt, max_new_tokens=8, do_sample=False)
        deployed = folded.generate(**prompt, max_new_tokens=8, do_sample=False)
    ckpt = out / "run" / f"checkpoint-{args.steps}" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        keys = list(f.keys())
    result = {
        "quantization": args.quant, "capture": tm.capture_info.capture,
        "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
        "first_loss": losses[0], "last_loss": losses[-1],
        "adapters_changed": any(not torch.equal(b0[n], a.B) for n, a in cbx.adapters(tm).items()),
        "checkpoint_keys_adapters_only": all("capaboost" in k for k in keys),
        "checkpoint_bytes": ckpt.stat().st_size,
        "dequantized_targets": len(folded.fold_info["dequantized"]),
        "generate_tokens_equal": bool(torch.equal(ours, deployed)),
        "generated": tok.decode(deployed[0], skip_special_tokens=True),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
