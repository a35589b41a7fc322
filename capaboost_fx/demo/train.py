"""Train one arm: transform, fine-tune (AdamW, linear warm-up and decay), evaluate, and read
what the adapters hold (ΔW rank from `capaboost_fx.rank_report`, live parameters from the
adapters). The demo and ``benchmarks/quality.py`` both train through `train_arm`.

    base, tok, _ = load_model(seed=0)
    data = load_data(tok, max_length=64)
    arm = train_arm(base, Spec(targets=["*.query", "*.value"], trainable=["classifier"]), data,
                    TrainSettings(steps=300, batch_size=32, lr=1e-3, seed=0))
    arm.accuracy, arm.summary()["adapters"]["mean_rank"]
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import capaboost_fx as cbx

from .data import SST2Data, collate, eval_chunks, train_batches


def progress(iterable: Iterable, enabled: bool, **kwargs: Any) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


@dataclass(frozen=True)
class TrainSettings:
    """How one arm is fine-tuned: `steps` batches of `batch_size`, AdamW at `lr` (warm-up over
    the first `warmup` fraction of the steps, then linear decay to 0), `weight_decay`, gradient
    clipping at `max_grad_norm` (None: off), dropout and batch order seeded with `seed`; dev
    evaluation in batches of `eval_batch_size`."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    warmup: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_batch_size: int = 64


def fit(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        settings: TrainSettings, *, show: bool = False, desc: str = "train") -> dict[str, Any]:
    """Fine-tune what requires grad in `model` with AdamW and cross-entropy on the logits.

    `batches` yields ``(input_ids, attention_mask, labels)``. The learning rate warms up
    linearly, then decays linearly to 0 (``transformers.get_linear_schedule_with_warmup``).
    Dropout draws from the global RNG, seeded with ``settings.seed`` first. Returns
    ``{"losses", "seconds", "steps"}``; the model is left in eval mode.
    """
    from transformers import get_linear_schedule_with_warmup

    steps, max_grad_norm = settings.steps, settings.max_grad_norm
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad")
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, round(steps * settings.warmup), steps)
    torch.manual_seed(settings.seed)
    model.train()
    losses: list[float] = []
    bar = progress(batches, show, total=steps, desc=desc, unit="step")
    t0 = time.perf_counter()
    for input_ids, attention_mask, labels in bar:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {len(losses)}")
        losses.append(value)
        if show and len(losses) % 5 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if len(losses) >= steps:
            break
    seconds = time.perf_counter() - t0
    model.eval()
    return {"losses": losses, "seconds": seconds, "steps": len(losses)}


