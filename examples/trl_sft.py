"""Supervised fine-tuning with TRL's SFTTrainer and CapaBoost adapters, then fold and export.

Moving a PEFT + TRL script changes one line: where PEFT passes ``peft_config=``,

    trainer = SFTTrainer(model=model, peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), ...)

pass the transformed model instead:

    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    trainer = SFTTrainer(model=cbx.transform(model, spec, example_kwargs=batch), ...)

Checkpoints hold the adapter only (``model.safetensors`` of a few KB-MB, plus optimizer
state); ``trainer.train(resume_from_checkpoint=...)`` resumes them. After training:
``cbx.fold(train_model)`` is your model with merged weights (``.generate``,
``.save_pretrained``), and ``cbx.export_onnx`` writes it for onnxruntime.

    python examples/trl_sft.py --tiny              # a tiny LLaMA and tokenizer made on the spot
    python examples/trl_sft.py --model DIR         # a local Hugging Face causal LM directory
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import capaboost_fx as cbx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_lm import finish, parser, prepare  # noqa: E402

TEXTS = [f"{a} likes {b}." for a in ("ann", "bob", "cy", "dee") for b in ("tea", "jam", "figs")]


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = parser(__doc__.split("\n\n")[0], steps=12, lr=1e-2).parse_args(argv)
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj", "*.o_proj", "*.down_proj"], rank=8,
                    num_masks=2, density=0.5, alpha=16.0)
    run = prepare(args, spec, TEXTS[:2], "trl_sft_")
    config = SFTConfig(output_dir=str(run.out / "run"), max_steps=args.steps,
                       learning_rate=args.lr, per_device_train_batch_size=4, logging_steps=1,
                       save_steps=args.steps, max_length=32, use_cpu=True, report_to="none",
                       seed=0)
    trainer = SFTTrainer(model=run.train_model, args=config, processing_class=run.tok,
                         train_dataset=Dataset.from_dict({"text": TEXTS}))
    trainer.train()
    # accelerate leaves its bf16 autocast wrapper on the forward of any model it trained;
    # unwrap it so that the fp32 comparison with the fold below compares like with like
    trainer.accelerator.unwrap_model(run.train_model, keep_fp32_wrapper=False)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return finish(run, "ann likes",
                  {"first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses)})


if __name__ == "__main__":
    main()
