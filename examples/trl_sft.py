"""Supervised fine-tuning with TRL's SFTTrainer and CapaBoost adapters, then fold and export.

Moving a PEFT + TRL script changes one line: where PEFT passes ``peft_config=``,

    trainer = SFTTrainer(model=model, peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), ...)

pass the transformed model instead:

    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    trainer = SFTTrainer(model=cbx.transform(model, spec, example_kwargs=batch), ...)

Checkpoints hold the adapter only (``model.safetensors`` of a few KB-MB, plus optimizer
state); ``trainer.train(resume_from_checkpoint=...)`` resumes them. After training:
``cbx.fold(train_model)`` is your model with merged weights (``.generate``,
``.base_model.save_pretrained``), and ``cbx.export_onnx`` writes it for onnxruntime.

    python examples/trl_sft.py --tiny              # a tiny LLaMA and tokenizer made on the spot
    python examples/trl_sft.py --model DIR         # a local Hugging Face causal LM directory
"""

from __future__ import annotations

import argparse
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
from tiny_lm import load  # noqa: E402

TEXTS = [f"{a} likes {b}." for a in ("ann", "bob", "cy", "dee") for b in ("tea", "jam", "figs")]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA + char tokenizer (CPU, <1 min)")
    p.add_argument("--model", help="local Hugging Face causal LM directory")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--capture", default="auto", choices=["auto", "graph", "eager"])
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = parse(argv)
    t0 = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="trl_sft_"))
    tok, model = load(args.model, args.tiny)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj", "*.o_proj", "*.down_proj"], rank=8,
                    num_masks=2, density=0.5, alpha=16.0)
    batch = tok(TEXTS[:2], return_tensors="pt", padding=True)
    train_model = cbx.transform(model, spec, example_kwargs={**batch, "labels": batch["input_ids"]},
                                capture=args.capture)
    train_model.print_trainable_parameters()
    a0 = {n: a.A.detach().clone() for n, a in cbx.adapters(train_model).items()}

    config = SFTConfig(output_dir=str(out / "run"), max_steps=args.steps, learning_rate=args.lr,
                       per_device_train_batch_size=4, logging_steps=1, save_steps=args.steps,
                       max_length=32, use_cpu=True, report_to="none", bf16=False, seed=0)
    trainer = SFTTrainer(model=train_model, args=config, processing_class=tok,
                         train_dataset=Dataset.from_dict({"text": TEXTS}))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ckpt = out / "run" / f"checkpoint-{args.steps}"
    ckpt_bytes = (ckpt / "model.safetensors").stat().st_size
    base_bytes = sum(v.numel() * v.element_size() for v in base_before.values())
    folded = cbx.fold(train_model)
    ids = tok(["ann likes"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fold_diff = (folded(ids).logits - train_model.eval()(ids).logits).abs().max().item()
    text = tok.decode(folded.generate(ids, max_new_tokens=8, do_sample=False)[0])
    result = {
        "capture": train_model.capture_info["capture"],
        "first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses),
        "adapters_changed": all(not torch.equal(a0[n], a.A) for n, a in
                                cbx.adapters(train_model).items()),
        "base_unchanged": all(torch.equal(v, model.state_dict()[k])
                              for k, v in base_before.items()),
        "checkpoint_bytes": ckpt_bytes, "base_model_bytes": base_bytes,
        "fold_max_abs_diff": fold_diff, "generated": text,
    }
    if not args.no_export:
        report = cbx.export_onnx(folded, out / "model.onnx", example_inputs=(ids,))
        result["onnx_verified_max_abs_diff"] = report.max_abs_diff
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
