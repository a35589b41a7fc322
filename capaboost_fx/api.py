"""Public entry points: `transform` (capture -> match -> rewrite -> train/eval switch) and
`inspect` (what a spec would rewrite, and why the rest is not)."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import AdapterSite, CapaBoostAdapter
from .adapter_file import HEADER_KEY, write_adapter
from .errors import (
    AdapterFileError,
    AlreadyTransformedError,
    CapaBoostError,
    CapaBoostWarning,
    CaptureError,
    InputError,
    SpecError,
    SpecTypeError,
    TargetNotFoundError,
    close_names,
)
from .executors import EagerExecutor, GraphExecutor, install_blocks, install_graph
from .io import (
    adapter_path,
    as_path,
    check_base,
    check_targets,
    copy_tensors,
    read_header,
    trainer_checkpoint,
)
from .model import CapaBoostModel, CaptureInfo, FoldedModel, require_training
from .passes.blocks import auto_blocks, modules_matching, plan_blocks
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
)
from .spec import Spec, pattern_matches
from .variant import Variant


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
    if isinstance(model, (CapaBoostModel, FoldedModel)):
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


def check_quantized_base(model: nn.Module) -> None:
    """A base quantized by transformers must use a method that can train under adapters
    (transformers' ``hf_quantizer.is_trainable``): the check the HF Trainer makes of a
    PEFT model, made here where the error can say what to do."""
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(model, "is_quantized", False) and quantizer is not None and not getattr(
            quantizer, "is_trainable", True):
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        raise SpecError(
            f"the model is quantized with {method}, which transformers says cannot train "
            "(hf_quantizer.is_trainable is False): adapters on top of it would get no "
            "gradient path. Load it with a trainable quantization (bitsandbytes 4-bit/8-bit, "
            "torchao) or unquantized.")


def _eager_reason_before_capture(model: nn.Module, capture: str) -> str | None:
    """Why the eager path is taken without trying a capture (None: try the graph path)."""
    check_quantized_base(model)
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
                       eager_reason=reason)
    shell.train(model.training)
    tm = CapaBoostModel(shell, spec, info, EagerExecutor(names))
    if checkpoint:
        tm.gradient_checkpointing_enable()
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
                       dynamic_ranges=dict(captured.range_constraints))
    shell.train(model.training)
    tm = CapaBoostModel(shell, spec, info, GraphExecutor(twin))
    variant = Variant(0, captured.in_spec, captured.out_spec,
                      example=(to_meta(tuple(args)), to_meta(dict(kwargs))), bound=captured.bound,
                      fixed=captured.fixed)
    install_graph(tm, variant, captured)
    tm.executor.add_variant(variant)
    if "eval" in modes:
        tm.executor.ensure(tm, args, kwargs, "eval")
        during = info.later_captures  # made inside transform: part of its cost
        info.export_seconds = round(
            info.export_seconds + sum(c["export_seconds"] for c in during), 3)
        info.later_captures = []
    for name, block in tm.blocks().items():
        block.checkpoint = name in ck
    info.checkpointed = sorted(n for n, b in tm.blocks().items() if b.checkpoint)
    lost = sorted(b for b in ck if b in info.refused_blocks)
    if lost:
        warnings.warn(CapaBoostWarning(f"cannot checkpoint {lost}: "
                                       f"{info.refused_blocks[lost[0]]}"), stacklevel=2)
    tm.train(model.training)
    info.transform_seconds = round(time.perf_counter() - t0, 3)
    return tm


# ----------------------------------------------------------------------------- files


def save_adapter(train_model: Any, path: str | os.PathLike) -> Path:
    """Write the adapters (and ``spec.trainable`` parameters) of a training module to one
    ``.safetensors`` file (``train_model.save_pretrained(dir)`` writes the same file into a
    directory). After per-block FSDP2 this is a collective: every rank calls it (sharded
    tensors are gathered), rank 0 writes.

    Example:
        >>> cbx.save_adapter(train_model, "adapter.safetensors")     # doctest: +SKIP
    """
    tm = require_training(train_model, "save_adapter()")
    return write_adapter(tm, as_path(path, "save_adapter()"))


def load_adapter(
    model: torch.nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    *,
    capture: str = "auto",
) -> Any:
    """Rebuild the training module on `model` (never changed) from an adapter file
    (``save_adapter``'s ``.safetensors``), or from a directory that
    ``train_model.save_pretrained(dir)`` or a Trainer checkpoint wrote: the module
    `transform` would return, with the file's spec and trained values (train on, `fold`, or
    `generate`). ``capture`` as in `capaboost_fx.transform`.

    Example:
        >>> tm = cbx.load_adapter(model, "adapter.safetensors", example_inputs=(ids,))  # doctest: +SKIP
        >>> tm = cbx.load_adapter(model, "out/checkpoint-100", example_inputs=(ids,))  # doctest: +SKIP
    """

    checkpoint = trainer_checkpoint(path)
    if checkpoint is not None:
        return _load_checkpoint(model, checkpoint, example_inputs, example_kwargs,
                                dynamic_shapes, capture)
    path = adapter_path(path)
    header = read_header(path)
    try:
        spec = Spec.from_dict(header["spec"])
    except CapaBoostError as e:
        raise AdapterFileError(f"{str(path)!r} holds an invalid spec: {e}") from None
    check_base(model, header, path)
    tm = transform(model, spec, example_inputs, example_kwargs, dynamic_shapes, capture=capture)
    check_targets(tm, header["targets"], path)
    copy_tensors(tm, header, path)
    return tm


def _load_checkpoint(model: torch.nn.Module, path: Path, example_inputs: Any,
                     example_kwargs: Mapping[str, Any] | None, dynamic_shapes: Any,
                     capture: str) -> Any:
    """A Trainer checkpoint (the training module's ``state_dict``: adapters, trainable
    tensors, the header with spec, base fingerprint and mask checksums) -> training module."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        header = json.loads(bytes(state[HEADER_KEY].tolist()).decode())
        spec = Spec.from_dict(header["spec"])
    except CapaBoostError as e:
        raise AdapterFileError(f"{str(path)!r} holds an invalid spec: {e}") from None
    except Exception as e:
        raise AdapterFileError(
            f"{str(path)!r} is not a readable checkpoint of a training module (truncated or "
            f"damaged?): {type(e).__name__}: {e}.") from None
    check_base(model, {**header, "trainable": []}, path)
    tm = transform(model, spec, example_inputs, example_kwargs, dynamic_shapes, capture=capture)
    result = tm.load_state_dict(state)  # checks the header: spec, base, masks
    if result.missing_keys or result.unexpected_keys:
        raise AdapterFileError(
            f"{str(path)!r} does not fit the training module rebuilt from its own spec: "
            f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}.")
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
