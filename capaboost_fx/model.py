"""The modules capaboost_fx returns: `CapaBoostModel` (training) and `FoldedModel` (deploy)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .adapter import CapaBoostAdapter
from .passes.capture import BASE, CONSTANTS
from .passes.modes import GraphProgram
from .passes.rewrite import ADAPTERS, DENSE
from .spec import Spec


def _constants_module(constants: dict[str, torch.Tensor]) -> nn.Module:
    holder = nn.Module()
    for key, value in constants.items():
        holder.register_buffer(key, value, persistent=False)  # moves with .to(), never saved
    return holder


class CapaBoostModel(GraphProgram):
    """The training module `transform` returns.

    State: ``base_model`` (a private, frozen copy of your model; ``spec.trainable`` stays
    trainable), ``capaboost`` (one `CapaBoostAdapter` per target). Call it exactly as you
    would call your model; ``.train()`` / ``.eval()`` behave as on your model.
    """

    def __init__(
        self,
        base_model: nn.Module,
        adapters: dict[str, CapaBoostAdapter],
        graphs: dict[str, fx.Graph],
        constants: dict[str, torch.Tensor],
        in_spec: Any,
        out_spec: Any,
        spec: Spec,
        info: dict[str, Any],
    ) -> None:
        super().__init__()
        setattr(self, BASE, base_model)
        setattr(self, ADAPTERS, nn.ModuleDict(adapters))
        setattr(self, CONSTANTS, _constants_module(constants))
        self.spec = spec
        self.capture_info = info
        self._install(graphs, in_spec, out_spec)

    def extra_repr(self) -> str:
        return f"targets={len(self.capaboost)}, spec={self.spec}"


class FoldedModel(GraphProgram):
    """The deploy module `fold` returns: the captured eval graph of your model with merged
    weights and nothing else. ``base_model`` is an eager copy of your model holding the merged
    weights (``deploy.base_model.save_pretrained(...)`` works for Hugging Face models).
    It is inference-only: it always runs the eval graph. Nonlinear parallel adapters
    (``method="padapter"``) cannot merge into a weight: they stay as one dense width-d·r
    adapter each, in ``capaboost_dense``."""

    def __init__(
        self,
        base_model: nn.Module,
        graph: fx.Graph,
        constants: dict[str, torch.Tensor],
        in_spec: Any,
        out_spec: Any,
        dense: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        setattr(self, BASE, base_model)
        setattr(self, CONSTANTS, _constants_module(constants))
        if dense:
            setattr(self, DENSE, nn.ModuleDict(dense))
        self._install({"eval": graph}, in_spec, out_spec)
        self.eval()

    @property
    def graph(self) -> fx.Graph:
        return self._graphs["eval"]

    def mode(self) -> str:
        return "eval"
