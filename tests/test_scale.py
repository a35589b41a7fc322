"""LLM scale: no copy of frozen weights, activation checkpointing, meta-device models."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint

import capaboost_fx as cbx


def tiny_llama(layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


SPEC = cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, num_masks=2, density=0.5, seed=3)


def _nonzero(tm: nn.Module) -> None:
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.2)


def test_training_module_shares_frozen_storage_and_fold_copies_only_targets() -> None:
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = torch.randint(0, 96, (2, 8))
    tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    base = dict(tm.wrapped.named_parameters())
    for n, p in model.named_parameters():
        assert base[n].data_ptr() == p.data_ptr(), n  # same storage, no copy
        assert base[n] is not p and not base[n].requires_grad
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    _nonzero(tm)
    deploy = cbx.fold(tm)
    targets = {a.weight_fqn for a in cbx.adapters(tm).values()}
    merged = cbx.merged_state_dict(tm)
    for n, p in deploy.wrapped.named_parameters():
        if n in targets:
            assert p.data_ptr() != ptrs[n] and not torch.equal(p, model.get_parameter(n))
            assert merged[n].data_ptr() != ptrs[n]
        else:
            assert p.data_ptr() == ptrs[n], n
            assert merged[n].data_ptr() == ptrs[n], n
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


def _loss_and_grads(tm: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    tm.train()
    tm.zero_grad()
    loss = tm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tm.named_parameters() if p.requires_grad}


def _saved_bytes(fn) -> int:
    """Bytes of tensors autograd keeps for backward during `fn()` (activation memory)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_hf_gradient_checkpointing_is_kept_per_block_with_same_loss_and_grads() -> None:
    ids = torch.randint(0, 96, (4, 32))
    plain = tiny_llama(4)
    tm_plain = cbx.transform(plain, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    ck_model = tiny_llama(4)
    ck_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tm_ck = cbx.transform(ck_model, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    assert tm_ck.capture_info.checkpointed == [f"model.layers.{i}" for i in range(4)]
    assert all(b.checkpoint for b in tm_ck.blocks().values())
    assert not any(b.checkpoint for b in tm_plain.blocks().values())
    for tm in (tm_plain, tm_ck):
        _nonzero(tm)
    tm_ck.load_state_dict(tm_plain.state_dict())
    loss_p, grads_p = _loss_and_grads(tm_plain, ids)
    loss_c, grads_c = _loss_and_grads(tm_ck, ids)
    torch.testing.assert_close(loss_c, loss_p, rtol=0, atol=1e-6)
    assert grads_p.keys() == grads_c.keys() and grads_p
    for n in grads_p:
        torch.testing.assert_close(grads_c[n], grads_p[n], rtol=1e-5, atol=1e-6)
    tm_plain.train()
    tm_ck.train()
    full, _ = _saved_bytes(lambda: tm_plain(input_ids=ids, labels=ids).loss)
    kept, _ = _saved_bytes(lambda: tm_ck(input_ids=ids, labels=ids).loss)
    assert kept < 0.5 * full, (kept, full)


def test_checkpointed_activation_memory_close_to_peft() -> None:
    import peft
    ids = torch.randint(0, 96, (4, 32))
    model = tiny_llama(4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    tm.train()
    pm.train()
    ours, _ = _saved_bytes(lambda: tm(input_ids=ids, labels=ids).loss)
    theirs, _ = _saved_bytes(lambda: pm(input_ids=ids, labels=ids).loss)
    print(f"\nsaved activations with checkpointing: capaboost_fx {ours} B, PEFT {theirs} B, "
          f"ratio {ours / theirs:.3f}")
    assert ours <= 1.10 * theirs


class UserBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + checkpoint(self.inner, x, use_reentrant=False)


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([UserBlock() for _ in range(3)])
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_user_torch_utils_checkpoint_and_checkpoint_by_pattern() -> None:
    torch.manual_seed(0)
    net = UserNet()
    x = torch.randn(6, 5, 16)
    tm = cbx.transform(net, cbx.Spec(targets=["*.fc1"], rank=2), example_inputs=(x,))
    assert tm.capture_info.checkpointed == ["layers.0", "layers.1", "layers.2"]
    plain = cbx.transform(net, cbx.Spec(targets=["*.fc1"], rank=2), example_inputs=(x,),
                          blocks=None)
    # blocks=None: no automatic blocks, but the model's own checkpointing is kept per block.
    assert set(plain.blocks()) == {"layers.0", "layers.1", "layers.2"}
    by_pattern = cbx.transform(net, cbx.Spec(targets=["*.fc1"], rank=2), example_inputs=(x,),
                               checkpoint=["layers.1"])
    assert by_pattern.blocks()["layers.1"].checkpoint
    for m in (tm, plain, by_pattern):
        _nonzero(m)
        m.load_state_dict(tm.state_dict())
    outs = []
    for m in (tm, plain, by_pattern):
        m.train()
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), [a.A.grad.clone() for a in cbx.adapters(m).values()]))
    for y, g in outs[1:]:
        torch.testing.assert_close(y, outs[0][0])
        for a, b in zip(g, outs[0][1], strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(cbx.TargetNotFoundError, match="names no module"):
        cbx.transform(net, cbx.Spec(targets=["*.fc1"], rank=2), example_inputs=(x,),
                      checkpoint=["blocks.*"])


def test_meta_model_loads_weights_from_shards_bf16_base_fp32_adapters(tmp_path) -> None:
    import accelerate
    real = tiny_llama(2, torch.bfloat16)
    real.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # really sharded
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(real.config).to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 8))
    tm = cbx.transform(empty, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    assert any(p.is_meta for p in tm.wrapped.parameters())
    with pytest.raises(cbx.CapaBoostError, match="meta"):
        cbx.fold(tm)
    with pytest.raises(cbx.CapaBoostError, match="load_base_weights"):
        tm(input_ids=ids, labels=ids)
    report = cbx.load_base_weights(tm, tmp_path)
    assert report["loaded"] > 0 and not report["unexpected"]
    assert not any(p.is_meta for p in tm.parameters())
    assert all(a.A.dtype == torch.float32 for a in cbx.adapters(tm).values())
    assert tm.wrapped.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = cbx.transform(real, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    _nonzero(ref)
    tm.load_state_dict({k: v for k, v in ref.state_dict().items() if "capaboost" in k},
                       strict=False)
    tm.train()
    ref.train()
    torch.testing.assert_close(tm(input_ids=ids, labels=ids).loss,
                               ref(input_ids=ids, labels=ids).loss)
    loss = tm(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(a.B.grad is not None for a in cbx.adapters(tm).values())
    deploy = cbx.fold(tm)
    tm.eval()
    with torch.no_grad():
        torch.testing.assert_close(deploy(input_ids=ids).logits.float(),
                                   tm(input_ids=ids).logits.float(), atol=0.05, rtol=0.05)


def test_call_like_the_model_new_argument_structures() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 8))
    tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    _nonzero(tm)
    tm.eval()
    with torch.no_grad():
        a = tm(input_ids=ids).logits  # no labels: captured on first use
        b = tm(ids).logits  # positional
        c = tm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # one more key
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    deploy = cbx.fold(tm, example_kwargs={"input_ids": ids})
    with torch.no_grad():
        torch.testing.assert_close(deploy(input_ids=ids).logits, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(deploy(ids).logits, a, atol=1e-5, rtol=1e-5)


def test_t5_trains_without_extra_arguments_and_noncontiguous_example() -> None:
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(cfg)
    big = torch.randint(0, 64, (4, 40))
    ids, labels = big[:2, :16], big[2:, 20:28]  # views: non-contiguous example inputs
    tm = cbx.transform(t5, cbx.Spec(targets=["*.q", "*.v"], rank=2),
                       example_kwargs={"input_ids": ids, "labels": labels})
    _nonzero(tm)
    tm.train()
    loss = tm(input_ids=big[:3, :12], labels=big[1:4, 5:11]).loss
    loss.backward()
    assert torch.isfinite(loss)
    tm.eval()
    ref = cbx.fold(tm)
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids, labels=labels).logits,
                                   tm(input_ids=ids, labels=labels).logits)


