"""A PEFT + TRL + QLoRA script runs with one changed line, under the libraries' own defaults
(TRL: bf16 autocast and gradient checkpointing on, even on CPU), on both paths.

One row of the table a user meets per test: TRL's SFT/DPO/GRPO with their defaults, the HF
Trainer over a quantized ``from_pretrained`` base, the model's own config objects, PEFT's
methods, Trainer checkpoint -> model in one call. References are independent of the code
under test: the plain model's and PEFT's losses, transformers' ``generate``, bit-equal reloads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import peft
import pytest
import torch
import transformers
import trl
from safetensors import safe_open

import capaboost_fx as cbx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from tiny_lm import char_tokenizer  # noqa: E402

PATHS = ["graph", "eager"]
SPEC = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, num_masks=2, density=0.5)
TEXTS = [f"{a} likes {b}." for a in ("ann", "bob", "cy", "dee") for b in ("tea", "jam")]
PAIRS = {"prompt": ["ann likes", "bob likes", "cy likes", "dee likes"],
         "chosen": [" tea.", " jam.", " tea.", " jam."],
         "rejected": [" xq!", " zz?", " qq#", " kk~"]}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    """A small Qwen3-shaped decoder saved as a Hugging Face directory (from_pretrained)."""
    out = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=len(tok), max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _example(tok) -> dict[str, torch.Tensor]:
    batch = tok(TEXTS[:2], return_tensors="pt", padding=True)
    return {**batch, "labels": batch["input_ids"]}


def _load(model_dir: Path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def _nonzero(tm) -> None:
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(a.name)))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------- TRL, defaults


def _trl_run(kind: str, tm, tok, out: Path):
    common = dict(output_dir=str(out), max_steps=2, learning_rate=2e-2, report_to="none",
                  use_cpu=True, save_strategy="no", logging_steps=1)
    if kind == "sft":
        args = trl.SFTConfig(**common, per_device_train_batch_size=4, max_length=24)
        trainer = trl.SFTTrainer(model=tm, args=args, processing_class=tok,
                                 train_dataset=datasets.Dataset.from_dict({"text": TEXTS}))
    elif kind == "dpo":  # no ref_model: TRL makes its reference from the model's path
        args = trl.DPOConfig(**common, per_device_train_batch_size=4, max_length=32)
        trainer = trl.DPOTrainer(model=tm, args=args, processing_class=tok,
                                 train_dataset=datasets.Dataset.from_dict(PAIRS))
    else:
        args = trl.GRPOConfig(**common, per_device_train_batch_size=4, num_generations=2,
                              max_completion_length=4, beta=0.04)
        trainer = trl.GRPOTrainer(
            model=tm, args=args, processing_class=tok,
            reward_funcs=lambda completions, **kw: [float(sum(map(ord, c)) % 7) for c in completions],
            train_dataset=datasets.Dataset.from_dict({"prompt": PAIRS["prompt"]}))
    assert args.bf16 and args.gradient_checkpointing  # TRL's own defaults, untouched
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("capture", PATHS)
def test_trl_trains_under_its_defaults(kind, capture, model_dir, tok, tmp_path) -> None:
    model = _load(model_dir)
    before = _snapshot(model)
    tm = cbx.transform(model, SPEC, example_kwargs=_example(tok), capture=capture)
    b0 = {n: a.B.detach().clone() for n, a in cbx.adapters(tm).items()}
    trainer = _trl_run(kind, tm, tok, tmp_path)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b0[n], a.B) for n, a in cbx.adapters(tm).items())
    assert _unchanged(model, before)
    assert tm.is_gradient_checkpointing and tm.capture_info.checkpointed
    if capture == "graph":
        # One capture for the bf16 autocast state the trainer runs under, none for the
        # keywords TRL passes (use_cache, fused_lm_head, logits_to_keep, ...).
        later = tm.capture_info.later_captures
        assert all("bfloat16" in c["autocast"] for c in later), later
        assert len({(c["mode"], c["autocast"]) for c in later}) == len(later) <= 2, later


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("capture", PATHS)
def test_step0_loss_equals_plain_and_peft_under_bf16_and_checkpointing(
        capture, reentrant, model_dir, tok) -> None:
    """bf16 autocast over an fp32 base, HF gradient checkpointing with either reentrant
    setting: the training module's loss equals the plain model's at step 0 (B = 0) and
    PEFT's exact rank-d·r LoRA of the same adapters after it moved."""
    batch = _example(tok)
    kwargs = {"use_reentrant": reentrant}

    def loss_of(m) -> torch.Tensor:
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**batch).loss
        loss.backward()
        return loss.detach().float()

    plain = _load(model_dir)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    tm = cbx.transform(_load(model_dir), SPEC, example_kwargs=batch, capture=capture)
    tm.gradient_checkpointing_enable(kwargs)
    assert tm.is_gradient_checkpointing and tm.capture_info.checkpointed
    torch.testing.assert_close(loss_of(tm), loss_of(plain), rtol=2e-2, atol=2e-2)
    _nonzero(tm)
    ours = loss_of(tm)
    assert all(a.A.grad is not None and a.A.grad.abs().sum() > 0
               for a in cbx.adapters(tm).values())
    # PEFT's LoRA of the same update (rank d·r, masks folded into the factors)
    pm = peft.get_peft_model(_load(model_dir), peft.LoraConfig(
        r=SPEC.rank * SPEC.num_masks, lora_alpha=1, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, a in cbx.adapters(tm).items():
            a_cat, b_cat = a.factors()
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a_cat)
            layer.lora_B["default"].weight.copy_(b_cat * a.scaling / layer.scaling["default"])
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    peft_loss = loss_of(pm)
    assert abs(float(ours - loss_of(plain))) > 1e-3  # the adapters moved the loss
    torch.testing.assert_close(ours, peft_loss, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- the model's surface


@pytest.mark.parametrize("capture", PATHS)
def test_config_objects_are_the_models(capture, model_dir, tok, tmp_path) -> None:
    model = _load(model_dir)
    tm = cbx.transform(model, SPEC, example_kwargs=_example(tok), capture=capture)
    assert tm.config is model.config and tm.generation_config is model.generation_config
    assert tm.base_model is tm.get_base_model().model  # transformers' meaning: the backbone
    tm.config.pad_token_id = 3
    tm.generation_config.max_new_tokens = 3
    _nonzero(tm)
    ids = tok(["ann likes"], return_tensors="pt")
    out = tm.generate(**ids, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3  # the generation config drives it
    fm = cbx.fold(tm)
    assert fm.config is model.config and fm.generation_config is model.generation_config
    fm.save_pretrained(tmp_path / "folded")
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "folded")
    assert saved.pad_token_id == 3
    back = _load(tmp_path / "folded")
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ref.load_state_dict(cbx.merged_state_dict(tm))
    torch.testing.assert_close(back.lm_head.weight, ref.lm_head.weight)
    with torch.no_grad():
        torch.testing.assert_close(back(**ids).logits, ref(**ids).logits)
    assert model.config.use_cache is True  # switched off only while captured


@pytest.mark.parametrize("capture", PATHS)
def test_peft_methods(capture, model_dir, tok, capsys) -> None:
    model = _load(model_dir)
    tm = cbx.transform(model, SPEC, example_kwargs=_example(tok), capture=capture)
    _nonzero(tm)
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)
    tm.eval()
    with torch.no_grad():
        adapted = tm(**ids).logits
        base = model(**ids).logits
        assert not torch.allclose(adapted, base, atol=1e-4)
        tm.disable_adapter_layers()
        torch.testing.assert_close(tm(**ids).logits, base, rtol=1e-5, atol=1e-5)
        tm.enable_adapter_layers()
        torch.testing.assert_close(tm(**ids).logits, adapted)
        merged = tm.merge_and_unload()
        assert type(merged) is type(model)  # your class, as PEFT's merge_and_unload returns
        torch.testing.assert_close(merged(**ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert tm.get_base_model() is tm.wrapped and type(tm.get_base_model()) is type(model)
    trainable, total = tm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for a in cbx.adapters(tm).values() for p in a.parameters())
    assert total == trainable + sum(p.numel() for p in model.parameters())
    tm.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


@pytest.mark.parametrize("capture", PATHS)
def test_trl_fused_head_works_on_the_folded_decoder(capture, model_dir, tok) -> None:
    """TRL patches every reference model with add_fused_lm_head, which runs model.base_model
    as the backbone: on a folded module it is your model's backbone, with merged weights."""
    from trl.trainer.utils import add_fused_lm_head

    tm = cbx.transform(_load(model_dir), SPEC, example_kwargs=_example(tok), capture=capture)
    _nonzero(tm)
    fm = cbx.fold(tm)
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        logits = fm(input_ids=ids).logits
    add_fused_lm_head(fm)
    with torch.no_grad():
        fused = fm(input_ids=ids, labels=ids, fused_lm_head=True)
    ref = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(fused.log_probs, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- quantized bases


def _quantization(kind: str):
    if kind == "bnb-nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    if kind == "bnb-int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_quantized_from_pretrained_trains_with_the_trainer(kind, model_dir, tok,
                                                           tmp_path) -> None:
    model = _load(model_dir, quantization_config=_quantization(kind))
    assert model.is_quantized
    tm = cbx.transform(model, SPEC, example_kwargs=_example(tok))
    b0 = {n: a.B.detach().clone() for n, a in cbx.adapters(tm).items()}
    data = datasets.Dataset.from_dict({k: v for k, v in _example(tok).items()})
    trainer = transformers.Trainer(model=tm, train_dataset=data, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=2, report_to="none", use_cpu=True))
    trainer.train()  # transformers' quantization check accepts a model with adapters
    assert any(not torch.equal(b0[n], a.B) for n, a in cbx.adapters(tm).items())
    with safe_open(str(tmp_path / "checkpoint-2" / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    # the adapters only: no quantization state (absmax, quant_map, SCB) of frozen weights
    assert keys == sorted(["capaboost_header"] + [
        f"wrapped.{p}.{w}" for p in tm.adapter_paths.values() for w in ("A", "B")]), keys
    # the checkpoint loads onto the same base in float (quantized weights are not compared)
    back = cbx.load_adapter(_load(model_dir), tmp_path / "checkpoint-2",
                            example_kwargs=_example(tok))
    for n, a in cbx.adapters(tm).items():
        assert torch.equal(a.B, cbx.adapters(back)[n].B)


# --------------------------------------------------------------------------- checkpoints


def _trainer_checkpoint(tm, tok, out: Path) -> Path:
    data = datasets.Dataset.from_dict({k: v for k, v in _example(tok).items()})
    transformers.Trainer(model=tm, train_dataset=data, args=transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, save_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=2, report_to="none", use_cpu=True)).train()
    return out / "checkpoint-2"


@pytest.mark.parametrize("capture", PATHS)
def test_trainer_checkpoint_to_model_in_one_call(capture, model_dir, tok, tmp_path) -> None:
    spec = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, trainable=["model.norm"])
    tm = cbx.transform(_load(model_dir), spec, example_kwargs=_example(tok), capture=capture)
    ckpt = _trainer_checkpoint(tm, tok, tmp_path)
    back = cbx.load_adapter(_load(model_dir), ckpt, example_kwargs=_example(tok),
                            capture=capture)
    assert back.spec == spec
    for (n, a), (m, b) in zip(cbx.adapters(tm).items(), cbx.adapters(back).items(),
                              strict=True):
        assert n == m and torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert torch.equal(a.mask_A, b.mask_A) and torch.equal(a.mask_B, b.mask_B)
    assert torch.equal(tm.get_parameter("wrapped.model.norm.weight"),
                       back.get_parameter("wrapped.model.norm.weight"))
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(tm.eval()(**ids).logits, back.eval()(**ids).logits)


def test_a_checkpoint_of_another_spec_or_base_is_refused(model_dir, tok, tmp_path) -> None:
    tm = cbx.transform(_load(model_dir), SPEC, example_kwargs=_example(tok))
    _nonzero(tm)
    state = tm.state_dict()
    other_spec = cbx.transform(_load(model_dir), cbx.Spec(**{**SPEC.to_dict(), "alpha": 32.0}),
                               example_kwargs=_example(tok))
    with pytest.raises(cbx.AdapterFileError, match=r"another spec \(alpha: saved 16.0, here 32.0"):
        other_spec.load_state_dict(state)
    other_base = _load(model_dir)
    with torch.no_grad():
        other_base.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(cbx.AdapterFileError, match="other base weights"):
        cbx.transform(other_base, SPEC, example_kwargs=_example(tok)).load_state_dict(state)
    # the same, from the Trainer's file, in one call
    ckpt = _trainer_checkpoint(tm, tok, tmp_path)
    with pytest.raises(cbx.AdapterFileError, match="other base weights"):
        cbx.load_adapter(other_base, ckpt, example_kwargs=_example(tok))


def test_checkpoint_is_as_small_as_peft_lora(tok, tmp_path) -> None:
    """Same trainable count: CapaBoost rank r (masks regenerated from the seed, checked by
    their checksums) against PEFT LoRA rank r on the same targets. A decoder of hidden size
    512 (a few hundred kB of adapters): the header (spec, base fingerprint, checksums) is a
    constant ~1.5 kB that a tiny model's 8 kB file would overstate."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        hidden_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=128, intermediate_size=256, vocab_size=len(tok), max_position_embeddings=64)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "model")
    model_dir = tmp_path / "model"
    tm = cbx.transform(_load(model_dir), SPEC, example_kwargs=_example(tok))
    ours = _trainer_checkpoint(tm, tok, tmp_path / "cbx") / "model.safetensors"
    pm = peft.get_peft_model(_load(model_dir), peft.LoraConfig(
        r=SPEC.rank, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    theirs = tmp_path / "peft" / "adapter_model.safetensors"
    assert tm.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]
    ratio = ours.stat().st_size / theirs.stat().st_size
    print(f"\ncheckpoint bytes: capaboost_fx {ours.stat().st_size}, PEFT "
          f"{theirs.stat().st_size} ({ratio:.3f}x)")
    assert ratio <= 1.10


def test_a_batch_of_one_example_is_said_once_in_our_words(model_dir, tok, caplog) -> None:
    batch = tok(TEXTS[:1], return_tensors="pt")
    with pytest.warns(cbx.CapaBoostWarning, match=r"input_ids.shape\[0\] == 1.*batch >= 2"):
        cbx.transform(_load(model_dir), SPEC, example_kwargs={**batch, "labels":
                                                               batch["input_ids"]},
                      capture="graph")
    assert not [r for r in caplog.records if r.name.startswith("torch._export")]


@pytest.mark.parametrize("capture", PATHS)
def test_hf_trainer_with_bf16_and_gradient_checkpointing(capture, model_dir, tok,
                                                         tmp_path) -> None:
    """The HF Trainer's own switches (bf16=True, gradient_checkpointing=True), as TRL sets
    them: it trains, checkpointing per block is on, and the base is untouched."""
    model = _load(model_dir)
    before = _snapshot(model)
    tm = cbx.transform(model, SPEC, example_kwargs=_example(tok), capture=capture)
    b0 = {n: a.B.detach().clone() for n, a in cbx.adapters(tm).items()}
    data = datasets.Dataset.from_dict({k: v for k, v in _example(tok).items()})
    trainer = transformers.Trainer(model=tm, train_dataset=data, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2, per_device_train_batch_size=2,
        bf16=True, gradient_checkpointing=True, report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert tm.is_gradient_checkpointing and tm.capture_info.checkpointed
    assert any(not torch.equal(b0[n], a.B) for n, a in cbx.adapters(tm).items())
    assert _unchanged(model, before)
