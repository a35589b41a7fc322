"""Fold: masks and adapters collapse into one dense delta per weight.

    W = W0 + s · Σ_i (B ⊙ M^B_i)(A ⊙ M^A_i) = W0 + s · B_cat A_cat

computed in float32 (float64 for float64 weights) and rounded once to W0's dtype
(`capaboost_fx.merge`); Conv1D-style weights stored in × out get ΔWᵀ. The training module's
executor hands back the deploy module's (the eval graph with the adapter nodes removed by
`passes.rewrite.unrewrite`, or your model's own forward), so the deploy module is your
architecture again, with merged weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adapter import CapaBoostAdapter
from .merge import merged_weights as merge_weights
from .model import CapaBoostModel, FoldedModel, require_training


def adapters(train_model: CapaBoostModel) -> dict[str, CapaBoostAdapter]:
    """``{target name: adapter}`` of a training module (its registry)."""
    return require_training(train_model, "adapters()").adapters()


def delta_weights(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """``{target name: ΔW}`` in float32 (float64 for float64 weights), out × in layout.
    Adapters that do not fold into the weight (nonlinear ones) are left out; a foldable
    sequential adapter's ΔW is M·W0 with M = s·B_cat A_cat."""
    return require_training(train_model, "delta_weights()").delta_weights()


def merged_weights(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """``{weight fqn: W0 + ΔW}`` of a training module (see `capaboost_fx.merge`)."""
    tm = require_training(train_model, "merged_weights()")
    return merge_weights(tm.wrapped, tm.adapters())


def merged_state_dict(train_model: CapaBoostModel) -> dict[str, torch.Tensor]:
    """Your model's ``state_dict`` keys with merged weights: ``model.load_state_dict(...)``
    gives an eager model equal to the folded one (e.g. to ``save_pretrained``). Only the
    merged target weights are new tensors; the rest share storage with the training module
    (and, for frozen weights, with your model). After per-block FSDP2 this is a collective:
    every rank calls it (sharded weights are gathered), then rank 0 writes."""
    return require_training(train_model, "merged_state_dict()").merged_state_dict()


def fold(train_model: CapaBoostModel, example_inputs: Any = (),
         example_kwargs: dict[str, Any] | None = None, *,
         requantize: Callable[[nn.Linear], nn.Module] | None = None) -> FoldedModel:
    """The deploy module: your model with merged weights, no adapter, mask or extra op. Only
    the merged target weights are new memory; other weights are shared. PEFT's name for it,
    ``train_model.merge_and_unload()``, does the same.

    Pass the serving call (e.g. ``example_kwargs={"input_ids": ..., "attention_mask": ...}``
    without labels) to make sure its graph exists; any other call structure is captured on
    first use.

    A quantized target (trained over a quantized base) is merged into a dense ``nn.Linear``
    holding ``dequantize(W0) + ΔW``; ``requantize(linear) -> module`` turns each into what you
    deploy instead (your quantizer again). ``deploy.fold_info`` lists both.

    Example:
        >>> deploy = capaboost_fx.fold(train_model)          # doctest: +SKIP
        >>> deploy(input_ids).logits                          # doctest: +SKIP
    """
    tm = require_training(train_model, "fold()")
    return tm.fold(example_inputs, example_kwargs, requantize=requantize)
