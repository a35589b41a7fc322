"""Public entry points: `transform` (capture -> match -> rewrite -> train/eval switch) and
`inspect` (what a spec would rewrite, and why the rest is not)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .adapter import CapaBoostAdapter
from .errors import (
    AlreadyTransformedError,
    InputError,
    SpecTypeError,
    TargetNotFoundError,
    close_names,
)
from .masks import make_masks
from .model import CapaBoostModel, FoldedModel
from .passes.capture import (
    Captured,
    default_dynamic_shapes,
    export_graph,
    private_copy,
    specialized_dims,
)
from .passes.match import Candidate, check, find_candidates, select
from .passes.rewrite import adapter_key, rewrite
from .spec import Spec, pattern_matches

MODES = ("train", "eval")


def _inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"example_inputs must be a tuple of positional arguments, got "
            f"{type(example_inputs).__name__}; e.g. example_inputs=(input_ids,)."
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise InputError(
            f"example_kwargs must be a dict of keyword arguments, got "
            f"{type(example_kwargs).__name__}."
        )
    kwargs = dict(example_kwargs or {})
    if not example_inputs and not kwargs:
        raise InputError(
            "transform needs example inputs to capture the model: pass example_inputs=(x,) "
            "and/or example_kwargs={'input_ids': ..., 'attention_mask': ...} shaped as a real "
            "batch (batch >= 2, sequence >= 2, batch != sequence)."
        )
    return example_inputs, kwargs


def _check_model(model: Any) -> None:
    if isinstance(model, (CapaBoostModel, FoldedModel)):
        raise AlreadyTransformedError(
            f"got a {type(model).__name__}, which capaboost_fx already produced; transform the "
            "original model instead (or fold() this one first and use its .base_model)."
        )
    if not isinstance(model, nn.Module):
        raise SpecTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")


def _capture(
    model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any
) -> tuple[nn.Module, dict[str, Captured]]:
    holder = private_copy(model)
    # Capture with every float parameter requiring grad, as in training: some modules take
    # fused inference fast paths (no visible linear op) when nothing requires grad.
    for p in holder.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    if dynamic_shapes is None:
        dynamic_shapes = default_dynamic_shapes(holder, args, kwargs)
        user_shapes = False
    else:
        user_shapes = True
    captured = {m: export_graph(holder, m, args, kwargs, dynamic_shapes) for m in MODES}
    if str(captured["train"].in_spec) != str(captured["eval"].in_spec) or str(
        captured["train"].out_spec
    ) != str(captured["eval"].out_spec):
        raise InputError(
            "the model's inputs/outputs are structured differently in train and eval mode; "
            "capaboost_fx needs one call signature for both."
        )
    fixed = specialized_dims(captured["train"])
    if fixed and not user_shapes:
        warnings.warn(
            f"the capture fixed {fixed} to the example's size, so other sizes will be refused. "
            "Use example inputs with batch >= 2 and sequence >= 2 (and batch != sequence), or "
            "pass dynamic_shapes=...",
            stacklevel=3,
        )
    return holder, captured


def _freeze(holder: nn.Module, trainable: list[str]) -> list[str]:
    for p in holder.parameters():
        p.requires_grad_(False)
    modules = [n for n, _ in holder.named_modules() if n]
    params = [n for n, _ in holder.named_parameters()]
    opened = []
    for pattern in trainable:
        hits = [n for n in modules if pattern_matches(pattern, n)]
        hits += [n for n in params if pattern_matches(pattern, n)]
        if not hits:
            raise TargetNotFoundError(
                f"Spec.trainable entry {pattern!r} names no module or parameter of the model. "
                f"Closest names: {close_names(pattern, modules + params)}."
            )
        for n in hits:
            tensors = (holder.get_submodule(n).parameters() if n in modules
                       else [holder.get_parameter(n)])
            for p in tensors:
                if p.is_floating_point():
                    p.requires_grad_(True)
            opened.append(n)
    return opened


def _make_adapter(name: str, c: Candidate, spec: Spec) -> CapaBoostAdapter:
    spec = spec.for_target(name)
    w = c.param
    dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    adapter = CapaBoostAdapter(
        c.in_features, c.out_features, spec.rank, spec.num_masks, spec.density, spec.alpha,
        dropout=spec.dropout, mask=spec.mask, seed=spec.seed, name=name, dtype=dtype,
        device=w.device, activation=spec.activation,
    )
    adapter.weight_fqn = c.fqn
    adapter.layout = c.layout
    return adapter


def transform(
    model: nn.Module,
    spec: Spec,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> CapaBoostModel:
    """Capture `model` and rewrite the linear ops `spec` names into CapaBoost training form.

    Returns a new module; `model` is never changed. Call the result with the same argument
    structure as the example (batch and sequence length may differ); it returns what `model`
    returns. Only the adapters and ``spec.trainable`` require grad.

    Example:
        >>> import torch, capaboost_fx as cbx
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                           torch.nn.Linear(16, 2))
        >>> tm = cbx.transform(mlp, cbx.Spec(targets=["0"], rank=2),
        ...                    example_inputs=(torch.randn(4, 8),))
        >>> sorted(cbx.adapters(tm))
        ['0']
    """
    _check_model(model)
    if not isinstance(spec, Spec):
        raise SpecTypeError(f"spec must be a capaboost_fx.Spec, got {type(spec).__name__}.")
    args, kwargs = _inputs(example_inputs, example_kwargs)
    t0 = time.perf_counter()
    holder, captured = _capture(model, args, kwargs, dynamic_shapes)
    graphs = {m: c.graph for m, c in captured.items()}
    candidates = find_candidates(graphs, holder)
    selection = select(candidates, spec)
    check(selection, candidates, spec)
    adapters = {adapter_key(n): _make_adapter(n, c, spec) for n, c in selection.targets.items()}
    rewritten = {m: rewrite(graphs[m], selection.targets, m) for m in MODES}
    trainable = _freeze(holder, spec.trainable)
    constants = {k: v for c in captured.values() for k, v in c.constants.items()}
    info = {
        "targets": list(selection.targets),
        "sites": {m: len(v) for m, v in rewritten.items()},
        "skipped": selection.skipped,
        "trainable": trainable,
        "capture_seconds": {m: round(c.seconds, 3) for m, c in captured.items()},
        "transform_seconds": round(time.perf_counter() - t0, 3),
        "dynamic_ranges": captured["train"].range_constraints,
    }
    holder.train(model.training)
    tm = CapaBoostModel(holder, adapters, graphs, constants, captured["train"].in_spec,
                        captured["train"].out_spec, spec, info)
    tm.train(model.training)
    return tm


@dataclass
class InspectReport:
    """What `transform` would do with a spec: targets and the linear ops left alone."""

    targets: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = ["| target | op | in | out | rank | d | trainable | live |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {t['name']} | {','.join(t['ops'])} | {t['in_features']} | "
                  f"{t['out_features']} | {t['rank']} | {t['num_masks']} | "
                  f"{t['trainable_params']} | {t['live_params']} |" for t in self.targets]
        tot = sum(t["trainable_params"] for t in self.targets)
        live = sum(t["live_params"] for t in self.targets)
        lines.append(f"| **total** ({len(self.targets)}) | | | | | | {tot} | {live} |")
        if self.skipped:
            lines += ["", "| not rewritten | op | in | out | reason |",
                      "| --- | --- | ---: | ---: | --- |"]
            lines += [f"| {s['name']} | {','.join(s['ops'])} | {s['in_features']} | "
                      f"{s['out_features']} | {s['reason']} |" for s in self.skipped]
        if self.unmatched_patterns:
            lines += ["", f"patterns that matched nothing: {self.unmatched_patterns}"]
        return "\n".join(lines)

    __str__ = to_markdown


def inspect(
    model: nn.Module,
    spec: Spec | None = None,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> InspectReport:
    """What `transform(model, spec, ...)` would rewrite: one row per target (name, op,
    in/out features, rank, trainable and live parameters) and every other linear op with
    the reason it is left alone. With ``spec=None`` every candidate is listed as skipped.

    Example:
        >>> print(cbx.inspect(model, spec, example_inputs=(ids,)))   # doctest: +SKIP
    """
    _check_model(model)
    args, kwargs = _inputs(example_inputs, example_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        holder, captured = _capture(model, args, kwargs, dynamic_shapes)
    candidates = find_candidates({m: c.graph for m, c in captured.items()}, holder)
    probe = spec or Spec(targets=["re:(?!)"])  # matches nothing
    selection = select(candidates, probe)
    report = InspectReport(unmatched_patterns=selection.unmatched if spec else [])
    for name, c in candidates.items():
        row = {"name": name, "ops": c.ops, "in_features": c.in_features,
               "out_features": c.out_features, "layout": c.layout,
               "sites": sum(len(v) for v in c.sites.values()) // max(len(c.sites), 1)}
        if name in selection.targets:
            t = probe.for_target(name)
            shape_a, shape_b = (t.rank, c.in_features), (c.out_features, t.rank)
            live = sum(int(make_masks(t.mask, s, t.num_masks, t.density, t.seed, name,
                                      f).any(0).sum())
                       for s, f in ((shape_a, "A"), (shape_b, "B")))
            row.update(rank=t.rank, num_masks=t.num_masks, density=t.density, mask=t.mask,
                       alpha=t.alpha, dropout=t.dropout,
                       trainable_params=t.rank * (c.in_features + c.out_features),
                       live_params=live)
            report.targets.append(row)
        else:
            row["reason"] = selection.skipped.get(name, "")
            report.skipped.append(row)
    return report
