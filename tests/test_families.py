"""Families users try beyond the core list: transform, a training step, eval, fold parity, and
calls whose argument structure differs from the example (no labels, positional)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import capaboost_fx as cbx


def _distilbert():
    cfg = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4,
                                        hidden_dim=64, num_labels=2)
    return transformers.DistilBertForSequenceClassification(cfg), ["*.q_lin", "*.v_lin"], "cls"


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.Qwen2ForCausalLM(cfg), ["*.q_proj", "*.v_proj"], "lm"


def _mistral():
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2)
    return transformers.MistralForCausalLM(cfg), ["*.q_proj", "*.v_proj"], "lm"


def _bart():
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(cfg), ["*.q_proj", "*.v_proj"], "seq2seq"


FAMILIES = {"distilbert": _distilbert, "qwen2": _qwen2, "mistral": _mistral, "bart": _bart}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_folds_and_takes_other_call_structures(family: str) -> None:
    torch.manual_seed(0)
    model, targets, kind = FAMILIES[family]()
    ids = torch.randint(3, 64, (2, 10))
    labels = torch.randint(0, 2, (2,)) if kind == "cls" else torch.randint(3, 64, (2, 10))
    tm = cbx.transform(model, cbx.Spec(targets=targets, rank=2),
                       example_kwargs={"input_ids": ids, "labels": labels})
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.3)
    tm.train()
    tm(input_ids=ids, labels=labels).loss.backward()
    assert all(a.A.grad is not None for a in cbx.adapters(tm).values())
    tm.eval()
    other = torch.randint(3, 64, (3, 7))
    with torch.no_grad():
        extra = {"decoder_input_ids": other} if kind == "seq2seq" else {}
        ours = tm(input_ids=other, **extra).logits  # a structure not seen at transform
        base = model.eval()(input_ids=other, **extra).logits
        assert (ours - base).abs().max() > 1e-4  # the adapters act
        deploy = cbx.fold(tm)
        torch.testing.assert_close(deploy(input_ids=other, **extra).logits, ours,
                                   rtol=1e-4, atol=1e-5)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("build,x,targets", [
    (CNN, torch.randn(4, 3, 8, 8), ["fc1", "fc2"]),
    (MHA, torch.randn(3, 5, 16), ["attn.in_proj_weight", "attn.out_proj"]),
])
def test_plain_modules(build, x, targets) -> None:
    torch.manual_seed(0)
    model = build().train()
    tm = cbx.transform(model, cbx.Spec(targets=targets, rank=2), example_inputs=(x,))
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.3)
    tm(x).sum().backward()
    tm.eval()
    with torch.no_grad():
        torch.testing.assert_close(cbx.fold(tm)(x), tm(x), rtol=1e-5, atol=1e-6)


def test_whisper_encoder_decoder_with_audio_features() -> None:
    cfg = transformers.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=8,
                                     max_source_positions=16, max_target_positions=32,
                                     pad_token_id=0, decoder_start_token_id=1)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    feats = torch.randn(2, 8, 32)  # (batch, mel bins, 2 x max_source_positions frames)
    dec = torch.randint(2, 64, (2, 5))
    tm = cbx.transform(model, cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=2),
                       example_kwargs={"input_features": feats, "decoder_input_ids": dec,
                                       "labels": dec})
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.3)
    tm.train()
    tm(input_features=feats, decoder_input_ids=dec, labels=dec).loss.backward()
    tm.eval()
    with torch.no_grad():
        ours = tm(input_features=feats, decoder_input_ids=dec[:, :3]).logits  # no labels
        assert (ours - model(input_features=feats, decoder_input_ids=dec[:, :3]).logits
                ).abs().max() > 1e-4
        torch.testing.assert_close(cbx.fold(tm)(input_features=feats,
                                                decoder_input_ids=dec[:, :3]).logits,
                                   ours, rtol=1e-4, atol=1e-5)


def test_data_dependent_loss_code_gets_a_hint_about_labels() -> None:
    cfg = transformers.DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64)
    model = transformers.DebertaV2ForSequenceClassification(cfg)
    ids = torch.randint(3, 60, (2, 9))
    labels = torch.tensor([0, 1])
    with pytest.raises(cbx.CaptureError, match="capture without labels"):
        cbx.transform(model, cbx.Spec(targets=["*.query_proj"], rank=2),
                      example_kwargs={"input_ids": ids, "labels": labels}, capture="graph")
    tm = cbx.transform(model, cbx.Spec(targets=["*.query_proj"], rank=2),
                       example_kwargs={"input_ids": ids})  # as the hint says: works
    assert tm(input_ids=ids).logits.shape == (2, 2)
    # By default the model is trained eagerly instead, labels and all, with a warning.
    with pytest.warns(cbx.CapaBoostWarning, match="trains it eagerly"):
        eager = cbx.transform(model, cbx.Spec(targets=["*.query_proj"], rank=2),
                              example_kwargs={"input_ids": ids, "labels": labels})
    assert eager.capture_info.capture == "eager" and "data-dependent" in eager.capture_info.eager_reason
    eager.train()
    eager(input_ids=ids, labels=labels).loss.backward()
    assert all(a.A.grad is not None for a in cbx.adapters(eager).values())


class RecordsOnFirstCall(nn.Module):
    """Installs output-recording hooks on its first call and marks itself, as transformers'
    ``maybe_install_capturing_hooks`` does; pairs what was recorded with its heads by zip, as
    Segformer's decode head pairs ``hidden_states`` with its projections."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 4), nn.Linear(8, 4)])

    def _record(self, module, args, output) -> None:
        self._seen.append(output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "_hooks_installed", False):
            for layer in (self.a, self.b):
                layer.register_forward_hook(self._record)
            self._hooks_installed = True
        self._seen = []
        self.b(torch.relu(self.a(x)))
        return sum(head(h) for head, h in zip(self.heads, self._seen, strict=False))


