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

from .adapter import AdapterSite, CapaBoostAdapter
from .errors import (
    AlreadyTransformedError,
    CapaBoostWarning,
    CaptureError,
    InputError,
    SpecError,
    SpecTypeError,
    TargetNotFoundError,
    close_names,
)
from .merge import cache_users
from .model import CapaBoostModel, CaptureInfo, GraphProgram
from .passes.blocks import auto_blocks, install_blocks, modules_matching, plan_blocks
from .passes.capture import (
    Captured,
    UncapturableError,
    as_args,
    capture_graph,
    meta_twin,
    replace_tensor,
    shared_shell,
    to_meta,
)
from .passes.diagnose import model_frame
from .passes.eager import attach, find_experts, find_modules, quantized_weights
from .passes.match import (
    Candidate,
    check,
    find_candidates,
    module_candidates,
    module_targets,
    select,
    sites_for,
)
from .passes.rewrite import rewrite
from .passes.split import split_blocks
from .spec import Spec, pattern_matches
from .variant import Variant, copy_graph


def _inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple, dict]:
    example_inputs = as_args(example_inputs)
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


def _check_call(model: Any, spec: Any, capture: Any, modes: Any = None) -> None:
    """Arguments of `transform` and of `inspect` (which takes spec=None and no modes)."""
    if isinstance(model, GraphProgram):
        raise AlreadyTransformedError(
            f"got a {type(model).__name__}, which capaboost_fx already produced; transform the "
            "original model instead (or fold() this one first and use its .base_model)."
        )
    if not isinstance(model, nn.Module):
        raise SpecTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(spec, Spec) and not (spec is None and modes is None):
        raise SpecTypeError(f"spec must be a capaboost_fx.Spec, got {type(spec).__name__}.")
    if capture not in CAPTURE_CHOICES:
        raise SpecError(f"capture must be one of {CAPTURE_CHOICES}, got {capture!r}.")
    if modes is not None and not (isinstance(modes, (tuple, list))
                                  and {"train"} <= set(modes) <= {"train", "eval"}):
        raise SpecError(f"modes must be ('train',) or ('train', 'eval'), got {modes!r}.")


# ----------------------------------------------------------------------------- state


def _make_adapter(name: str, c: Candidate, spec: Spec, device: torch.device) -> CapaBoostAdapter:
    site = AdapterSite(c.in_features, c.out_features, name=name, weight_fqn=c.fqn,
                       layout=c.layout, bias_fqn=c.bias_fqn,
                       output_of=c.name if c.kind == "module" else None,
                       groups=c.param.shape[0] if c.layout == "param" else 0)
    return CapaBoostAdapter(site, spec.for_target(name), dtype=c.dtype,
                            device=None if device.type == "meta" else device)


def _all_candidates(twin: nn.Module, captured: Captured, spec: Spec) -> dict[str, Any]:
    """Linear ops of the train graph, plus the modules a ``sadapter`` spec follows."""
    graphs = {"train": captured.graph}
    candidates = find_candidates(graphs, twin)
    names = module_targets(spec, candidates, [n for n, _ in twin.named_modules()])
    return {**candidates, **module_candidates(graphs, names)}


def _freeze(shell: nn.Module, trainable: list[str]) -> list[str]:
    """Open ``spec.trainable`` for training on private copies (the caller's tensors are never
    trained); everything else stays a frozen alias."""
    modules = [n for n, _ in shell.named_modules() if n]
    params = [n for n, _ in shell.named_parameters()]
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
            tensors = (list(shell.get_submodule(n).parameters()) if n in modules
                       else [shell.get_parameter(n)])
            for p in tensors:
                if p.is_floating_point() and not p.requires_grad:
                    own = nn.Parameter(p.detach().clone(), requires_grad=True)
                    replace_tensor(shell, p, own)
            opened.append(n)
    return opened


def _privatize_mutated(tm: CapaBoostModel, captured: Captured) -> None:
    """Buffers the graph writes (batch-norm statistics) get private copies: training must not
    write into the caller's model. Their names join ``tm.private_buffers``."""
    shell = tm.base_model
    for fqn in captured.mutated_buffers:
        owner, _, attr = fqn.rpartition(".")
        module = shell.get_submodule(owner) if owner else shell
        old = module._buffers.get(attr)
        if old is not None and fqn not in tm.private_buffers:
            new = old.clone()
            replace_tensor(shell, old, new)
            tm.private_buffers.update(
                n for n, b in shell.named_buffers(remove_duplicate=False) if b is new)


# ----------------------------------------------------------------------------- variants