def test_modules_refuse_pickling_in_words(tmp_path) -> None:
    tm = cbx.transform(tiny_llama(), SPEC, example_kwargs={"input_ids": torch.randint(0, 96, (2, 8))})
    with pytest.raises(cbx.CapaBoostError, match="save_adapter"):
        torch.save(tm, tmp_path / "tm.pt")
    copy.deepcopy(tm)  # deepcopy still works


def test_a_different_flag_value_is_another_capture_not_a_shape_error() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 8))
    tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids,
                                                    "output_hidden_states": False})
    tm.eval()
    with torch.no_grad():
        out = tm(input_ids=ids, output_hidden_states=True)
        ref = model.eval()(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    torch.testing.assert_close(out.logits, ref.logits)  # B = 0: equal to the base


def test_deploy_base_model_is_the_users_class_and_generates() -> None:
    model = tiny_llama()
    model.config.use_cache = True
    ids = torch.randint(0, 96, (2, 8))
    tm = cbx.transform(model, SPEC, example_kwargs={"input_ids": ids, "labels": ids})
    _nonzero(tm)
    deploy = cbx.fold(tm)
    assert type(deploy.get_base_model()) is type(model)
    # One config object, the caller's: capture switched use_cache off only while it ran.
    assert deploy.config is tm.config is model.config and model.config.use_cache is True
    assert tm.generation_model().config.use_cache is True  # generation uses the KV cache
    with torch.no_grad():
        out = deploy.wrapped.generate(ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 11)


def test_a_block_called_twice_is_refused_named_and_kept_flat_when_automatic() -> None:
    """blk(blk(x)) is one contiguous run of ops but two calls: named as a block it is an
    error; found automatically it stays in the root graph (with the reason), still exact."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                [torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(2)])
            self.head = torch.nn.Linear(6, 2)

        def forward(self, x):
            x = self.layers[0](self.layers[0](x))
            return self.head(self.layers[1](x))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(3, 6)
    spec = cbx.Spec(targets=["layers.*.0"], rank=2)
    with pytest.raises(cbx.CaptureError, match="called 2 times"):
        cbx.transform(model, spec, (x,), blocks=["layers.0"])
    tm = cbx.transform(model, spec, (x,))
    assert list(tm.blocks()) == ["layers.1"]
    assert "called 2 times" in tm.capture_info.refused_blocks["layers.0"]
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.3)
        torch.testing.assert_close(cbx.fold(tm)(x), tm.eval()(x))
        assert (tm(x) - model(x)).abs().max() > 1e-3
