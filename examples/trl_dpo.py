"""Preference tuning with TRL's DPOTrainer and CapaBoost adapters, under TRL's own defaults
(bf16 autocast, gradient checkpointing), then fold and generate.

Moving a PEFT + TRL script changes one line: where PEFT passes ``peft_config=``,

    trainer = DPOTrainer(model=model, peft_config=LoraConfig(...), args=DPOConfig(...), ...)

pass the transformed model, and (optionally) your untouched model as the reference:

    tm = cbx.transform(model, spec, example_kwargs=batch)
    trainer = DPOTrainer(model=tm, ref_model=model, args=DPOConfig(...), ...)

``ref_model=model`` costs no memory: the training module reads your model's weights in place
and never changes them, so your model *is* the base model. Without ``ref_model`` TRL loads a
second copy from ``model.config._name_or_path`` (a ``from_pretrained`` model; one built
from a config has no path to load).

    python examples/trl_dpo.py --tiny             # a tiny LLaMA and tokenizer made on the spot
    python examples/trl_dpo.py --model DIR        # a local Hugging Face causal LM directory
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import capaboost_fx as cbx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_lm import finish, parser, prepare  # noqa: E402

PAIRS = {"prompt": [f"{a} likes" for a in ("ann", "bob", "cy", "dee")],
         "chosen": [" tea.", " jam.", " tea.", " jam."],
         "rejected": [" xq!", " zz?", " qq#", " kk~"]}


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = parser(__doc__.split("\n\n")[0], steps=6, lr=2e-2).parse_args(argv)
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    run = prepare(args, spec, ["ann likes tea.", "bob likes jam."], "trl_dpo_")
    config = DPOConfig(output_dir=str(run.out / "run"), max_steps=args.steps,
                       learning_rate=args.lr, per_device_train_batch_size=4, logging_steps=1,
                       save_steps=args.steps, max_length=32, use_cpu=True, report_to="none",
                       seed=0)
    trainer = DPOTrainer(model=run.train_model, ref_model=run.model, args=config,
                         processing_class=run.tok, train_dataset=Dataset.from_dict(PAIRS))
    trainer.train()
    # accelerate leaves its bf16 autocast wrapper on the forward of any model it trained;
    # unwrap it so that the fp32 comparison with the fold below compares like with like
    trainer.accelerator.unwrap_model(run.train_model, keep_fp32_wrapper=False)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return finish(run, "ann likes", {
        "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
        "first_loss": logs[0]["loss"], "last_loss": logs[-1]["loss"], "steps": len(logs),
        "reward_margin": logs[-1].get("rewards/margins")})


if __name__ == "__main__":
    main()
