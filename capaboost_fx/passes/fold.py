"""Fold: masks and adapters collapse into one dense delta per weight.

    W = W0 + s · Σ_i (B ⊙ M^B_i)(A ⊙ M^A_i) = W0 + s · B_cat A_cat

computed in float32 (float64 for float64 weights) and rounded once to W0's dtype; Conv1D-style
weights stored in × out get ΔWᵀ. The adapter nodes are removed from the eval graph, so the
deploy graph is the captured graph of the untouched model again, with merged weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import merge
from ..adapter import CapaBoostAdapter, DenseAdapter
from ..errors import FoldError
from ..merge import base_weight, foldable, is_quantized, restore_cache, structure_copy
from ..model import CapaBoostModel, FoldedModel, FoldPlan, require_training
from ..variant import Variant, autocast_region, copy_graph
from .capture import BASE, CONSTANTS, capture_graph, to_meta
from .match import sites_for
from .rewrite import adapter_key, rewrite, unrewrite


def adapters(train_model: CapaBoostModel) -> dict[str, CapaBoostAdapter]:
    """``{target name: adapter}`` of a training module."""
    return require_training(train_model, "adapters()").adapters()


def delta_weights(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """``{target name: ΔW}`` in float32 (float64 for float64 weights), out × in layout.
    Adapters that do not fold into the weight (nonlinear ones) are left out; a foldable
    sequential adapter's ΔW is M·W0 with M = s·B_cat A_cat."""
    tm = require_training(train_model, "delta_weights()")
    out = {}
    for name, a in adapters(tm).items():
        if a.linear:
            out[name] = a.delta_weight(torch.promote_types(a.A.dtype, torch.float32))
        elif foldable(a):
            w = base_weight(tm.base_model, a, torch.float32)
            w = (w.T if a.layout == "in_out" else w).to(torch.float32)
            out[name] = a.delta_weight(torch.float32).to(w.device) @ w
    return out