@torch.no_grad()
def evaluate(model: nn.Module, seqs: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int,
             batch_size: int = 64, show: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Accuracy of `model` in eval mode (length-sorted batches, dynamic padding).

    Returns ``{"accuracy", "correct", "n", "predictions" (in input order), "seconds"}``.
    """
    model.eval()
    preds = [0] * len(seqs)
    t0 = time.perf_counter()
    for chunk in progress(eval_chunks([len(s) for s in seqs], batch_size), show, desc=desc,
                          unit="batch"):
        ids, mask = collate([seqs[i] for i in chunk], pad_id)
        for i, p in zip(chunk, model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist(),
                        strict=True):
            preds[i] = int(p)
    correct = sum(int(p == y) for p, y in zip(preds, labels, strict=True))
    return {"accuracy": correct / len(labels), "correct": correct, "n": len(labels),
            "predictions": preds, "seconds": time.perf_counter() - t0}


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def adapter_summary(train_model: nn.Module, keep_singular: int = 48) -> dict[str, Any]:
    """Per target and in total: trainable and live parameters (the adapters' own counts), the
    scale s, and for linear adapters the numerical rank of ΔW, its bound and singular values
    (`capaboost_fx.rank_report`). A nonlinear parallel adapter has no ΔW: its rank is None."""
    ranks = cbx.rank_report(train_model, top=keep_singular)
    layers: dict[str, Any] = {}
    for name, a in sorted(cbx.adapters(train_model).items(), key=lambda kv: _natural(kv[0])):
        row = {"shape": [a.out_features, a.in_features], "trainable": a.num_trainable(),
               "live": a.num_live(), "scaling": a.scaling, "init": a.init, "rank": None, "max_rank": None,
               "singular_values": []}
        if name in ranks:
            r = ranks[name]
            row.update(rank=r["rank"], max_rank=r["max_rank"],
                       singular_values=r["singular_values"])
        layers[name] = row
    trainable = sum(v["trainable"] for v in layers.values())
    live = sum(v["live"] for v in layers.values())
    ranked = [v["rank"] for v in layers.values() if v["rank"] is not None]
    adapter_ids = {id(p) for a in cbx.adapters(train_model).values() for p in (a.A, a.B)}
    grads = [p for p in train_model.parameters() if p.requires_grad]
    return {
        "adapter_trainable_params": trainable,
        "adapter_live_params": live,
        "live_fraction": live / trainable if trainable else 0.0,
        "head_trainable_params": sum(p.numel() for p in grads if id(p) not in adapter_ids),
        "total_trainable_params": sum(p.numel() for p in grads),
        "mean_rank": sum(ranked) / len(ranked) if ranked else None,
        "min_rank": min(ranked, default=None),
        "max_rank": max(ranked, default=None),
        "rank_rule": "capaboost_fx.rank_report: singular values of ΔW (float64) above "
                     "σ_max · max(out, in) · eps(float64)",
        "layers": layers,
    }


@dataclass
class ArmResult:
    """One trained arm: the training module and what was measured on it."""

    model: nn.Module
    spec: cbx.Spec
    lr: float
    seed: int
    losses: list[float]
    train_seconds: float
    transform_seconds: float
    evaluation: dict[str, Any]
    adapters: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.evaluation["accuracy"]

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    def summary(self, keep_losses: bool = True) -> dict[str, Any]:
        """JSON-safe record of the arm (predictions and the model left out)."""
        ev, acc = self.evaluation, self.accuracy
        out = {
            "spec": self.spec.to_dict(),
            "lr": self.lr,
            "seed": self.seed,
            "accuracy": acc,
            "accuracy_se": math.sqrt(acc * (1 - acc) / ev["n"]),
            "correct": ev["correct"],
            "eval_examples": ev["n"],
            "final_loss": self.final_loss,
            "train_seconds": self.train_seconds,
            "transform_seconds": self.transform_seconds,
            "eval_seconds": ev["seconds"],
            **{k: v for k, v in self.adapters.items() if k != "layers"},
            "layers": self.adapters.get("layers", {}),
        }
        if keep_losses:
            out["losses"] = [round(v, 6) for v in self.losses]
        return out


def train_arm(base: nn.Module, spec: cbx.Spec, data: SST2Data, settings: TrainSettings, *,
              order: Sequence[Sequence[int]] | None = None, show: bool = False,
              desc: str = "", keep_singular: int = 48) -> ArmResult:
    """Transform `base` with `spec` (base itself is never changed), fine-tune it on `data`
    (`settings`; batches in `order`, default ``train_batches(..., settings.seed)``), evaluate on
    the dev sentences and summarise the adapters."""
    s = settings
    if order is None:
        order = train_batches(len(data.train_seqs), s.steps, s.batch_size, s.seed)
    desc = desc or f"r={spec.rank} d={spec.num_masks}"
    t0 = time.perf_counter()
    tm = cbx.transform(base, spec, example_kwargs=data.example())
    transform_s = time.perf_counter() - t0
    run = fit(tm, data.batches(order), s, show=show, desc=f"train {desc}")
    ev = evaluate(tm, data.dev_seqs, data.dev_labels, data.pad_id, s.eval_batch_size,
                  show=show, desc=f"eval {desc}")
    return ArmResult(model=tm, spec=spec, lr=s.lr, seed=s.seed, losses=run["losses"],
                     train_seconds=run["seconds"], transform_seconds=transform_s, evaluation=ev,
                     adapters=adapter_summary(tm, keep_singular))