def _add_graph(tm: CapaBoostModel, variant: Variant, captured: Captured) -> None:
    """Rewrite, split and install one captured graph into `variant` of `tm`."""
    mode, graph = captured.mode, captured.graph
    adapters = tm.adapters()
    targets, missing = sites_for(graph, mode, tm._twin,
                                 {n: a.output_of for n, a in adapters.items()})
    if missing:
        name, why = next(iter(missing.items()))
        raise CaptureError(
            f"target {name!r} cannot be found in the graph captured in {mode} mode for this "
            f"call ({why}); the model computes it differently here, so its adapter cannot apply."
        )
    sequential = frozenset(n for n, a in adapters.items() if a.sequential)
    changed = rewrite(graph, targets, mode, sequential)
    if variant.key == 0:
        tm.capture_info.sites[mode] = len(changed)
    variant.flat[mode] = copy_graph(graph, variant.in_spec, variant.out_spec)
    plan = tm.capture_info.blocks
    split = split_blocks(graph, plan, variant.key)
    blocks = tm.planned_blocks()
    for b, g in split.blocks.items():
        blocks[b].add_graph(variant.key, mode, g)
    refused_explicit = {b: w for b, w in split.refused.items()
                        if b in tm.capture_info.explicit_blocks}
    if refused_explicit:
        raise CaptureError(
            f"cannot make {sorted(refused_explicit)[:3]} blocks: {refused_explicit}. Name "
            "modules that are called once per forward (e.g. 'model.layers.*')."
        )
    tm.capture_info.refused_blocks.update(split.refused)
    for k, v in captured.constants.items():
        tm.capaboost_constants.register_buffer(k, v, persistent=False)
    _privatize_mutated(tm, captured)
    variant.graphs[mode] = split.root


def _build_variant(tm: CapaBoostModel, mode: str, args: tuple, kwargs: dict,
                   variant: Variant | None) -> Variant:
    """Capture what a call needs and is missing (a new argument structure, or the other mode)."""
    key = len(tm._variants) if variant is None else variant.key
    t0 = time.perf_counter()
    captured = capture_graph(tm._twin, mode, args, kwargs, None, tag=f"v{key}_", warn=False)
    if variant is None:
        variant = Variant(key, captured.in_spec, captured.out_spec,
                          example=(to_meta(tuple(args)), to_meta(dict(kwargs))),
                          bound=captured.bound, fixed=captured.fixed)
    _add_graph(tm, variant, captured)
    tm.capture_info.later_captures.append(
        {"mode": mode, "variant": key, "export_seconds": round(captured.seconds, 3),
         "seconds": round(time.perf_counter() - t0, 3), "fixed_sizes": variant.fixed_names()})
    return variant


CAPTURE_CHOICES = ("auto", "graph", "eager")


def transform(
    model: nn.Module,
    spec: Spec,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    *,
    # Nine parameters: torch.export's own (model, inputs, dynamic_shapes) beside the spec,
    # then four keyword-only choices about the training module, each with a default.
    blocks: Any = "auto",
    checkpoint: Any = None,
    modes: tuple[str, ...] = ("train", "eval"),
    capture: str = "auto",
) -> CapaBoostModel:
    """Capture `model` and rewrite the linear ops `spec` names into CapaBoost training form.

    Returns a new module; `model` is never changed, and its weights are not copied: the
    training module reads them in place (train the training module, not `model`, while it
    lives). Call the result as you call `model`; it returns what `model` returns. A call with
    an argument structure not seen yet (``tm(ids)`` after an example with ``labels``) is
    captured once, on a meta copy of the model. Only the adapters and ``spec.trainable``
    require grad.

    ``blocks``: the modules that become separately callable blocks (``fully_shard`` each,
    checkpoint each): ``"auto"`` (transformer layers: ``_no_split_modules`` or ModuleList
    entries), a list of patterns such as ``["model.layers.*"]``, or None.
    ``checkpoint``: activation checkpointing per block: ``True`` (every block) or patterns.
    ``modes``: the modes captured now; ``("train",)`` halves transform time for large
    models and captures eval on the first eval call (not inside ``torch.compile``).
    ``capture``: ``"graph"`` (torch.export + fx passes), ``"eager"`` (your model runs as it
    is, each target linear module's adapter added by a forward hook: the same adapters,
    fold and files; for quantized weights and code torch.export cannot trace), or
    ``"auto"`` (the default: graph, unless the model holds quantized weights or
    torch.export fails, which is then said in a `CapaBoostWarning` and in
    ``capture_info.eager_reason``).
    A model whose own checkpointing is on (``gradient_checkpointing_enable()``,
    ``torch.utils.checkpoint`` in its blocks) keeps it without asking.

    Example:
        >>> import torch, capaboost_fx as cbx
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                           torch.nn.Linear(16, 2))
        >>> tm = cbx.transform(mlp, cbx.Spec(targets=["0"], rank=2),
        ...                    example_inputs=(torch.randn(4, 8),))
        >>> sorted(cbx.adapters(tm))
        ['0']
    """
    _check_call(model, spec, capture, modes)
    reason = _eager_reason_before_capture(model, capture)
    if reason is None:
        try:
            return _transform_graph(model, spec, example_inputs, example_kwargs,
                                    dynamic_shapes, blocks, checkpoint, modes)
        except UncapturableError as e:
            # Eager instead only when the model itself runs on the example: a wrong example
            # (or a model that fails anyway) keeps the capture error.
            if capture == "graph" or not _runs_eagerly(model, example_inputs, example_kwargs):
                raise
            reason = _fallback_reason(e)
            warnings.warn(CapaBoostWarning(
                f"{reason}. capaboost_fx trains it eagerly instead (capture='eager': the same "
                "adapters on its linear modules, the same fold and files; no per-block "
                "graphs). Pass capture='graph' to get the error instead."), stacklevel=2)
    return _transform_eager(model, spec, reason, blocks, checkpoint)


