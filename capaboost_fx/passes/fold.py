"""Fold: masks and adapters collapse into one dense delta per weight.

    W = W0 + s · Σ_i (B ⊙ M^B_i)(A ⊙ M^A_i) = W0 + s · B_cat A_cat

computed in float32 (float64 for float64 weights) and rounded once to W0's dtype; Conv1D-style
weights stored in × out get ΔWᵀ. The adapter nodes are removed from the eval graph, so the
deploy graph is the captured graph of the untouched model again, with merged weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..adapter import CapaBoostAdapter, DenseAdapter
from ..errors import FoldError, NotTransformedError
from ..model import CapaBoostModel, FoldedModel
from .capture import BASE, CONSTANTS
from .rewrite import adapter_key, unrewrite


def _require(train_model: object, what: str) -> CapaBoostModel:
    if not isinstance(train_model, CapaBoostModel):
        hint = ("it is already folded; fold the training module instead"
                if isinstance(train_model, FoldedModel) else
                "pass the module capaboost_fx.transform(model, spec, ...) returned")
        raise NotTransformedError(
            f"{what} needs a transformed module, got {type(train_model).__name__}: {hint}."
        )
    return train_model


def adapters(train_model: CapaBoostModel) -> dict[str, CapaBoostAdapter]:
    """``{target name: adapter}`` of a training module."""
    tm = _require(train_model, "adapters()")
    return {a.name: a for a in tm.capaboost.values()}


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def delta_weights(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """``{target name: ΔW}`` in float32 (float64 for float64 weights), out × in layout.
    Nonlinear parallel adapters have no ΔW and are left out."""
    return {name: a.delta_weight(torch.promote_types(a.A.dtype, torch.float32))
            for name, a in adapters(train_model).items() if a.linear}


@torch.no_grad()
def merged_weights(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """``{weight fqn: W0 + ΔW}`` in W0's dtype and storage layout, checked finite."""
    tm = _require(train_model, "fold")
    base = getattr(tm, BASE)
    out = {}
    for name, a in adapters(tm).items():
        if not a.linear:
            continue
        w0 = base.get_parameter(a.weight_fqn)
        ct = _compute_dtype(w0)
        delta = a.delta_weight(ct)
        if a.layout == "in_out":
            delta = delta.T
        # One reduction first (cheap); the exact count only when it is not finite.
        if not torch.isfinite(delta.sum()) and (bad := int((~torch.isfinite(delta)).sum())):
            raise FoldError(
                f"ΔW of target {name!r} has {bad} NaN/Inf entries; folding would corrupt the "
                "model. Training diverged: lower the learning rate or use gradient clipping, "
                "and reload the last good adapter."
            )
        out[a.weight_fqn] = (w0.to(ct) + delta.to(w0.device)).to(w0.dtype)
    return out


def merged_state_dict(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """Your model's ``state_dict`` keys with merged weights: ``model.load_state_dict(...)``
    gives an eager model equal to the folded one (e.g. to ``save_pretrained``)."""
    tm = _require(train_model, "merged_state_dict()")
    nonlinear = [n for n, a in adapters(tm).items() if not a.linear]
    if nonlinear:
        raise FoldError(
            f"targets {nonlinear[:3]} use a nonlinear parallel adapter, which no weight of the "
            "original model can hold; use fold() (it keeps a dense width-d·r adapter)."
        )
    base: nn.Module = getattr(tm, BASE)
    merged = merged_weights(tm)
    ids = {id(base.get_parameter(fqn)): w for fqn, w in merged.items()}
    state = base.state_dict(keep_vars=True)
    return {k: ids.get(id(v), v).detach().clone() for k, v in state.items()}


def fold(train_model: CapaBoostModel) -> FoldedModel:
    """The deploy module: the eval graph with merged weights, no adapter, mask or extra op.

    Example:
        >>> deploy = capaboost_fx.fold(train_model)          # doctest: +SKIP
        >>> deploy(input_ids).logits                          # doctest: +SKIP
    """
    tm = _require(train_model, "fold()")
    merged = merged_weights(tm)
    base: nn.Module = getattr(tm, BASE)
    # Copy the base without sharing anything with the training module; merged weights are
    # put in place of the originals through the memo (tied aliases follow), not copied twice.
    memo = {id(base.get_parameter(fqn)): nn.Parameter(w, requires_grad=False)
            for fqn, w in merged.items()}
    new_base = copy.deepcopy(base, memo)
    for p in new_base.parameters():
        p.requires_grad_(False)
    graph = tm.copy_graph("eval")
    dense = {adapter_key(n): DenseAdapter(a) for n, a in adapters(tm).items() if not a.linear}
    unrewrite(graph, keep=frozenset(n for n, a in adapters(tm).items() if not a.linear))
    constants = {k: v.detach().clone() for k, v in getattr(tm, CONSTANTS).named_buffers()
                 if k.startswith("eval_")}
    return FoldedModel(new_base, graph, constants, tm._in_spec, tm._out_spec, dense)
