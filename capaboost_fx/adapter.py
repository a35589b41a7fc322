"""The CapaBoost adapter: one shared low-rank pair (A, B) used through d static masks.

    delta(x) = s · Σ_i (B ⊙ M^B_i) (A ⊙ M^A_i) drop(x)
             = s · B_cat (A_cat drop(x))

with ``A_cat = [A⊙M^A_1; …; A⊙M^A_d]`` (d·r × in) and ``B_cat = [B⊙M^B_1, …, B⊙M^B_d]``
(out × d·r): one rank-d·r matmul pair, no loop over d. Autograd through the shared A and B
sums the gradients of the d copies by itself.

Parallel adapters (``Spec(method="padapter")``) put an elementwise activation between the
factors (A is the down projection, B the up projection); since it acts entrywise,

    Σ_i up_i(act(down_i x)) = B_cat act(A_cat x)

is still one width-d·r adapter. With ``activation="identity"`` it folds into W0 like LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FoldError, SpecError
from .masks import make_masks, stable_seed
from .spec import ACTIVATIONS, scaling_factor


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t`, gathered first when it is sharded (a ``DTensor``: FSDP2); every rank must call."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class CapaBoostAdapter(nn.Module):
    """The trainable side of one adapted weight ``W0`` (out × in).

    ``forward(x)`` returns only the update ``s · B_cat A_cat x``; the rewritten graph adds it
    to the untouched base op's output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_masks: int,
        density: float,
        alpha: float,
        dropout: float = 0.0,
        mask: str = "random",
        seed: int = 0,
        name: str = "",
        weight_fqn: str = "",
        layout: str = "out_in",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        activation: str = "identity",
        init: str = "standard",
        scaling_rule: str = "paper",
        placement: str = "parallel",
        bias_fqn: str | None = None,
        output_of: str | None = None,
        groups: int = 0,
    ) -> None:
        super().__init__()
        if placement not in ("parallel", "sequential"):
            raise SpecError(f"placement must be 'parallel' or 'sequential', got {placement!r}")
        # "sequential" (Spec.method='sadapter'): the adapter reads the op's output y (so
        # in_features == out_features == the op's out) and has the official code's biases.
        self.placement = placement
        self.bias_fqn = bias_fqn  # the op's bias parameter (a sequential fold updates it)
        self.activation = activation
        self.act = ACTIVATIONS[activation]()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.num_masks, self.density = rank, num_masks, density
        self.init, self.scaling_rule = init, scaling_rule
        self.scaling = scaling_factor(alpha, rank, num_masks, density, scaling_rule)
        self.name = name
        # The adapted weight's parameter name in your model, and how it is stored:
        # "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D: the fold adds ΔWᵀ).
        # A sequential adapter after a module's output (not an op's) adapts no weight.
        self.output_of = output_of
        self.weight_fqn = None if output_of else (
            weight_fqn or (f"{name}.weight" if name else "weight"))
        if layout not in ("out_in", "in_out", "param"):
            raise SpecError(f"adapter layout must be 'out_in', 'in_out' or 'param', got {layout!r}")
        self.layout = layout
        # groups > 0: a parameter of `groups` stacked matrices (MoE experts: experts × out × in),
        # one (A, B) pair and its own masks per matrix; forward(W) returns ΔW for all of them.
        self.groups = groups
        lead = (groups,) if groups else ()
        self.A = nn.Parameter(torch.empty(*lead, rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(*lead, out_features, rank, dtype=dtype, device=device))
        # A from a local generator (reproducible); B = 0, so the adapted model equals the base
        # model at step 0. "standard": kaiming-uniform over A's fan-in `in`, U(±1/√in), as
        # loralib/PEFT. "official": the official CapaBoost code holds A as nn.Linear(r, in).weight
        # (in × r, fan-in r) and kaiming-uniforms that, which is U(±1/√r).
        gen = torch.Generator().manual_seed(stable_seed(seed, name, "init"))
        a0 = torch.empty(*lead, rank, in_features, dtype=torch.float32)
        if init == "standard":  # U(±1/√in) on each matrix (what kaiming_uniform gives one)
            bound = 1.0 / math.sqrt(in_features)
            if groups:
                a0.uniform_(-bound, bound, generator=gen)
            else:
                nn.init.kaiming_uniform_(a0, a=math.sqrt(5), generator=gen)
        elif init == "official":
            bound = 1.0 / math.sqrt(rank)
            a0.uniform_(-bound, bound, generator=gen)
        else:
            raise SpecError(f"unknown init {init!r}; allowed: 'standard', 'official'")
        with torch.no_grad():
            self.A.copy_(a0)
        if placement == "sequential":
            # Biases are never masked; every copy adds its own b_u (effective d·b_u).
            self.bias_down = nn.Parameter(torch.zeros(rank, dtype=dtype, device=device))
            self.bias_up = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
            if init == "official":  # official adapters: N(0, 0.02) weights, up not zeroed
                g = torch.Generator().manual_seed(stable_seed(seed, name, "init-official"))
                with torch.no_grad():
                    self.A.copy_(torch.randn(rank, in_features, generator=g) * 0.02)
                    self.B.copy_(torch.randn(out_features, rank, generator=g) * 0.02)
        def masks(shape: tuple[int, int], factor: str) -> torch.Tensor:
            if not groups:
                return make_masks(mask, shape, num_masks, density, seed, name, factor)
            return torch.stack([make_masks(mask, shape, num_masks, density, seed,
                                           f"{name}/{g}", factor) for g in range(groups)])

        self.register_buffer("mask_A", masks((rank, in_features), "A").to(device))
        self.register_buffer("mask_B", masks((out_features, rank), "B").to(device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # False inside ``train_model.disable_adapter()``: the update is zero (the base model runs)
        self.enabled = True

    def factors(self, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat: d·r × in, B_cat: out × d·r), the masked copies stacked. ``whole``: from
        the gathered tensors when A and B are sharded (FSDP2's DTensors), for the fold."""
        d, r = self.num_masks, self.rank
        a, b = (whole_tensor(self.A), whole_tensor(self.B)) if whole else (self.A, self.B)
        lead = (self.groups,) if self.groups else ()
        a_cat = (a.unsqueeze(-3) * self.mask_A).reshape(*lead, d * r, self.in_features)
        b_cat = (b.unsqueeze(-3) * self.mask_B).transpose(-3, -2).reshape(
            *lead, self.out_features, d * r)
        return a_cat, b_cat

    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(down bias repeated for the d copies: d·r, up bias counted d times: out), or Nones."""
        if self.placement != "sequential":
            return None, None
        return self.bias_down.repeat(self.num_masks), self.bias_up * self.num_masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "param":  # x is the stacked weight W itself: return ΔW
            if not self.enabled:
                return torch.zeros_like(x)
            a_cat, b_cat = self.factors()
            return ((b_cat @ a_cat) * self.scaling).to(x.dtype)
        if not self.enabled:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        a_cat, b_cat = self.factors()
        b_down, b_up = self.biases()
        h = self.dropout(x).to(a_cat.dtype)
        out = F.linear(self.act(F.linear(h, a_cat, b_down)), b_cat, b_up)
        return (out * self.scaling).to(x.dtype)

    @property
    def linear(self) -> bool:
        """True when the update is a weight delta ΔW (parallel, identity activation)."""
        return self.activation == "identity" and self.placement == "parallel"

    @property
    def sequential(self) -> bool:
        return self.placement == "sequential"

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = s · B_cat A_cat (out × in) computed in `dtype` (identity activation only; for
        a sequential adapter this is M in y + M y + c)."""
        if self.activation != "identity":
            raise FoldError(f"adapter {self.name!r} has a {self.activation} activation: its "
                             "update is not a weight delta")
        a_cat, b_cat = self.factors(whole=True)
        return (b_cat.to(dtype) @ a_cat.to(dtype)) * self.scaling

    def num_trainable(self) -> int:
        """Entries of A and B (and a sequential adapter's biases): what the optimizer holds."""
        return sum(p.numel() for p in self.parameters())

    def num_live(self) -> int:
        """Entries kept by at least one mask (the rest never get gradient); biases are live."""
        biases = sum(p.numel() for n, p in self.named_parameters() if n.startswith("bias"))
        return int(self.mask_A.any(-3).sum()) + int(self.mask_B.any(-3).sum()) + biases

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, "
            f"d={self.num_masks}, density={self.density}, scaling={self.scaling:g}"
            + (f", init={self.init}" if self.init != "standard" else "")
            + (f", activation={self.activation}" if self.activation != "identity" else "")
            + (", sequential" if self.sequential else "")
            + (f", after module {self.output_of!r}" if self.output_of else "")
            + (f", groups={self.groups}" if self.groups else "")
        )


class DenseAdapter(nn.Module):
    """A folded parallel adapter: ``s · up(act(down x))`` with dense down (d·r × in) and up
    (out × d·r), what a nonlinear CapaBoost parallel adapter folds to (no masks, no loop)."""

    def __init__(self, adapter: CapaBoostAdapter) -> None:
        super().__init__()
        a_cat, b_cat = adapter.factors()
        self.down = nn.Parameter(a_cat.detach().clone(), requires_grad=False)
        self.up = nn.Parameter(b_cat.detach().clone(), requires_grad=False)
        self.act = ACTIVATIONS[adapter.activation]()
        self.scaling = adapter.scaling
        b_down, b_up = adapter.biases()
        self.down_bias = None if b_down is None else nn.Parameter(
            b_down.detach().clone(), requires_grad=False)
        self.up_bias = None if b_up is None else nn.Parameter(
            b_up.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.dtype)
        out = F.linear(self.act(F.linear(h, self.down, self.down_bias)), self.up, self.up_bias)
        return (out * self.scaling).to(x.dtype)
