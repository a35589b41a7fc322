"""Many fine-tunes, one deployed base: onnxruntime multi-LoRA, switched per request.

A CapaBoost adapter is exactly a rank-d·r LoRA (the masks fold into the factors)::

    ΔW x = s · B_cat A_cat x,   A_cat = [A⊙M^A_1; …; A⊙M^A_d],   B_cat = [B⊙M^B_1, …, B⊙M^B_d]

`export_multi_lora` (``export_onnx(train_model, path, multi_lora=True)``) writes the *unmerged*
base with one adapter path per target, ``y = base(x) + (x · A_catᵀ) · (s·B_cat)ᵀ``, whose two
factors are initializers that are also graph inputs (onnxruntime lets a run override them):

    ``capaboost.<target>.lora_A``   A_catᵀ       (in × d·r)
    ``capaboost.<target>.lora_B``   (s·B_cat)ᵀ   (d·r × out)

Their defaults are the exported training module's own adapters. `save_onnx_adapter` writes any
fine-tune with the same targets and ranks as onnxruntime's ``.onnx_adapter`` file (its
``adapter_version`` field holds a CRC-32 of the tensors, its ``model_version`` a digest of the
base weights it was trained on); `load_onnx_adapter` checks both (and the slots: names,
shapes, dtypes) before onnxruntime sees the file; `MultiLoraSession` serves one base with many adapters, one per ``run``, from any thread.

Example (``cbx`` is ``capaboost_fx``)::

    cbx.export_onnx(tm_a, "base.onnx", example_kwargs=batch, multi_lora=True)
    cbx.save_onnx_adapter(tm_b, "tenant_b.onnx_adapter", base="base.onnx")
    sess = cbx.MultiLoraSession("base.onnx", {"b": "tenant_b.onnx_adapter"})
    sess.run({"input_ids": ids}, adapter="b")       # tenant b's fine-tune
    sess.run({"input_ids": ids})                    # the base file's own adapters (tenant a)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import threading
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from capaboost_fx.adapter import not_lora_form
from capaboost_fx.errors import (
    AdapterFileError,
    AdapterFileNotFoundError,
    AdapterMismatchError,
    CapaBoostWarning,
    ExportError,
    FileWriteError,
    InputError,
    MissingDependencyError,
    OnnxFileNotFoundError,
    TargetError,
    VerificationError,
)
from capaboost_fx.model import CapaBoostModel, require_training

__all__ = [
    "AdapterMismatchError",
    "MultiLoraReport",
    "MultiLoraSession",
    "export_multi_lora",
    "load_onnx_adapter",
    "lora_slots",
    "onnx_adapter_tensors",
    "read_onnx_adapter",
    "save_onnx_adapter",
    "slot_names",
]

META_KEY = "capaboost_fx.multi_lora"  # the base file's metadata_props entry: the slot layout
_FORMAT = 1


def slot_names(target: str) -> tuple[str, str]:
    """The two initializer names of `target`'s adapter in a multi-LoRA base file.

    Example::

        >>> slot_names("model.layers.0.self_attn.q_proj")
        ('capaboost.model.layers.0.self_attn.q_proj.lora_A', \
'capaboost.model.layers.0.self_attn.q_proj.lora_B')
    """
    return f"capaboost.{target}.lora_A", f"capaboost.{target}.lora_B"


# --------------------------------------------------------------------------- the factors


def _inner(module: nn.Module) -> nn.Module:
    """Your model's structure inside a training or deploy module (PEFT's ``get_base_model``)."""
    return module.get_base_model()


def _check_servable(tm: CapaBoostModel) -> dict[str, Any]:
    ads = tm.adapters()
    if not ads:
        raise TargetError("this training module has no adapters: nothing to serve per request")
    trainable = list(getattr(tm.spec, "trainable", None) or [])
    if trainable:
        raise TargetError(
            f"spec.trainable={trainable}: those modules are trained in full, so each fine-tune "
            "has its own copy of them, which an adapter file cannot switch. Serve such "
            "fine-tunes folded (one file each: export_onnx(fold(train_model), ...)), or train "
            "without spec.trainable to serve them as adapters on one base.")
    for name, a in ads.items():
        why = not_lora_form(name, a)
        if why:
            raise TargetError(f"{why}: it is no A/B pair a run can swap. Exclude it, or fold it "
                              "(export_onnx(fold(train_model), ...)).")
    return ads


def onnx_adapter_tensors(train_model: Any) -> dict[str, np.ndarray]:
    """``{initializer name: tensor}`` of a fine-tune, as the multi-LoRA base file holds them:
    ``capaboost.<target>.lora_A`` = A_catᵀ (in × d·r) and ``...lora_B`` = (s·B_cat)ᵀ
    (d·r × out), float32 (float64 for a float64 model).

    Example::

        >>> t = cbx.onnx_adapter_tensors(train_model)                  # doctest: +SKIP
        >>> t["capaboost.layer.0.query.lora_A"].shape                  # doctest: +SKIP
        (32, 8)
    """
    tm = require_training(train_model, "onnx_adapter_tensors()")
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, a in _check_servable(tm).items():
            dtype = torch.float64 if a.A.dtype == torch.float64 else torch.float32
            a_cat, b_cat = (t.detach().to("cpu", dtype) for t in a.factors(whole=True))
            na, nb = slot_names(name)
            out[na] = a_cat.T.contiguous().numpy()
            out[nb] = (b_cat * a.scaling).T.contiguous().numpy()
    return out


def _layout(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(tensors.items())}


def _fingerprint(layout: Mapping[str, Mapping[str, Any]]) -> int:
    text = json.dumps({k: layout[k] for k in sorted(layout)}, sort_keys=True)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _base_digest(tm: CapaBoostModel) -> int:
    """A digest of the base weights the adapters were trained against (a strided sample of
    each target's W0, rounded to bfloat16 so an fp32 and a bf16 copy of one base agree): kept
    in the base file and in each adapter file (``model_version``), compared when they meet."""
    from capaboost_fx.adapter_file import weight_digests

    shell = _inner(tm)
    parts = {}
    for name, a in sorted(tm.adapters().items()):
        d = weight_digests(shell.get_parameter(a.weight_fqn))
        parts[name] = None if d is None else d.get("bfloat16")
    return zlib.crc32(json.dumps(parts, sort_keys=True).encode()) & 0x7FFFFFFF


def _checksum(tensors: Mapping[str, np.ndarray]) -> int:
    crc = 0
    for k in sorted(tensors):
        v = np.ascontiguousarray(tensors[k])
        crc = zlib.crc32(f"{k}|{v.dtype}|{list(v.shape)}|".encode(), crc)
        crc = zlib.crc32(v.tobytes(), crc)
    return crc & 0x7FFFFFFF


def lora_slots(base: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The adapter slots of a multi-LoRA base file: ``{initializer name: {"shape", "dtype"}}``
    (what every adapter file served on it must hold, exactly).

    Example::

        >>> cbx.lora_slots("base.onnx")                                 # doctest: +SKIP
        {'capaboost.0.lora_A': {'shape': [12, 8], 'dtype': 'float32'}, ...}
    """
    return _base_meta(base)["slots"]


def _base_meta(base: str | os.PathLike) -> dict[str, Any]:
    """The multi-LoRA metadata of a base file (slots, targets, base digest), cached per file."""
    import onnx

    path = Path(base)
    if not path.is_file():
        raise OnnxFileNotFoundError(f"multi-LoRA base {str(path)!r} does not exist")
    st = path.stat()
    key = (os.fspath(path.absolute()), st.st_mtime_ns, st.st_size)
    if key in _SLOTS_SEEN:  # parsing a large base again for every adapter would cost seconds
        return copy.deepcopy(_SLOTS_SEEN[key])
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{str(path)!r} is not a readable ONNX file: {e}") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in meta:
        raise AdapterMismatchError(
            f"{str(path)!r} is not a multi-LoRA base (no {META_KEY!r} metadata): write it with "
            "export_onnx(train_model, path, multi_lora=True)")
    info = json.loads(meta[META_KEY])
    with _LOCK:
        if len(_SLOTS_SEEN) > 64:
            _SLOTS_SEEN.clear()
        _SLOTS_SEEN[key] = info
    return copy.deepcopy(info)


_SLOTS_SEEN: dict[tuple[str, int, int], dict[str, Any]] = {}
_LOCK = threading.Lock()


# --------------------------------------------------------------------------- the base module


def _stores_in_out(module: nn.Module) -> bool:
    """GPT-2's Conv1D (y = x W + b, W in x out): its own ``nf`` attribute says so."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and getattr(module, "nf", None) == w.shape[1]


class _LoraLinear(nn.Module):
    """``x·W (+ LoRA path) + bias``: the unmerged linear module and its LoRA path, the path added
    before the bias so that graph fusions matching "MatMul then bias Add" (onnxruntime's
    attention fusion) do not take the adapter's output for a bias."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_a, requires_grad=False)
        self.lora_B = nn.Parameter(lora_b, requires_grad=False)
        # nn.Linear (out × in) or a Conv1D-style module (in × out, x @ W + b); else base(x)
        self.kind = ("linear" if isinstance(base, nn.Linear) else
                     "conv1d" if _stores_in_out(base) else "module")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lora = torch.matmul(torch.matmul(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        if self.kind == "module" or args or kwargs:
            y = self.base(x, *args, **kwargs)
            return y + lora.to(y.dtype)
        w = self.base.weight
        y = torch.nn.functional.linear(x, w) if self.kind == "linear" else torch.matmul(x, w)
        y = y + lora.to(y.dtype)
        return y if self.base.bias is None else y + self.base.bias


def _placeholders(tensors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Distinct, non-zero stand-ins for the factors during the export: no exporter pass can
    fold a zero path away or merge two equal initializers, and each is found by its bytes."""
    gen = torch.Generator().manual_seed(20240611)
    out = {}
    for k in sorted(tensors):
        v = tensors[k]
        t = (torch.rand(v.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.02
        out[k] = t.to(torch.float64 if v.dtype == np.float64 else torch.float32)
    return out


def _serving_module(tm: CapaBoostModel, stand_ins: Mapping[str, torch.Tensor]) -> nn.Module:
    """Your model's structure with each target unmerged (its training module's W0, shared, never
    written) and wrapped in `_LoraLinear` holding the stand-in factors."""
    # module objects of its own; tensors shared with the training module, targets merged
    structure = _inner(tm.fold())
    shell = _inner(tm)
    for name, a in tm.adapters().items():
        w0 = shell.get_parameter(a.weight_fqn)
        if not isinstance(w0, torch.Tensor) or type(w0.data) is not torch.Tensor \
                or not w0.is_floating_point():
            raise TargetError(f"target {name!r} has a {type(w0.data).__name__} weight "
                              f"({w0.dtype}): a multi-LoRA base needs dense float weights. "
                              "Fold it instead.")
        owner = structure.get_submodule(name)
        owner.weight = nn.Parameter(w0.detach(), requires_grad=False)  # the copy's, not yours
        na, nb = slot_names(name)
        parent_name, _, child = name.rpartition(".")
        parent = structure.get_submodule(parent_name) if parent_name else structure
        setattr(parent, child, _LoraLinear(owner, stand_ins[na], stand_ins[nb]))
    return structure.eval()


# --------------------------------------------------------------------------- export


@dataclass
class MultiLoraReport:
    """What `export_multi_lora` wrote: the ONNX export's report (`export`), the adapter slots,
    and how the file run without an adapter matched the training module."""

    path: str
    export: Any  # ExportReport of the graph (verified with stand-in factors)
    slots: dict[str, dict[str, Any]]
    targets: list[str]
    max_abs_diff: float
    max_rel_diff: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "export": self.export.to_dict(), "slots": self.slots,
                "targets": self.targets, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "notes": self.notes}

    def __getattr__(self, name: str) -> Any:  # the ExportReport's fields (fusions, ...)
        if name.startswith("__") or name == "export":
            raise AttributeError(name)
        return getattr(self.export, name)


def _find_initializers(proto: Any, stand_ins: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """{slot name: the initializer holding its stand-in}, found by value (exporters rename)."""
    from onnx import numpy_helper

    by_bytes: dict[bytes, list[Any]] = {}
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        by_bytes.setdefault(arr.tobytes() + str(arr.shape).encode(), []).append(init)
    found = {}
    for k, t in stand_ins.items():
        arr = t.numpy()
        hits = by_bytes.get(arr.tobytes() + str(arr.shape).encode(), [])
        if len(hits) != 1:
            raise ExportError(
                f"the exported graph has {len(hits)} initializers holding the factor {k!r} "
                "(expected 1: an exporter pass transposed, fused or copied it). Try "
                "optimize='none', or export the folded model instead.")
        found[k] = hits[0]
    return found


def _make_overridable(src: Path, dst: Path, tensors: Mapping[str, np.ndarray],
                      stand_ins: Mapping[str, torch.Tensor], targets: list[str],
                      base_digest: int, keep_external: bool = False) -> None:
    """Copy `src` to `dst` with the stand-in factors replaced by `tensors` under their slot
    names, listed as graph inputs, and the slot layout in the metadata (weights in
    ``<dst>.data`` when `keep_external` or when protobuf could not hold them)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(src))  # external data, if any, loaded
    found = _find_initializers(proto, stand_ins)
    inputs = {i.name for i in proto.graph.input}
    for k, init in found.items():
        old = init.name
        new = numpy_helper.from_array(np.ascontiguousarray(tensors[k]), k)
        init.CopyFrom(new)
        if old != k:
            for node in _all_nodes(proto.graph):
                for i, n in enumerate(node.input):
                    if n == old:
                        node.input[i] = k
            for vi in list(proto.graph.value_info):
                if vi.name == old:
                    proto.graph.value_info.remove(vi)
        if k not in inputs:
            elem = helper.np_dtype_to_tensor_dtype(tensors[k].dtype)
            proto.graph.input.append(
                helper.make_tensor_value_info(k, elem, list(tensors[k].shape)))
    layout = _layout(tensors)
    meta = {"format": _FORMAT, "targets": targets, "slots": layout,
            "fingerprint": _fingerprint(layout), "base_weights": base_digest}
    for p in list(proto.metadata_props):
        if p.key == META_KEY:
            proto.metadata_props.remove(p)
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    external = keep_external or proto.ByteSize() > 1_800_000_000
    onnx.save_model(proto, str(dst), save_as_external_data=external,
                    all_tensors_to_one_file=True,
                    location=dst.name + ".data" if external else None)


def _all_nodes(graph: Any) -> Any:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _flat_outputs(out: Any) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().float().cpu().numpy()]
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        vals = list(out.values()) if isinstance(out, Mapping) else list(out.to_tuple())
        return [v for x in vals for v in _flat_outputs(x)]
    if isinstance(out, (tuple, list)):
        return [v for x in out for v in _flat_outputs(x)]
    return []


def _feeds(session: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The example call as the file's feeds: keywords by name, positionals in input order."""
    wanted = [i.name for i in session.get_inputs() if not i.name.startswith("capaboost.")]
    positional = [n for n in wanted if n not in kwargs]
    values = dict(zip(positional, args, strict=False))
    values.update(kwargs)
    return {n: values[n].detach().cpu().numpy() for n in wanted
            if isinstance(values.get(n), torch.Tensor)}


def _compare(path: Path, tm: CapaBoostModel, args: tuple, kwargs: dict, rtol: float,
             atol: float) -> tuple[float, float]:
    """Run the file without an adapter; compare with the training module in eval mode."""
    import onnxruntime as ort

    was = tm.training
    tm.eval()
    try:
        with torch.no_grad():
            ref = _flat_outputs(tm(*args, **kwargs))
    finally:
        tm.train(was)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, _feeds(sess, args, kwargs))
    n = min(len(ref), len(got))
    if n == 0:
        raise VerificationError(f"{path}: no output to compare with the training module")
    abs_d = rel_d = 0.0
    for r, g in zip(ref[:n], got[:n], strict=True):
        if r.shape != g.shape:
            raise VerificationError(f"{path}: output shape {list(g.shape)} != the training "
                                    f"module's {list(r.shape)}")
        diff = np.abs(r.astype(np.float64) - g.astype(np.float64))
        abs_d = max(abs_d, float(diff.max()))
        rel_d = max(rel_d, float(diff.max() / max(np.abs(r).max(), 1e-12)))
        if not np.all(diff <= atol + rtol * np.abs(r)):
            raise VerificationError(
                f"{path}: run without an adapter, the multi-LoRA base differs from the "
                f"training module by {float(diff.max()):.3g} (rtol {rtol}, atol {atol}); "
                "not written. Report this with the model and spec.")
    return abs_d, rel_d


def export_multi_lora(module: Any, path: str | os.PathLike, example_inputs: Any = (),
                      example_kwargs: Any = None, *, dynamic_shapes: Any = None,
                      options: Any = None, **option_fields: Any) -> MultiLoraReport:
    """Write a multi-LoRA base: the unmerged model with one overridable A/B pair per target,
    defaults = `module`'s own adapters (``export_onnx(train_model, path, multi_lora=True)``).

    The graph is exported by `export_onnx` (fused and verified as any export) from your model's
    structure with each target wrapped as ``base(x) + (x·A_catᵀ)·(s·B_cat)ᵀ``; then the factors
    become initializers that are also graph inputs, named by `slot_names`, and the file is run
    once without an adapter against the training module before it lands (atomically).

    Example::

        rep = cbx.export_onnx(train_model, "base.onnx", example_kwargs=batch,
                              multi_lora=True)
        rep.slots            # {"capaboost.<target>.lora_A": {"shape": [in, d·r], ...}, ...}
    """
    from capaboost_fx.onnx.pipeline import ExportOptions, export_file

    opts = ExportOptions.of(options, option_fields)
    if not isinstance(module, CapaBoostModel):
        raise InputError(
            f"multi_lora=True needs the training module (transform's result), got "
            f"{type(module).__name__}: the base file's adapter slots are its adapters. For one "
            "fine-tune at zero extra cost, export fold(train_model) without multi_lora.")
    tm = require_training(module, "export_onnx(multi_lora=True)")
    if opts.quantize:
        raise InputError("multi_lora=True with quantize=: a quantized base would change what "
                         "the adapters were trained against; export without quantize")
    tensors = onnx_adapter_tensors(tm)
    stand_ins = _placeholders(tensors)
    serving = _serving_module(tm, stand_ins)
    final = Path(os.fspath(path)).absolute()
    if not final.parent.is_dir():
        raise FileWriteError(f"cannot write ONNX file {final}: directory {final.parent} does "
                             "not exist")
    args = example_inputs if isinstance(example_inputs, tuple) else (
        () if example_inputs is None else (example_inputs,))
    kwargs = dict(example_kwargs or {})
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        staged = tmpdir / "graph.onnx"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*training module.*")
            rep = export_file(serving, staged, example_inputs=args, example_kwargs=kwargs,
                              dynamic_shapes=dynamic_shapes,
                              options=_replace(opts, multi_lora=False))
        out = tmpdir / final.name
        targets = sorted(tm.adapters())
        _make_overridable(staged, out, tensors, stand_ins, targets, _base_digest(tm),
                          keep_external=bool(rep.external_data))
        abs_d, rel_d = _compare(out, tm, args, kwargs, opts.rtol, opts.atol)
        data = out.parent / (final.name + ".data")
        if data.exists():
            os.replace(data, final.parent / data.name)
        os.replace(out, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    rep.path = os.fspath(final)
    return MultiLoraReport(os.fspath(final), rep, _layout(tensors), targets, abs_d, rel_d,
                           ["the export's own verification ran with stand-in factors; the "
                            "written file was then run without an adapter against the "
                            f"training module: max abs diff {abs_d:.3g}"])


def _replace(opts: Any, **changes: Any) -> Any:
    import dataclasses

    names = {f.name for f in dataclasses.fields(opts)}
    return dataclasses.replace(opts, **{k: v for k, v in changes.items() if k in names})


# --------------------------------------------------------------------------- adapter files


def _ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError(f"onnx adapters need onnxruntime >= 1.20 ({e}): "
                                     "pip install 'capaboost-fx[onnx]'") from e
    if not hasattr(ort, "AdapterFormat"):
        raise MissingDependencyError(f"onnxruntime {ort.__version__} has no AdapterFormat "
                                     "(multi-LoRA needs >= 1.20): pip install -U onnxruntime")
    return ort


def _check_fit(layout: Mapping[str, Mapping[str, Any]], slots: Mapping[str, Mapping[str, Any]],
               what: str, base: str) -> None:
    missing = sorted(set(slots) - set(layout))
    extra = sorted(set(layout) - set(slots))
    problems = []
    if missing or extra:
        t_missing = sorted({k.rsplit(".", 1)[0].removeprefix("capaboost.") for k in missing})
        t_extra = sorted({k.rsplit(".", 1)[0].removeprefix("capaboost.") for k in extra})
        if t_missing:
            problems.append(f"targets the base has and {what} lacks: {t_missing[:6]}"
                            + (f" (+{len(t_missing) - 6} more)" if len(t_missing) > 6 else ""))
        if t_extra:
            problems.append(f"targets {what} has and the base lacks: {t_extra[:6]}"
                            + (f" (+{len(t_extra) - 6} more)" if len(t_extra) > 6 else ""))
    for k in sorted(set(slots) & set(layout)):
        s, g = slots[k], layout[k]
        if list(s["shape"]) != list(g["shape"]) or s["dtype"] != g["dtype"]:
            target, _, factor = k.removeprefix("capaboost.").rpartition(".")
            rank_s = s["shape"][1] if factor == "lora_A" else s["shape"][0]
            rank_g = g["shape"][1] if factor == "lora_A" else g["shape"][0]
            why = (f"rank d·r {rank_g} where the base has {rank_s}" if rank_s != rank_g
                   else f"shape {g['shape']} {g['dtype']} where the base has {s['shape']} "
                   f"{s['dtype']}")
            problems.append(f"target {target!r} {factor}: {why}")
            if len(problems) > 6:
                break
    if problems:
        raise AdapterMismatchError(
            f"{what} does not fit the multi-LoRA base {base}: " + "; ".join(problems)
            + ". Serve it on a base exported from a fine-tune with the same targets and "
            "rank·num_masks per target (a different mask seed or density is fine), or fold it.")


def save_onnx_adapter(train_model: Any, path: str | os.PathLike,
                      base: str | os.PathLike | None = None) -> Path:
    """Write `train_model`'s adapters as an onnxruntime ``.onnx_adapter`` file (rank-d·r LoRA
    factors, masks folded in) for a multi-LoRA base; with `base`, refuse a fine-tune that does
    not fit it (other targets, other rank·num_masks) by an `AdapterMismatchError`.

    The file is onnxruntime's own format (``onnxruntime.LoraAdapter().Load`` reads it); its
    ``adapter_version`` holds a CRC-32 of the tensors and ``model_version`` a digest of the
    base weights it was trained on (another base than `base`'s: a `CapaBoostWarning`), which
    `load_onnx_adapter` checks. Written atomically.

    Example::

        >>> cbx.save_onnx_adapter(tm_b, "b.onnx_adapter", base="base.onnx")  # doctest: +SKIP
    """
    ort = _ort()
    tm = require_training(train_model, "save_onnx_adapter()")
    tensors = onnx_adapter_tensors(tm)
    layout = _layout(tensors)
    if base is not None:
        meta = _base_meta(base)
        _check_fit(layout, meta["slots"], "this fine-tune", repr(os.fspath(base)))
        _check_base_weights(_base_digest(tm), meta, "this fine-tune", os.fspath(base))
    from capaboost_fx.adapter_file import atomic_write

    def write(tmp: str) -> None:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(_checksum(tensors))
        fmt.set_model_version(_base_digest(tm))
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                            for k, v in tensors.items()})
        fmt.export_adapter(tmp)

    try:
        return atomic_write(path, write)
    except OSError as e:
        raise FileWriteError(f"cannot write {os.fspath(path)!r}: {e.strerror or e}") from e