def _eager_reason_before_capture(model: nn.Module, capture: str) -> str | None:
    """Why the eager path is taken without trying a capture (None: try the graph path)."""
    quantized = quantized_weights(model) if capture != "eager" else []
    if quantized:
        reason = (f"{len(quantized)} weights are stored quantized (e.g. {quantized[0]}: "
                  f"{type(model.get_parameter(quantized[0])).__name__}), which torch.export's "
                  "fake-tensor capture cannot represent")
        if capture == "graph":
            raise CaptureError(f"cannot capture a graph: {reason}. Use capture='auto' (the "
                               "default) or capture='eager' to train adapters on top of them.")
        return reason
    return "capture='eager' was asked for" if capture == "eager" else None


def _fallback_reason(err: UncapturableError) -> str:
    """The export failure in one line, at the model's own line of code when known."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = next((ln for ln in lines[1:] if not ln.startswith("in the model's code")),
                 type(err.__cause__).__name__)
    where = model_frame(err)
    return f"torch.export could not capture the model ({first})" + (
        f" at {where}" if where else "")


def _runs_eagerly(model: nn.Module, example_inputs: Any,
                  example_kwargs: Mapping[str, Any] | None) -> bool:
    """Whether the model runs on the example as it is (on a storage-sharing shell, in eval
    mode and without grad, so the caller's model is untouched)."""
    if any(p.is_meta for p in model.parameters()):
        return False
    args, kwargs = _inputs(example_inputs, example_kwargs)
    shell = shared_shell(model).eval()
    try:
        with torch.no_grad():
            shell(*args, **kwargs)
    except Exception:  # noqa: BLE001 - any failure means: keep the capture error
        return False
    return True


def _transform_eager(model: nn.Module, spec: Spec, reason: str, blocks: Any, checkpoint: Any
                     ) -> CapaBoostModel:
    """The eager path (`capaboost_fx.passes.eager`): no capture, hooks on linear modules."""
    t0 = time.perf_counter()
    shell = shared_shell(model)
    for what, value in (("blocks", blocks), ("checkpoint", checkpoint)):
        if value not in (None, True, False, "auto"):  # patterns: each must name a module
            modules_matching(shell, value, what)
    candidates = {**find_modules(shell), **find_experts(shell)}
    selection = select(candidates, spec)
    check(selection, candidates, spec, [n for n, _ in shell.named_modules()])
    device = next((p.device for p in shell.parameters()), torch.device("cpu"))
    trainable = _freeze(shell, spec.trainable)
    for name, c in selection.targets.items():
        attach(shell, c, _make_adapter(name, c, spec, device))
    names = auto_blocks(shell)
    info = CaptureInfo("eager", list(selection.targets),
                       {n: r.message for n, r in selection.skipped.items()}, trainable, names,
                       eager_reason=reason, cache_users=cache_users(model))
    shell.train(model.training)
    tm = CapaBoostModel(shell, {}, spec, info, None, eager=True)
    if checkpoint:
        tm.gradient_checkpointing_enable()
        info.checkpointed = names
    tm.train(model.training)
    info.transform_seconds = round(time.perf_counter() - t0, 3)
    return tm


def _transform_graph(model: nn.Module, spec: Spec, example_inputs: Any,
                     example_kwargs: Mapping[str, Any] | None, dynamic_shapes: Any,
                     blocks: Any, checkpoint: Any, modes: tuple[str, ...]) -> CapaBoostModel:
    """The graph path: capture -> match -> rewrite -> split (module docstring)."""
    args, kwargs = _inputs(example_inputs, example_kwargs)
    t0 = time.perf_counter()
    twin = meta_twin(model)
    captured = capture_graph(twin, "train", args, kwargs, dynamic_shapes, tag="v0_")
    candidates = _all_candidates(twin, captured, spec)
    selection = select(candidates, spec)
    check(selection, candidates, spec, [n for n, _ in twin.named_modules()])

    shell = shared_shell(model)
    device = next((p.device for p in shell.parameters()), torch.device("cpu"))
    trainable = _freeze(shell, spec.trainable)
    for name, c in selection.targets.items():
        owner_path, _, child = c.adapter_path.rpartition(".")
        owner = shell.get_submodule(owner_path) if owner_path else shell
        owner.add_module(child, _make_adapter(name, c, spec, device))
    split, ck, explicit = plan_blocks(twin, blocks, checkpoint, captured.checkpointed)
    install_blocks(shell, split)
    info = CaptureInfo("graph", list(selection.targets),
                       {n: r.message for n, r in selection.skipped.items()}, trainable, split,
                       explicit_blocks=sorted(explicit), checkpointed=sorted(ck),
                       export_seconds=round(captured.seconds, 3),
                       dynamic_ranges=dict(captured.range_constraints),
                       cache_users=cache_users(model))
    shell.train(model.training)
    tm = CapaBoostModel(shell, {}, spec, info, twin, build=_build_variant)
    variant = Variant(0, captured.in_spec, captured.out_spec,
                      example=(to_meta(tuple(args)), to_meta(dict(kwargs))), bound=captured.bound,
                      fixed=captured.fixed)
    _add_graph(tm, variant, captured)
    tm._add_variant(variant)
    if "eval" in modes:
        tm.variant_for(args, kwargs, "eval")
        during = info.later_captures  # made inside transform: part of its cost
        info.export_seconds = round(
            info.export_seconds + sum(c["export_seconds"] for c in during), 3)
        info.later_captures = []
    for name, block in tm.blocks().items():
        block.checkpoint = name in ck
    lost = sorted(b for b in ck if b in info.refused_blocks)
    if lost:
        warnings.warn(f"cannot checkpoint {lost}: {info.refused_blocks[lost[0]]}",
                      stacklevel=2)
    tm.train(model.training)
    info.transform_seconds = round(time.perf_counter() - t0, 3)
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
    *,
    capture: str = "auto",
) -> InspectReport:
    """What `transform(model, spec, ...)` would rewrite: one row per target (name, op,
    in/out features, rank, trainable and live parameters) and every other linear op with
    the reason it is left alone. With ``spec=None`` every candidate is listed as skipped.
    On the eager path (``capture="eager"``, or a quantized model) the candidates are the
    model's linear modules, and no example inputs are needed.

    Example:
        >>> print(cbx.inspect(model, spec, example_inputs=(ids,)))   # doctest: +SKIP
    """
    _check_call(model, spec, capture)
    probe = spec or Spec(targets=["re:(?!)"])  # matches nothing
    if capture == "eager" or (capture == "auto" and quantized_weights(model)):
        candidates: dict[str, Any] = {**find_modules(model), **find_experts(model)}
    else:
        args, kwargs = _inputs(example_inputs, example_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = meta_twin(model)
            captured = capture_graph(twin, "train", args, kwargs, dynamic_shapes)
        candidates = _all_candidates(twin, captured, probe)
    selection = select(candidates, probe)
    report = InspectReport(unmatched_patterns=selection.unmatched if spec else [])
    for name, c in candidates.items():
        row = {"name": name, "ops": c.ops, "in_features": c.in_features,
               "out_features": c.out_features, "layout": c.layout,
               "sites": sum(len(v) for v in c.sites.values()) // max(len(c.sites), 1)}
        if name in selection.targets:
            t = probe.for_target(name)
            adapter = _make_adapter(name, c, probe, torch.device("cpu"))  # what transform builds
            row.update(rank=t.rank, num_masks=t.num_masks, density=t.density, mask=t.mask,
                       alpha=t.alpha, dropout=t.dropout, scaling=adapter.scaling,
                       trainable_params=adapter.num_trainable(), live_params=adapter.num_live())
            report.targets.append(row)
        else:
            why = selection.skipped.get(name)
            opened = [t for t in probe.trainable if any(
                pattern_matches(t, a) or pattern_matches(t, a.rpartition(".")[0])
                for a in [name, c.fqn or name, *c.aliases])]
            if opened and why is not None and why.kind == "not_matched":
                row.update(kind="trainable", reason=f"trained in full (Spec.trainable "
                           f"{opened[0]!r}), not adapted")
            else:
                row.update(kind=why.kind if why else "", reason=why.message if why else "")
            report.skipped.append(row)
    return report