def test_hooks_a_forward_installs_while_captured_are_undone_with_their_flag() -> None:
    """Each capture (train, eval) starts from the module as it was: the hooks its first call
    installed do not pile up (doubled, the eval graph paired head 1 with layer a's output)."""
    torch.manual_seed(0)
    model = RecordsOnFirstCall()
    x = torch.randn(3, 8)
    tm = cbx.transform(model, cbx.Spec(targets=["a", "b"], rank=2), example_inputs=(x,),
                       capture="graph")
    assert not getattr(tm.executor.twin, "_hooks_installed", False)
    assert all(not m._forward_hooks for m in tm.executor.twin.modules())
    with torch.no_grad():
        want = model.eval()(x)  # B = 0: the adapters add nothing yet
        for mode in ("train", "eval"):
            getattr(tm, mode)()
            torch.testing.assert_close(tm(x), want)
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.3)
        tm.eval()
        torch.testing.assert_close(cbx.fold(tm)(x), tm(x), rtol=1e-5, atol=1e-6)


def test_segformer_captures_trains_and_folds() -> None:
    """Segformer's decode head reads ``hidden_states`` that transformers' output-recording
    hooks collect: it took the eager fallback (train-mode capture failed with a shape error)."""
    cfg = transformers.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1],
                                       sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                       patch_sizes=[3, 3], strides=[2, 2],
                                       num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                       decoder_hidden_size=32)
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    tm = cbx.transform(model, cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=2),
                       example_kwargs={"pixel_values": x})
    assert tm.capture_info.capture == "graph"
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.normal_(0, 0.3)
    tm.train()
    tm(pixel_values=torch.randn(3, 3, 16, 16)).logits.pow(2).mean().backward()
    assert all(a.A.grad is not None for a in cbx.adapters(tm).values())
    tm.eval()
    with torch.no_grad():
        ours = tm(pixel_values=x).logits
        assert (ours - model(pixel_values=x).logits).abs().max() > 1e-5
        torch.testing.assert_close(cbx.fold(tm)(pixel_values=x).logits, ours,
                                   rtol=1e-4, atol=1e-5)
