"""Rank report: the numerical rank and singular values of each target's ΔW."""

from __future__ import annotations

from typing import Any

import torch

from .model import require_training


def rank_report(train_model: Any, top: int | None = None) -> dict[str, dict[str, Any]]:
    """Per target: numerical rank of ΔW, its bound min(d·r, in, out), the parameter counts
    and the singular values (largest first; the first `top` when given).

    The numerical rank counts singular values above ``σ_max · max(out, in) · eps(float64)``
    (the ``torch.linalg.matrix_rank`` default), computed in float64.

    Example::

        report = capaboost_fx.rank_report(train_model)
        report["bert.encoder.layer.0.attention.self.query"]  # {'rank': 32, 'max_rank': 32, ...}
    """
    out = {}
    for name, a in require_training(train_model, "rank_report()").adapters().items():
        if not a.linear:  # a nonlinear parallel adapter has no ΔW
            continue
        dw = a.delta_weight(torch.float64).cpu()
        if dw.dim() == 3:  # stacked expert matrices: the least-ranked expert's figures
            dw = min(dw.unbind(0), key=lambda m: int(torch.linalg.matrix_rank(m)))
        sv = torch.linalg.svdvals(dw)
        tol = (sv.max() if sv.numel() else torch.tensor(0.0)) * max(dw.shape) * torch.finfo(
            torch.float64).eps
        bound = min(a.num_masks * a.rank if a.density < 1.0 else a.rank, *dw.shape)
        out[name] = {
            "rank": int((sv > tol).sum()) if float(sv.max()) > 0 else 0,
            "max_rank": bound,
            "lora_rank": a.rank,
            "num_masks": a.num_masks,
            "shape": list(dw.shape),
            "trainable_params": a.num_trainable(),
            "live_params": a.num_live(),
            "singular_values": sv[:top].tolist() if top else sv.tolist(),
        }
    return out
