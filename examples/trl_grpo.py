"""RL fine-tuning with TRL's GRPOTrainer and CapaBoost adapters: rollouts call
``train_model.generate`` (your model's own generate, KV cache, with the adapters merged into
the target weights once per optimizer step), then fold and export.

    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=8, num_masks=2, density=0.5)
    trainer = GRPOTrainer(model=cbx.transform(model, spec, example_kwargs=batch),
                          reward_funcs=reward, args=GRPOConfig(...), ...)

(PEFT: ``GRPOTrainer(model=model, peft_config=LoraConfig(...), ...)``.) With ``beta > 0``
TRL builds a reference model by loading ``model.config._name_or_path`` again; with the
default ``beta=0`` there is none. ``train_model.disable_adapter()`` runs the base model
(PEFT's reference-model idiom) for code of your own.

    python examples/trl_grpo.py --tiny
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import capaboost_fx as cbx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_lm import finish, parser, prepare  # noqa: E402


def reward_lower(completions: list, **_: object) -> list[float]:
    """The share of lowercase letters in a completion (a task a tiny model learns in a few
    steps; a random one scores about 0.27)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in texts]


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = parser(__doc__.split("\n\n")[0], steps=6, lr=2e-2).parse_args(argv)
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], rank=8, num_masks=2,
                    density=0.5, alpha=16.0)
    run = prepare(args, spec, ["say x:", "say y now:"], "trl_grpo_")
    prompts = Dataset.from_dict({"prompt": [f"say x {i}:" for i in range(16)]})
    config = GRPOConfig(output_dir=str(run.out / "run"), max_steps=args.steps,
                        learning_rate=args.lr, per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=8, logging_steps=1, save_steps=args.steps,
                        use_cpu=True, report_to="none", seed=0)
    trainer = GRPOTrainer(model=run.train_model, reward_funcs=reward_lower, args=config,
                          train_dataset=prompts, processing_class=run.tok)
    trainer.train()
    # accelerate leaves its bf16 autocast wrapper on the forward of any model it trained;
    # unwrap it so that the fp32 comparison with the fold below compares like with like
    trainer.accelerator.unwrap_model(run.train_model, keep_fp32_wrapper=False)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return finish(run, "say x 1:", {"rewards": rewards})


if __name__ == "__main__":
    main()
