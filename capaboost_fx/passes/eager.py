"""Eager: the adapters on your model's own linear modules, for what torch.export cannot capture.

Pattern: a module that applies one weight linearly to its first input: ``nn.Linear`` and its
subclasses (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, an ``nn.Linear`` whose weight is a
torchao NF4 or int8 tensor), Hugging Face ``Conv1D`` (weight stored in × out), and any module
with integer ``in_features`` / ``out_features`` and a ``weight``. Replacement: a forward hook

    y' = module(x) + s · B_cat (A_cat drop(x))          (= W0 x + s · Σ_i (B⊙M^B_i)(A⊙M^A_i) x)

with the module's `CapaBoostAdapter` child (``<module>.capaboost``, where the graph path puts
it too): the algebra of `rewrite`, applied at the module boundary instead of the op. The
model runs as it is, so whatever it does (quantized kernels, data-dependent code, numpy
masking, KV caches) keeps working; the fold, files and ONNX export are the graph path's.

Stacked expert weights (an experts × out × in parameter, as MoE experts hold them) are targets
too (`find_experts`): for each call of their module, the attribute its code reads is
``W + ΔW`` (`merge.expert_pre_hook`), lifted again after the call.

When `transform` takes this path (``capture="eager"``, or ``"auto"`` when the model holds
quantized weights or torch.export fails) it says why in ``capture_info.eager_reason``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter import adapter_hook, expert_post_hook, expert_pre_hook
from ..structure import is_quantized
from .match import Candidate, adapter_path


@dataclass
class ModuleLinear:
    """A linear module as a candidate target (the eager counterpart of `match.Candidate`)."""

    name: str
    fqn: str  # its weight's FQN
    param: torch.Tensor
    in_features: int
    out_features: int
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D)
    bias_fqn: str | None = None
    reason: str | None = None
    aliases: list[str] = field(default_factory=list)
    sites: dict[str, list[Any]] = field(default_factory=dict)
    kind = "op"

    @property
    def ops(self) -> list[str]:
        return [f"module {type(self.param).__name__ if is_quantized(self.param) else 'linear'}"]

    @property
    def dtype(self) -> torch.dtype:
        p = self.param
        return p.dtype if p.is_floating_point() else torch.float32

    @property
    def adapter_path(self) -> str:
        return adapter_path(self.fqn)


def _linear_shape(module: nn.Module) -> tuple[int, int, str] | None:
    """(in, out, layout) when `module` applies its ``weight`` linearly, else None."""
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    if weight.dim() == 2 and getattr(module, "nf", None) == weight.shape[1] and getattr(
            module, "nx", weight.shape[0]) == weight.shape[0]:
        # GPT-2's Conv1D (y = x W + b, W stored in x out, nf = out features); its own
        # attributes say so, whatever library defines it
        return weight.shape[0], weight.shape[1], "in_out"
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(i, int) and isinstance(o, int):
        return i, o, "out_in"
    return None


def find_modules(model: nn.Module) -> dict[str, ModuleLinear]:
    """Every linear module of `model`, by name, with the reason it cannot be adapted (a
    weight shared with another module: a fold would change that use too)."""
    users: dict[int, list[str]] = defaultdict(list)
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None:
                users[id(p)].append(f"{mname}.{attr}" if mname else attr)
    out = {}
    for name, m in model.named_modules():
        found = _linear_shape(m) if name else None
        if found is None:
            continue
        i, o, layout = found
        weight = m._parameters["weight"]
        bias = m._parameters.get("bias")
        cand = ModuleLinear(name, f"{name}.weight", weight, i, o, layout,
                            f"{name}.bias" if bias is not None else None)
        others = [u for u in users[id(weight)] if u != cand.fqn]
        if others:
            cand.reason = (f"weight is shared with {others[:3]} (tied): a fold would change "
                           "that use too; untie it or exclude it")
        elif not weight.is_floating_point() and not is_quantized(weight):
            cand.reason = f"weight dtype {weight.dtype} is not floating point"
        out[name] = cand
    return out


class ModuleExperts(Candidate):
    """A stacked parameter (experts × out × in, as MoE experts hold them) as a candidate
    target: the graph path's expert `match.Candidate`, found without a graph. Its adapter adds
    ΔW to the parameter for each call of its module (`merge.expert_pre_hook`)."""

    @property
    def layout(self) -> str:
        return "param"

    @property
    def ops(self) -> list[str]:
        return ["module parameter (experts)"]


def find_experts(model: nn.Module) -> dict[str, ModuleExperts]:
    """Every stacked floating-point parameter (3-D, at least two experts) of a module that is
    not a convolution: the graph path's rule for expert targets, without the graph."""
    out = {}
    for mname, m in model.named_modules():
        if "Conv" in type(m).__name__ or "parametrizations" in mname:
            continue
        for attr, p in m._parameters.items():
            if p is not None and p.dim() == 3 and p.shape[0] >= 2 and p.is_floating_point():
                fqn = f"{mname}.{attr}" if mname else attr
                out[fqn] = ModuleExperts(fqn, fqn, p)
    return out


def quantized_weights(model: nn.Module) -> list[str]:
    """Names of parameters stored quantized (torch.export's fake-tensor twin cannot hold them)."""
    return [n for n, p in model.named_parameters() if is_quantized(p)]


def attach(shell: nn.Module, candidate: ModuleLinear | ModuleExperts, adapter: nn.Module) -> None:
    """Register `adapter` at the candidate's adapter path (``<module>.capaboost``, or
    ``<module>.capaboost_<parameter>`` for experts) and hook it onto its module: the output
    for a linear module, the parameter's reads for experts."""
    owner, _, child = candidate.adapter_path.rpartition(".")
    module = shell.get_submodule(owner) if owner else shell
    first = not any(k.startswith("capaboost") for k in module._modules)
    module.add_module(child, adapter)
    if candidate.layout != "param":
        module.register_forward_hook(adapter_hook)
    elif first:  # one pair of hooks serves every stacked parameter of the module
        module.register_forward_pre_hook(expert_pre_hook)
        module.register_forward_hook(expert_post_hook)