def merged_weights(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """``{weight fqn: W0 + ΔW}`` of a training module (see `capaboost_fx.merge`)."""
    tm = require_training(train_model, "fold")
    return merge.merged_weights(getattr(tm, BASE), adapters(tm))


def _fold_shell(tm: CapaBoostModel, merged: dict[str, torch.Tensor],
                requantize: Any = None) -> nn.Module:
    """Your model's own structure over the training module's tensors: merged weights for
    targets, private snapshots of what training changed (``trainable``, batch-norm
    statistics), aliases of everything else (no copy)."""
    base: nn.Module = getattr(tm, BASE)
    own = {id(t) for t in tm.parameters() if t.requires_grad}
    own |= {id(b) for n, b in base.named_buffers(remove_duplicate=False)
            if n in tm.private_buffers}
    return restore_cache(structure_copy(tm.structure_source(), base, merged, own, requantize),
                         tm.capture_info.cache_users)


def merged_state_dict(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """Your model's ``state_dict`` keys with merged weights: ``model.load_state_dict(...)``
    gives an eager model equal to the folded one (e.g. to ``save_pretrained``). Only the
    merged target weights are new tensors; the rest share storage with the training module
    (and, for frozen weights, with your model)."""
    tm = require_training(train_model, "merged_state_dict()")
    _refuse_nonlinear(tm, "use fold() (it keeps one dense width-d·r adapter each)")
    if tm.eager and _sharded(tm):  # your model's own (sharded) modules: their state, merged
        merged = merged_weights(tm)
        out = {}
        for k, v in getattr(tm, BASE).state_dict().items():
            if ".capaboost." not in k:
                out[k] = merged.get(k, v)
        return out
    return _fold_shell(tm, merged_weights(tm)).state_dict()


def _deploy_graph(flat: torch.fx.Graph, spec_memo: dict[int, object],
                  keep: frozenset[str]) -> torch.fx.Graph:
    graph = copy_graph(flat, *spec_memo.values())
    unrewrite(graph, keep=keep)
    return graph


def _constants_of(graphs: list[torch.fx.Graph], tm: torch.nn.Module) -> dict[str, torch.Tensor]:
    table = dict(getattr(tm, CONSTANTS).named_buffers())
    prefix = CONSTANTS + "."
    return {n.target[len(prefix):]: table[n.target[len(prefix):]].detach().clone()
            for g in graphs for n in g.nodes
            if n.op == "get_attr" and n.target.startswith(prefix)}


def _build_folded(fm: FoldedModel, mode: str, args: tuple, kwargs: dict,
                  variant: Variant | None) -> Variant:
    """A new argument structure for the deploy module: capture its eval graph on the meta
    twin; nonlinear adapters stay as dense ones, linear ones are already in the weights."""
    key = len(fm._variants)
    plan = fm.plan
    captured = capture_graph(plan.twin, "eval", args, kwargs, None, tag=f"f{key}_", warn=False)
    targets, _ = sites_for(captured.graph, "eval", plan.twin, plan.targets)
    rewrite(captured.graph, targets, "eval", plan.sequential)
    unrewrite(captured.graph, keep=plan.dense)
    for k, v in captured.constants.items():
        fm.capaboost_constants.register_buffer(k, v, persistent=False)
    return Variant(key, captured.in_spec, captured.out_spec, graphs={"eval": captured.graph},
                   example=(to_meta(tuple(args)), to_meta(dict(kwargs))), bound=captured.bound,
                   fixed=captured.fixed)


def fold(train_model: CapaBoostModel, example_inputs: Any = (),
         example_kwargs: dict[str, Any] | None = None, *,
         requantize: Callable[[nn.Linear], nn.Module] | None = None) -> FoldedModel:
    """The deploy module: the eval graph with merged weights, no adapter, mask or extra op.
    Only the merged target weights are new memory; other weights are shared.

    Pass the serving call (e.g. ``example_kwargs={"input_ids": ..., "attention_mask": ...}``
    without labels) to make sure its graph exists; any other call structure is captured on
    first use.

    A quantized target (trained on the eager path) is merged into a dense ``nn.Linear``
    holding ``dequantize(W0) + ΔW``; ``requantize(linear) -> module`` turns each into what you
    deploy instead (your quantizer again). ``deploy.fold_info`` lists both.

    Example:
        >>> deploy = capaboost_fx.fold(train_model)          # doctest: +SKIP
        >>> deploy(input_ids).logits                          # doctest: +SKIP
    """
    tm = require_training(train_model, "fold()")
    if tm.eager:
        return _fold_eager(tm, requantize)
    if requantize is not None:
        raise FoldError("requantize= applies to quantized targets, which train on the eager "
                        "path; this training module has none.")
    if example_inputs or example_kwargs:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        tm.variant_for(args, dict(example_kwargs or {}), "eval")
    for v in list(tm._variants):
        if "eval" not in v.flat:
            with autocast_region(v.autocast):
                tm._build(tm, "eval", *v.example, v)
            v.compile()
    merged = merged_weights(tm)
    nonlinear = frozenset(n for n, a in adapters(tm).items() if not foldable(a))
    dense = {adapter_key(n): DenseAdapter(a) for n, a in adapters(tm).items()
             if not foldable(a)}
    variants = []
    for v in tm._variants:
        memo = {id(v.in_spec): v.in_spec, id(v.out_spec): v.out_spec}
        variants.append(Variant(v.key, v.in_spec, v.out_spec,
                                graphs={"eval": _deploy_graph(v.flat["eval"], memo, nonlinear)},
                                example=v.example, bound=v.bound, autocast=v.autocast,
                                fixed=v.fixed))
    constants = _constants_of([v.graphs["eval"] for v in variants], tm)
    plan = FoldPlan(tm._twin, {n: a.output_of for n, a in adapters(tm).items()}, nonlinear,
                    frozenset(n for n, a in adapters(tm).items() if a.sequential))
    fm = FoldedModel(_fold_shell(tm, merged), constants, dense, plan=plan, build=_build_folded)
    for v in variants:
        fm._add_variant(v)
    return fm


def _refuse_nonlinear(tm: CapaBoostModel, what_to_do: str) -> None:
    nonlinear = [n for n, a in adapters(tm).items() if not foldable(a)]
    if nonlinear:
        raise FoldError(
            f"targets {nonlinear[:3]} use an adapter that no weight of the model can hold "
            f"(nonlinear, or sequential after an op without bias); {what_to_do}.")


def _sharded(tm: CapaBoostModel) -> bool:
    """Whether fully_shard (FSDP2) wrapped modules of the training module (they refuse to be
    copied)."""
    return any(type(m).__name__.startswith("FSDP") for m in getattr(tm, BASE).modules())


def _fold_eager(tm: CapaBoostModel, requantize: Any = None) -> FoldedModel:
    """Fold of a training module that runs your model eagerly (``capture="eager"``): your
    model's structure with merged weights, run as it is; quantized targets become dense
    ``nn.Linear`` modules, or what ``requantize(linear)`` makes of them."""
    _refuse_nonlinear(tm, "in eager mode fold needs adapters that merge into the weights")
    if _sharded(tm):
        raise FoldError(
            "this eager training module is sharded (fully_shard): its modules cannot be copied "
            "into a deploy module. Use capaboost_fx.merged_state_dict(train_model) on every "
            "rank and load it into an unsharded copy of your model, or save_pretrained and "
            "load_adapter + fold on one process.")
    merged = merged_weights(tm)
    base = getattr(tm, BASE)
    quantized = sorted(n for n, a in adapters(tm).items()
                       if a.weight_fqn in merged and is_quantized(base.get_parameter(a.weight_fqn)))
    fm = FoldedModel(_fold_shell(tm, merged, requantize), {}, eager=True)
    fm.fold_info = {"dequantized": quantized,
                    "requantized": quantized if requantize is not None else []}
    return fm
