"""Small local models for the tests: one `Case` per model family, as data.

Each case builds a model with random weights, example inputs, a second batch whose batch size
and sequence length differ from the example, the spec to apply, and a scalar loss. `layouts`
says how each target's weight is stored, written from knowledge of the model (not from the
library), so references built from it are independent of the code under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import capaboost_fx as cbx


class FunctionalNet(nn.Module):
    """Linear ops without nn.Linear: F.linear on a parameter and x @ W with W stored in x out."""

    def __init__(self, d_in: int = 12, hidden: int = 20, d_out: int = 6) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, d_in) / d_in**0.5)
        self.b1 = nn.Parameter(torch.randn(hidden) * 0.1)
        self.proj = nn.Parameter(torch.randn(hidden, d_out) / hidden**0.5)  # in x out
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, self.w1, self.b1))
        return self.drop(h) @ self.proj


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class SharedLinearNet(nn.Module):
    """One nn.Linear called twice: one weight, one adapter, two rewritten ops."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.shared(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.shared(h)))


def _ids(vocab: int, b: int, s: int) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s))


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple[tuple, dict]]  # (batch, seq) -> (args, kwargs)
    spec: cbx.Spec
    layouts: dict[str, str] = field(default_factory=dict)  # target -> "in_out" if stored in x out
    has_dropout: bool = True
    example: tuple[int, int] = (3, 7)
    other: tuple[int, int] = (5, 11)

    def loss(self, out: Any) -> torch.Tensor:
        y = _first(out)
        return (y.float() ** 2).mean() if not y.is_floating_point() else y.pow(2).mean()


def _hf(cls_name: str, config_name: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**cfg)
        return getattr(transformers, cls_name)(config)

    return build


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

CASES = [
    Case(
        "mlp",
        lambda: nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Dropout(0.2), nn.Linear(24, 5)),
        lambda b, s: ((torch.randn(b, s, 12),), {}),
        cbx.Spec(targets=["0", "3"], rank=4, num_masks=2, density=0.5),
    ),
    Case(
        "functional",
        FunctionalNet,
        lambda b, s: ((torch.randn(b, s, 12),), {}),
        cbx.Spec(targets=["w1", "proj"], rank=3, num_masks=3, density=0.5),
        layouts={"proj": "in_out"},
    ),
    Case(
        "transformer_encoder",
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True), 2
        ),
        lambda b, s: ((torch.randn(b, s, 16),), {}),
        cbx.Spec(targets=["*.self_attn.in_proj_weight", "*.out_proj", "*.linear1"], rank=4),
    ),
    Case(
        "bert",
        _hf("BertForSequenceClassification", "BertConfig", vocab_size=99, num_labels=3, **TINY),
        lambda b, s: ((), {"input_ids": _ids(99, b, s),
                           "attention_mask": torch.ones(b, s, dtype=torch.long)}),
        cbx.Spec(targets=["*.query", "*.value"], rank=4, trainable=["classifier"]),
    ),
    Case(
        "roberta",
        _hf("RobertaForSequenceClassification", "RobertaConfig", vocab_size=99, num_labels=2,
            max_position_embeddings=64, **TINY),
        lambda b, s: ((_ids(96, b, s) + 3,), {}),
        cbx.Spec(targets=["*.query", "*.value"], rank=4, trainable=["classifier"]),
    ),
    Case(
        "gpt2",
        _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=99, n_embd=32, n_layer=2, n_head=4,
            n_positions=64, bos_token_id=0, eos_token_id=0),
        lambda b, s: ((_ids(99, b, s),), {}),
        cbx.Spec(targets=["*.attn.c_attn", "*.mlp.c_fc"], rank=4),
        layouts={f"transformer.h.{i}.{m}": "in_out" for i in range(2)
                 for m in ("attn.c_attn", "mlp.c_fc")},
    ),
    Case(
        "llama",
        _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=99, num_key_value_heads=2,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            attention_dropout=0.1, **TINY),
        lambda b, s: ((_ids(99, b, s),), {}),
        cbx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], rank=4),
    ),
    Case(
        "vit",
        _hf("ViTForImageClassification", "ViTConfig", image_size=16, patch_size=4,
            num_channels=3, num_labels=3, hidden_dropout_prob=0.1, **TINY),
        lambda b, s: ((torch.randn(b, 3, 16, 16),), {}),
        cbx.Spec(targets=["*.q_proj", "*.v_proj"], rank=4, trainable=["classifier"]),
        example=(3, 3),
        other=(5, 3),
    ),
]

CASE_IDS = [c.name for c in CASES]


def to_dtype(inputs: tuple[tuple, dict], dtype: torch.dtype) -> tuple[tuple, dict]:
    def conv(t):
        return (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t)
    args, kwargs = inputs
    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


def first_tensor(out: Any) -> torch.Tensor:
    return _first(out)


def reference_delta(adapter: Any) -> torch.Tensor:
    """s · Σ_i (B ⊙ M^B_i)(A ⊙ M^A_i), out × in, one masked copy at a time in float64: written
    from the paper's formula, not from the library's stacked factors or delta_weights."""
    total = torch.zeros(adapter.B.shape[0], adapter.A.shape[1], dtype=torch.float64)
    for i in range(adapter.mask_A.shape[0]):
        b = adapter.B.detach().double() * adapter.mask_B[i]
        a = adapter.A.detach().double() * adapter.mask_A[i]
        total += b @ a
    return adapter.scaling * total


def qwen2_moe_config(**changes: Any) -> Any:
    """A tiny Qwen2-MoE config (4 experts, 2 per token, stacked expert weights); `changes`
    override its fields."""
    import transformers

    fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                  shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=64, use_cache=False)
    return transformers.Qwen2MoeConfig(**{**fields, **changes})
