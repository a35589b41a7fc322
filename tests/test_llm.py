"""The training and folded modules behave as the user's LLM: attributes, generate (KV cache,
merged once until the adapters change), disable_adapter, adapter-only state and checkpoints.
Both capture paths (graph, eager) are held to the same assertions."""

from __future__ import annotations

import pytest
import torch
import transformers

import capaboost_fx as cbx

PATHS = ["graph", "eager"]


def tiny_llama(seed: int = 0, dropout: float = 0.0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=0, attention_dropout=dropout)
    return transformers.LlamaForCausalLM(cfg).eval()


SPEC = cbx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], rank=4, num_masks=2,
                density=0.5, seed=3)


def _transform(model, capture: str):
    ids = torch.randint(2, 97, (2, 8))
    tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids, "labels": ids},
                       capture=capture)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so "adapted" and "base" differ
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.5)
    return tm


def _greedy(m, ids, n=6):
    return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      do_sample=False)


@pytest.mark.parametrize("capture", PATHS)
def test_attributes_of_the_wrapped_model_are_reachable(capture) -> None:
    model = tiny_llama()
    tm = _transform(model, capture)
    fm = cbx.fold(tm)
    for m in (tm, fm):
        assert m.config is not None and m.config.model_type == "llama"
        assert m.generation_config.eos_token_id == 1
        assert m.main_input_name == "input_ids" and m.can_generate()
        assert m.get_input_embeddings().weight.shape == (97, 32)
        assert m.device == torch.device("cpu") and m.dtype == torch.float32
        with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
            m.no_such_thing  # noqa: B018
    assert (tm.capture_info.capture == "eager") == (capture == "eager")
    assert tm.capture_info.capture == capture


@pytest.mark.parametrize("capture", PATHS)
def test_generate_uses_adapters_kv_cache_and_equals_the_folded_base(capture) -> None:
    model = tiny_llama()
    tm = _transform(model, capture).eval()
    ids = torch.randint(2, 97, (3, 5))
    out = _greedy(tm, ids)
    folded = cbx.fold(tm)
    assert torch.equal(out, _greedy(folded.get_base_model(), ids))
    assert torch.equal(out, _greedy(folded, ids))
    assert not torch.equal(out, _greedy(model, ids)), "adapters must change the tokens"
    # generate keeps every transformers argument: a dict output with scores, and the cache
    res = tm.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                      output_scores=True, use_cache=True)
    assert len(res.scores) == 3 and res.past_key_values is not None


@pytest.mark.parametrize("capture", PATHS)
def test_merged_view_is_reused_until_the_adapters_change(capture) -> None:
    tm = _transform(tiny_llama(), capture).eval()
    ids = torch.randint(2, 97, (2, 5))
    view = tm.generation_model()
    assert tm.generation_model() is view  # many rollouts, one merge
    base_ids = {id(p) for p in tm.wrapped.parameters()}
    merged = {n for n, p in view.named_parameters() if id(p) not in base_ids}
    shared_storage = {p.data_ptr() for p in tm.wrapped.parameters()}
    new_storage = {n for n, p in view.named_parameters() if p.data_ptr() not in shared_storage}
    targets = {a.weight_fqn for a in cbx.adapters(tm).values()}
    assert new_storage == targets  # only merged target weights are new memory
    assert merged >= targets
    before = _greedy(tm, ids)
    tm.train()
    opt = torch.optim.SGD([p for p in tm.parameters() if p.requires_grad], lr=1.0)
    tm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    tm.eval()
    assert tm.generation_model() is not view  # the optimizer step bumped the versions
    assert torch.equal(_greedy(tm, ids), _greedy(cbx.fold(tm), ids))
    assert not torch.equal(_greedy(tm, ids), before)


@pytest.mark.parametrize("capture", PATHS)
def test_disable_adapter_runs_the_base_model(capture) -> None:
    model = tiny_llama()
    tm = _transform(model, capture).eval()
    ids = torch.randint(2, 97, (2, 7))
    with torch.no_grad():
        adapted = tm(input_ids=ids).logits
        base = model(input_ids=ids).logits
        with tm.disable_adapter():
            off = tm(input_ids=ids).logits
            gen_off = _greedy(tm, ids)
        again = tm(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(off, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, adapted)
    assert torch.equal(gen_off, _greedy(model, ids))


@pytest.mark.parametrize("capture", PATHS)
def test_state_dict_holds_only_what_training_changes(capture) -> None:
    model = tiny_llama()
    tm = _transform(model, capture)
    sd = tm.state_dict()
    assert sd and all(".capaboost." in k for k in sd if k != "capaboost_header"), sorted(sd)[:5]
    n_adapters = len(cbx.adapters(tm))
    # A and B of each adapter, and the header (spec, base fingerprint, mask checksums): the
    # masks are regenerated from the seed, the frozen base is the caller's storage
    assert len(sd) == 2 * n_adapters + 1 and "capaboost_header" in sd
    fresh = _transform(tiny_llama(), capture)
    result = fresh.load_state_dict(sd)  # strict: the frozen base is not "missing"
    assert not result.missing_keys and not result.unexpected_keys
    for a, b in zip(cbx.adapters(tm).values(), cbx.adapters(fresh).values(), strict=True):
        assert torch.equal(a.B, b.B)
    # a trainable head is saved too (a private copy, not the caller's tensor)
    tm2 = cbx.transform(model, cbx.Spec(targets=["*.q_proj"], rank=2, trainable=["lm_head"]),
                        example_kwargs={"input_ids": torch.randint(2, 97, (2, 8))},
                        capture=capture)
    assert "wrapped.lm_head.weight" in tm2.state_dict()


@pytest.mark.parametrize("capture", PATHS)
def test_save_pretrained_and_load_adapter_from_the_directory(capture, tmp_path) -> None:
    model = tiny_llama()
    tm = _transform(model, capture).eval()
    tm.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["capaboost_adapter.safetensors"]
    ids = torch.randint(2, 97, (2, 6))
    back = cbx.load_adapter(tiny_llama(), tmp_path / "adapter",
                            example_kwargs={"input_ids": ids}, capture=capture).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, tm(input_ids=ids).logits)


