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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FoldError, SpecError
from .masks import make_masks, stable_seed
from .spec import ACTIVATIONS, Spec, scaling_factor


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t`, gathered first when it is sharded (a ``DTensor``: FSDP2); every rank must call."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@dataclass(frozen=True)
class AdapterSite:
    """What an adapter adapts: the matched weight's shape and names (or the module whose output
    a sequential adapter follows). ``match`` finds these; `CapaBoostAdapter` is built on one."""

    in_features: int
    out_features: int
    name: str = ""  # the target's name (also the masks' and init's seed salt)
    weight_fqn: str = ""  # the adapted weight's parameter name in your model
    layout: str = "out_in"  # "out_in" (nn.Linear), "in_out" (GPT-2 Conv1D), "param" (experts)
    bias_fqn: str | None = None  # the op's bias (a sequential fold updates it)
    output_of: str | None = None  # a sequential adapter after this module's output
    groups: int = 0  # > 0: `groups` stacked matrices (MoE experts: experts × out × in)


def _initial_a(site: AdapterSite, rank: int, in_features: int, init: str,
               seed: int) -> torch.Tensor:
    """A from a local generator (reproducible). "standard": kaiming-uniform over A's fan-in
    `in`, U(±1/√in), as loralib/PEFT. "official": the official CapaBoost code holds A as
    nn.Linear(r, in).weight (in × r, fan-in r) and kaiming-uniforms that, which is U(±1/√r)."""
    gen = torch.Generator().manual_seed(stable_seed(seed, site.name, "init"))
    lead = (site.groups,) if site.groups else ()
    a0 = torch.empty(*lead, rank, in_features, dtype=torch.float32)
    if init == "standard":  # U(±1/√in) on each matrix (what kaiming_uniform gives one)
        if site.groups:
            bound = 1.0 / math.sqrt(in_features)
            a0.uniform_(-bound, bound, generator=gen)
        else:
            nn.init.kaiming_uniform_(a0, a=math.sqrt(5), generator=gen)
    elif init == "official":
        bound = 1.0 / math.sqrt(rank)
        a0.uniform_(-bound, bound, generator=gen)
    else:
        raise SpecError(f"unknown init {init!r}; allowed: 'standard', 'official'")
    return a0


class CapaBoostAdapter(nn.Module):
    """The trainable side of one adapted weight ``W0`` (out × in).

    Built from its site and its target's `Spec` (``spec.for_target(name)``: rank, masks,
    density, alpha, dropout, mask kind, seed, activation, init, scaling, method).
    ``forward(x)`` returns only the update ``s · B_cat A_cat x``; the rewritten graph adds it
    to the untouched base op's output.

    Example::

        >>> site = AdapterSite(64, 32, name="layer.query", weight_fqn="layer.query.weight")
        >>> a = CapaBoostAdapter(site, Spec(targets=["*.query"], rank=8, num_masks=2))
        >>> tuple(a.A.shape), tuple(a.B.shape), a.num_masks
        ((8, 64), (32, 8), 2)
    """

    def __init__(self, site: AdapterSite, spec: Spec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if site.layout not in ("out_in", "in_out", "param"):
            raise SpecError("adapter layout must be 'out_in', 'in_out' or 'param', got "
                            f"{site.layout!r}")
        # Half-precision bases train fp32 adapters (the update is cast back to the op's dtype).
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        # "sequential" (Spec.method='sadapter'): the adapter reads the op's output y (so
        # in_features == out_features == the op's out) and has the official code's biases.
        self.placement = "sequential" if spec.method == "sadapter" else "parallel"
        self.site = site
        self.name, self.layout, self.groups = site.name, site.layout, site.groups
        self.bias_fqn, self.output_of = site.bias_fqn, site.output_of
        # A sequential adapter after a module's output (not an op's) adapts no weight.
        self.weight_fqn = None if site.output_of else (
            site.weight_fqn or (f"{site.name}.weight" if site.name else "weight"))
        self.in_features = site.out_features if self.sequential else site.in_features
        self.out_features = site.out_features
        self.rank, self.num_masks, self.density = spec.rank, spec.num_masks, spec.density
        self.init, self.scaling_rule = spec.init, spec.scaling
        self.activation = spec.activation
        self.act = ACTIVATIONS[spec.activation]()
        self.scaling = scaling_factor(spec.alpha, spec.rank, spec.num_masks, spec.density,
                                      spec.scaling)
        lead = (site.groups,) if site.groups else ()
        self.A = nn.Parameter(_initial_a(site, spec.rank, self.in_features, spec.init,
                                         spec.seed).to(dtype=dtype, device=device))
        # B = 0, so the adapted model equals the base model at step 0.
        self.B = nn.Parameter(torch.zeros(*lead, self.out_features, spec.rank, dtype=dtype,
                                          device=device))
        if self.sequential:
            self._sequential_biases(spec.seed, dtype, device)
        self._register_masks(spec, device)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        # False inside ``train_model.disable_adapter()``: the update is zero (the base model runs)
        self.enabled = True

    def _sequential_biases(self, seed: int, dtype: torch.dtype, device: Any) -> None:
        # Biases are never masked; every copy adds its own b_u (effective d·b_u).
        self.bias_down = nn.Parameter(torch.zeros(self.rank, dtype=dtype, device=device))
        self.bias_up = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        if self.init == "official":  # official adapters: N(0, 0.02) weights, up not zeroed
            g = torch.Generator().manual_seed(stable_seed(seed, self.name, "init-official"))
            with torch.no_grad():
                self.A.copy_(torch.randn(self.rank, self.in_features, generator=g) * 0.02)
                self.B.copy_(torch.randn(self.out_features, self.rank, generator=g) * 0.02)

    def _register_masks(self, spec: Spec, device: Any) -> None:
        def masks(shape: tuple[int, int], factor: str) -> torch.Tensor:
            if not self.groups:
                return make_masks(spec.mask, shape, spec.num_masks, spec.density, spec.seed,
                                  self.name, factor)
            return torch.stack([make_masks(spec.mask, shape, spec.num_masks, spec.density,
                                           spec.seed, f"{self.name}/{g}", factor)
                                for g in range(self.groups)])

        # Not in state_dict: regenerated from the spec's seed (a checkpoint carries their
        # checksums; adapter files store them bit-packed).
        self.register_buffer("mask_A", masks((self.rank, self.in_features), "A").to(device),
                             persistent=False)
        self.register_buffer("mask_B", masks((self.out_features, self.rank), "B").to(device),
                             persistent=False)

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

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """The update for input `x`, in the dtype of `like` (the base op's output, which
        ``torch.autocast`` may have computed in another dtype than x) or else x's."""
        if self.layout == "param":  # x is the stacked weight W itself: return ΔW
            if not self.enabled:
                return torch.zeros_like(x)
            a_cat, b_cat = self.factors()
            return ((b_cat @ a_cat) * self.scaling).to(x.dtype)
        dtype = (like if like is not None else x).dtype
        if not self.enabled:
            return x.new_zeros(*x.shape[:-1], self.out_features, dtype=dtype)
        a_cat, b_cat = self.factors()
        b_down, b_up = self.biases()
        h = self.dropout(x).to(a_cat.dtype)
        out = F.linear(self.act(F.linear(h, a_cat, b_down)), b_cat, b_up)
        return (out * self.scaling).to(dtype)

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


def not_lora_form(name: str, a: CapaBoostAdapter) -> str | None:
    """Why adapter `a` of target `name` is not a module's LoRA pair (A_cat, B_cat on its
    ``weight``), which LoRA runtimes (PEFT, onnxruntime adapters) need; None when it is."""
    if a.layout == "param":
        return f"target {name!r} is a stacked expert parameter, not a module's linear weight"
    if not a.linear:
        return (f"target {name!r} is not a LoRA-form adapter (nonlinear activation or "
                "sequential placement)")
    if a.weight_fqn != f"{name}.weight":
        return f"target {name!r} is the parameter {a.weight_fqn!r}, not a module's 'weight'"
    return None


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

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        h = x.to(self.down.dtype)
        out = F.linear(self.act(F.linear(h, self.down, self.down_bias)), self.up, self.up_bias)
        return (out * self.scaling).to((like if like is not None else x).dtype)


# ----------------------------------------------------------------------------- eager hooks


def adapter_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook of an eager target: ``y + s · B_cat A_cat x`` (parallel) or ``y + ΔM y``
    (sequential), with the module's own `CapaBoostAdapter` child."""
    a = module._modules.get("capaboost")
    if a is None or not a.enabled:
        return output
    return output + a(output if a.sequential else args[0], output)


def expert_pre_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a module whose stacked (experts × out × in) parameter is an eager
    target: for this call, its attribute reads ``W + ΔW`` (the module's code runs as it is,
    whatever op reads the weight); `expert_post_hook` lifts it again. The parameter itself, the
    state dict and a disabled adapter are untouched."""
    for child, a in module._modules.items():
        if not child.startswith("capaboost_") or not isinstance(a, CapaBoostAdapter):
            continue
        attr = child[len("capaboost_"):]
        module.__dict__.pop(attr, None)  # a call that raised left its value behind
        if a.enabled:
            w = module._parameters[attr]
            module.__dict__[attr] = w + a(w)


def expert_post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    for child in module._modules:
        if child.startswith("capaboost_"):
            module.__dict__.pop(child[len("capaboost_"):], None)
    return output


ADAPTER_HOOKS = (adapter_hook, expert_post_hook)  # what structure_copy removes with adapters
