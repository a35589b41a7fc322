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


def reward_lower(completions: list, **_: object) -> list[float]:
    """The share of lowercase letters in a completion (a task a tiny model learns in a few
    steps; a random one scores about 0.27)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in texts]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA + char tokenizer (CPU, <1 min)")
    p.add_argument("--model", help="local Hugging Face causal LM directory")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--capture", default="auto", choices=["auto", "graph", "eager"])
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = parse(argv)
    t0 = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="trl_grpo_"))
    tok, model = load(args.model, args.tiny)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], rank=8, num_masks=2,
                    density=0.5, alpha=16.0)
    batch = tok(["say x:", "say y now:"], return_tensors="pt", padding=True)
    train_model = cbx.transform(model, spec, example_kwargs={**batch, "labels": batch["input_ids"]},
                                capture=args.capture)
    a0 = {n: a.A.detach().clone() for n, a in cbx.adapters(train_model).items()}
    prompts = Dataset.from_dict({"prompt": [f"say x {i}:" for i in range(16)]})
    config = GRPOConfig(output_dir=str(out / "run"), max_steps=args.steps, learning_rate=args.lr,
                        per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=8, logging_steps=1, save_steps=args.steps,
                        use_cpu=True, report_to="none", bf16=False, seed=0)
    trainer = GRPOTrainer(model=train_model, reward_funcs=reward_lower, args=config,
                          train_dataset=prompts, processing_class=tok)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]

    folded = cbx.fold(train_model)
    ids = tok(["say x 1:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fold_diff = (folded(ids).logits - train_model.eval()(ids).logits).abs().max().item()
    result = {
        "capture": train_model.capture_info["capture"],
        "rewards": rewards,
        "adapters_changed": all(not torch.equal(a0[n], a.A) for n, a in
                                cbx.adapters(train_model).items()),
        "base_unchanged": all(torch.equal(v, model.state_dict()[k])
                              for k, v in base_before.items()),
        "checkpoint_bytes": (out / "run" / f"checkpoint-{args.steps}" /
                             "model.safetensors").stat().st_size,
        "fold_max_abs_diff": fold_diff,
        "generated": tok.decode(folded.generate(ids, max_new_tokens=8, do_sample=False)[0]),
    }
    if not args.no_export:
        report = cbx.export_onnx(folded, out / "model.onnx", example_inputs=(ids,))
        result["onnx_verified_max_abs_diff"] = report.max_abs_diff
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