def test_gradient_checkpointing_enable_checkpoints_every_block() -> None:
    tm = _transform(tiny_llama(), "graph")
    assert not tm.is_gradient_checkpointing
    tm.gradient_checkpointing_enable()
    assert tm.is_gradient_checkpointing
    assert tm.blocks() and all(b.checkpoint for b in tm.blocks().values())
    tm.gradient_checkpointing_disable()
    assert not any(b.checkpoint for b in tm.blocks().values())
    eager = _transform(tiny_llama(), "eager")
    eager.gradient_checkpointing_enable()
    assert eager.wrapped.is_gradient_checkpointing
    eager.train()
    ids = torch.randint(2, 97, (2, 8))
    eager(input_ids=ids, labels=ids).loss.backward()
    assert all(a.A.grad is not None for a in cbx.adapters(eager).values())


def test_print_trainable_parameters_counts_live_entries(capsys) -> None:
    tm = _transform(tiny_llama(), "graph")
    tm.print_trainable_parameters()
    text = capsys.readouterr().out
    adapters = cbx.adapters(tm).values()
    trainable = sum(a.A.numel() + a.B.numel() for a in adapters)
    live = sum(int(a.mask_A.any(0).sum() + a.mask_B.any(0).sum()) for a in adapters)
    assert f"trainable params: {trainable:,}" in text and f"live params: {live:,}" in text
    assert tm.get_nb_trainable_parameters()[0] == trainable


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_an_fp32_base_without_capturing_inside_it(dtype) -> None:
    """Graph path under torch.autocast(bf16) equals the eager path (the model as it runs),
    for a decoder and an encoder; the graph for autocast is captured on the first such call."""
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=2))
    ids = torch.randint(2, 97, (2, 8))
    cases = [(tiny_llama(), SPEC, {"input_ids": ids, "labels": ids}),
             (bert, cbx.Spec(targets=["*.query", "*.value"], rank=4),
              {"input_ids": ids, "labels": torch.tensor([0, 1])})]
    for model, spec, batch in cases:
        losses = {}
        for capture in PATHS:
            tm = cbx.transform(model, spec, example_kwargs=batch, capture=capture)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for a in cbx.adapters(tm).values():
                    a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.3)
            tm.train()
            with torch.autocast("cpu", dtype=dtype):
                out = tm(**batch)
            assert out.logits.dtype == dtype
            out.loss.backward()
            assert all(a.A.grad is not None and a.A.grad.dtype == torch.float32
                       for a in cbx.adapters(tm).values())
            tm.eval()  # dropout off: the two paths compare exactly
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                losses[capture] = tm(**batch).loss.float()
            with torch.no_grad():
                fp32 = tm(**batch).logits  # and back to fp32: the first graph again
            assert fp32.dtype == torch.float32
        torch.testing.assert_close(losses["graph"], losses["eager"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("capture", PATHS)
def test_non_tensor_keywords_on_every_entry_point(capture, tmp_path) -> None:
    """use_cache=False, return_dict=True, output_hidden_states=False: transform, calls, fold,
    export_onnx (the most common call of a decoder)."""
    model = tiny_llama()
    ids = torch.randint(2, 97, (2, 8))
    flags = {"use_cache": False, "return_dict": True}
    tm = cbx.transform(model, SPEC, example_inputs=(ids,), example_kwargs=flags,
                       capture=capture)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.3)
    tm.eval()
    with torch.no_grad():
        out = tm(ids, **flags, output_hidden_states=False)
        assert out.past_key_values is None
        folded = cbx.fold(tm, (ids,), flags)
        torch.testing.assert_close(folded(ids, **flags).logits, out.logits)
        assert (out.logits - model(ids).logits).abs().max() > 1e-3
    report = cbx.export_onnx(folded, tmp_path / "m.onnx", example_inputs=(ids,),
                             example_kwargs=flags)
    assert report.max_abs_diff < 1e-4


def test_peft_style_target_suffix_suggests_the_glob() -> None:
    with pytest.raises(cbx.TargetNotFoundError, match=r"Did you mean '\*\.q_proj'"):
        cbx.transform(tiny_llama(), cbx.Spec(targets=["q_proj"], rank=2),
                      example_kwargs={"input_ids": torch.randint(2, 97, (2, 8))})
    with pytest.raises(cbx.TargetNotFoundError, match=r"Did you mean '\*\.q_proj'"):
        cbx.transform(tiny_llama(), cbx.Spec(targets=["q_proj"], rank=2), capture="eager")