def read_onnx_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an ``.onnx_adapter`` file written by `save_onnx_adapter`, after checking
    that it is complete and unchanged (its CRC-32); a damaged file is an `AdapterFileError`.

    Example::

        >>> read_onnx_adapter("b.onnx_adapter")["capaboost.0.lora_A"].shape  # doctest: +SKIP
        (12, 8)
    """
    ort = _ort()
    p = Path(path)
    if not p.is_file():
        raise AdapterFileNotFoundError(f"onnx adapter {str(p)!r} does not exist")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(p))
        tensors = {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}
    except Exception as e:
        raise AdapterFileError(
            f"{str(p)!r} is damaged or not an onnxruntime adapter file (truncated? "
            f"{type(e).__name__}: {str(e).splitlines()[-1][:200]}). Write it again with "
            "save_onnx_adapter.") from None
    if fmt.get_adapter_version() != _checksum(tensors):
        raise AdapterFileError(
            f"{str(p)!r} fails its checksum: its tensors changed after save_onnx_adapter "
            "wrote it (or another tool wrote it). Write it again with save_onnx_adapter.")
    return tensors


def _check_base_weights(digest: int, meta: Mapping[str, Any], what: str, base: str) -> None:
    if meta.get("base_weights") is not None and digest != meta["base_weights"]:
        warnings.warn(
            f"{what} was trained on base weights that differ from those of the multi-LoRA "
            f"base {base!r} (a sampled digest of the targets' weights): served there, its "
            "answers are not those of its fine-tune. Serve it on the base it was trained on.",
            CapaBoostWarning, stacklevel=3)


def load_onnx_adapter(path: str | os.PathLike, base: str | os.PathLike | None = None,
                      *, slots: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """An ``onnxruntime.LoraAdapter`` for `path`, checked first (`read_onnx_adapter`: complete,
    unchanged) and, with `base` (the .onnx file) or `slots` (`lora_slots`), refused by an
    `AdapterMismatchError` when it does not fit that base.

    Example::

        >>> ad = cbx.load_onnx_adapter("b.onnx_adapter", base="base.onnx")  # doctest: +SKIP
        >>> ro = onnxruntime.RunOptions(); ro.add_active_adapter(ad)      # doctest: +SKIP
    """
    ort = _ort()
    tensors = read_onnx_adapter(path)
    if base is not None:
        meta = _base_meta(base)
        slots = meta["slots"] if slots is None else slots
        digest = ort.AdapterFormat.read_adapter(os.fspath(path)).get_model_version()
        _check_base_weights(digest, meta, f"adapter {os.fspath(path)!r}", os.fspath(base))
    if slots is not None:
        _check_fit(_layout(tensors), slots, f"adapter {os.fspath(path)!r}",
                   repr(os.fspath(base)) if base is not None else "(given slots)")
    adapter = ort.LoraAdapter()
    try:
        adapter.Load(os.fspath(path))
    except Exception as e:
        raise AdapterFileError(f"onnxruntime cannot load {os.fspath(path)!r}: {e}") from None
    return adapter


# --------------------------------------------------------------------------- serving


class MultiLoraSession:
    """One onnxruntime session over a multi-LoRA base and any number of adapters, one per
    `run`. Thread-safe: each run gets its own ``RunOptions``; adapters are checked when added.

    Args:
        base: the multi-LoRA ``.onnx`` file (``export_onnx(tm, path, multi_lora=True)``).
        adapters: ``{name: .onnx_adapter path}`` to load now (more with `add`).
        session_options: an ``onnxruntime.SessionOptions`` (default: quiet logging).
        providers: as for ``onnxruntime.InferenceSession`` (default: the CPU).

    Example::

        sess = cbx.MultiLoraSession("base.onnx", {"a": "a.onnx_adapter", "b": "b.onnx_adapter"})
        logits_a = sess.run({"input_ids": ids}, adapter="a")[0]
        logits_0 = sess.run({"input_ids": ids})[0]      # the base file's own adapters
    """

    def __init__(self, base: str | os.PathLike, adapters: Mapping[str, Any] | None = None, *,
                 session_options: Any = None, providers: Sequence[str] | None = None) -> None:
        ort = _ort()
        self.path = os.fspath(base)
        self.slots = lora_slots(self.path)
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # "initializer appears in graph inputs"
        self.session = ort.InferenceSession(self.path, session_options,
                                            providers=list(providers or
                                                           ["CPUExecutionProvider"]))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._adapters: dict[str, Any] = {}
        self._lock = threading.Lock()
        for name, p in (adapters or {}).items():
            self.add(name, p)

    def add(self, name: str, path: str | os.PathLike) -> None:
        """Load and check the adapter file `path` under `name` (replacing one of that name)."""
        adapter = load_onnx_adapter(path, base=self.path)
        with self._lock:
            self._adapters[name] = adapter

    def remove(self, name: str) -> None:
        """Forget the adapter `name` (runs already started keep it)."""
        with self._lock:
            self._adapters.pop(name, None)

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def run_options(self, adapter: str | None = None) -> Any:
        """A fresh ``onnxruntime.RunOptions`` with `adapter` active (None: the file's own)."""
        ro = _ort().RunOptions()
        if adapter is not None:
            with self._lock:
                found = self._adapters.get(adapter)
            if found is None:
                raise InputError(f"no adapter named {adapter!r}; loaded: {self.adapters}")
            ro.add_active_adapter(found)
        return ro

    def run(self, feeds: Mapping[str, Any], adapter: str | None = None,
            output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """``session.run`` with `adapter` active for this call only."""
        ro = self.run_options(adapter)
        feeds = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                 for k, v in feeds.items() if k in self.input_names}
        return self.session.run(list(output_names) if output_names else None, feeds, ro)
