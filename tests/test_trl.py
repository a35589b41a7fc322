"""TRL's SFT, DPO and GRPO trainers train a CapaBoost model end to end (tiny LLaMA, tokenizer
made on the spot); Trainer checkpoints hold the adapter only and resume exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import pytest
import torch
import trl
from safetensors import safe_open

import capaboost_fx as cbx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from tiny_lm import char_tokenizer, tiny_llama  # noqa: E402

SPEC = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, num_masks=2, density=0.5)
TEXTS = [f"{a} likes {b}." for a in ("ann", "bob", "cy", "dee") for b in ("tea", "jam")]


def test_sft_example_trains_folds_and_exports(tmp_path) -> None:
    import trl_sft

    out = trl_sft.main(["--tiny", "--steps", "10", "--capture", "graph", "--out", str(tmp_path)])
    assert out["capture"] == "graph"
    assert out["last_loss"] < out["first_loss"] - 0.1  # it learns
    assert out["adapters_changed"] and out["base_unchanged"]
    assert out["checkpoint_bytes"] < out["base_model_bytes"] / 4  # the adapter, not the model
    assert out["fold_max_abs_diff"] < 1e-5
    assert out["onnx_verified_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("capture", ["graph", "eager"])
def test_grpo_example_generates_and_trains(capture, tmp_path) -> None:
    import trl_grpo

    out = trl_grpo.main(["--tiny", "--steps", "4", "--capture", capture, "--no-export",
                         "--out", str(tmp_path)])
    assert out["capture"] == capture
    assert len(out["rewards"]) == 4
    assert out["adapters_changed"] and out["base_unchanged"]
    assert out["fold_max_abs_diff"] < 1e-5


def test_dpo_trains_with_the_base_model_as_reference(tmp_path) -> None:
    """B = 0 at step 0, so the policy before training is the base model: TRL's precomputed
    reference log-probabilities need no second model."""
    tok = char_tokenizer()
    model = tiny_llama(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tok(TEXTS[:2], return_tensors="pt", padding=True)
    tm = cbx.transform(model, SPEC, example_kwargs={**batch, "labels": batch["input_ids"]})
    pairs = datasets.Dataset.from_dict({
        "prompt": [f"{a} likes" for a in ("ann", "bob", "cy", "dee")],
        "chosen": [" tea.", " jam.", " tea.", " jam."],
        "rejected": [" xq!", " zz?", " qq#", " kk~"]})
    config = trl.DPOConfig(output_dir=str(tmp_path), max_steps=4, learning_rate=2e-2,
                           per_device_train_batch_size=4, logging_steps=1, max_length=32,
                           precompute_ref_log_probs=True, use_cpu=True, report_to="none",
                           save_strategy="no")
    trainer = trl.DPOTrainer(model=tm, args=config, train_dataset=pairs, processing_class=tok)
    a0 = [a.B.detach().clone() for a in cbx.adapters(tm).values()]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b0, a.B) for b0, a in zip(a0, cbx.adapters(tm).values(),
                                                          strict=True))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _sft(tm, tok, out: Path, steps: int, resume: str | None = None):
    config = trl.SFTConfig(output_dir=str(out), max_steps=steps, learning_rate=1e-2,
                           per_device_train_batch_size=2, logging_steps=1, save_steps=3,
                           max_length=24, use_cpu=True, report_to="none", seed=0)
    trainer = trl.SFTTrainer(model=tm, args=config, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict({"text": TEXTS}))
    trainer.train(resume_from_checkpoint=resume)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("capture", ["graph", "eager"])
def test_checkpoints_hold_the_adapter_and_resume_exactly(capture, tmp_path) -> None:
    tok = char_tokenizer()
    batch = tok(TEXTS[:2], return_tensors="pt", padding=True)
    example = {**batch, "labels": batch["input_ids"]}
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, trainable=["model.norm"])
    full = _sft(cbx.transform(tiny_llama(tok), spec, example_kwargs=example, capture=capture),
                tok, tmp_path / "full", 6)
    ckpt = tmp_path / "full" / "checkpoint-3"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys and all(".capaboost." in k or k in ("wrapped.model.norm.weight", "capaboost_header")
                        for k in keys)
    assert "wrapped.model.norm.weight" in keys  # spec.trainable is saved
    assert (ckpt / "optimizer.pt").is_file()
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_llama(tok).parameters())
    assert (ckpt / "model.safetensors").stat().st_size < base_bytes / 10
    resumed = _sft(cbx.transform(tiny_llama(tok), spec, example_kwargs=example,
                                 capture=capture), tok, tmp_path / "full", 6, str(ckpt))
    assert len(full) == 6 and len(resumed) >= 3
    assert resumed[-3:] == pytest.approx(full[3:], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("capture", ["graph", "eager"])
def test_dpo_example_with_trl_defaults_and_the_zero_copy_reference(capture, tmp_path) -> None:
    import trl_dpo

    out = trl_dpo.main(["--tiny", "--steps", "4", "--capture", capture, "--no-export",
                        "--out", str(tmp_path)])
    assert out["bf16"] and out["gradient_checkpointing"]  # TRL's defaults, kept
    assert out["capture"] == capture and out["last_loss"] < out["first_loss"]
    assert out["adapters_changed"] and out["base_unchanged"]  # the reference = your model
    assert out["fold_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("quant", ["nf4", "torchao"])
def test_qlora_example_from_pretrained_quantized(quant, tmp_path) -> None:
    import qlora

    out = qlora.main(["--tiny", "--steps", "4", "--quant", quant, "--out", str(tmp_path)])
    assert out["bf16"] and out["gradient_checkpointing"]
    assert out["adapters_changed"] and out["checkpoint_keys_adapters_only"]
    assert out["last_loss"] < out["first_loss"]
    assert out["generate_tokens_equal"] and out["dequantized_targets"] == 4
