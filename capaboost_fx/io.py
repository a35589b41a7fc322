"""Adapters on disk: safetensors tensors + a JSON header. Loading never unpickles.

File layout (one ``.safetensors`` file):

- ``adapter.<target>.A`` / ``adapter.<target>.B``: the shared factors;
- ``adapter.<target>.mask_A`` / ``.mask_B``: the masks, bit-packed (uint8, ``numpy.packbits``),
  so they are rebuilt exactly on any machine whatever its RNG;
- ``trainable.<fqn>``: parameters of ``spec.trainable`` (e.g. a classifier head);
- metadata ``capaboost_fx``: JSON with the format version, library version, spec, per-target
  shapes and layout, a fingerprint of the base architecture (target names and weight shapes),
  ``base_weights`` (per target, short sha256 digests of a fixed strided sample of the base
  weight, to warn when the adapter is loaded onto other weights), the sha256 of every tensor,
  and ``header_sha256``: the sha256 of the canonical JSON of all the other header fields, so an
  edited header (say density 0.5 -> 0.7) is refused. Files without it (written before it
  existed) load with a `CapaBoostWarning`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .errors import (
    AdapterFileError,
    AdapterFileNotFoundError,
    CapaBoostError,
    CapaBoostWarning,
    FileWriteError,
    close_names,
)
from .model import require_training
from .passes.capture import BASE
from .passes.fold import adapters
from .spec import Spec

FORMAT = "capaboost_fx.adapter"
FORMAT_VERSION = 1


def _version() -> str:
    return __version__


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().astype(np.uint8).reshape(-1)))


def _unpack(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy().astype(np.uint8))[:n]
    if bits.size != n:
        raise AdapterFileError(f"a packed mask holds {bits.size} bits, {n} expected")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def _digest(t: torch.Tensor) -> str:
    # safetensors has no checksum of its own: this catches flipped bytes in tensor data.
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def fingerprint(targets: Mapping[str, Any]) -> str:
    """A short hash of target names, weight names and shapes: identifies a base architecture."""
    text = json.dumps({n: [t["weight"], t["weight_shape"]] for n, t in sorted(targets.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Entries sampled from each targeted base weight for `weight_digests`.
SAMPLE = 256
#: Precisions a weight digest is stored at, so a base loaded in another dtype still matches.
_DIGEST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sample(w: torch.Tensor) -> torch.Tensor | None:
    """SAMPLE entries of `w` at fixed evenly spaced flat positions (None if unreadable)."""
    try:
        flat = w.detach().reshape(-1)
        if flat.is_meta or flat.numel() == 0:
            return None
        n = flat.numel()
        k = min(n, SAMPLE)
        idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
        return flat[idx.to(flat.device)].cpu()
    except Exception:  # a sharded, lazy or exotic tensor: no fingerprint, no warning
        return None


def _sample_digest(sample: torch.Tensor, dtype: torch.dtype) -> str:
    values = sample.to(dtype).to(torch.float32) if sample.is_floating_point() else sample.float()
    return hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest()[:16]


def weight_digests(w: torch.Tensor) -> dict[str, str] | None:
    """``{"dtype": w's dtype, "float32"|"bfloat16"|"float16": digest}``: a cheap fingerprint of
    a base weight's values (a strided sample, rounded to each precision, in float32)."""
    sample = _sample(w)
    if sample is None:
        return None
    out = {"dtype": str(w.dtype).removeprefix("torch.")}
    for key, dtype in _DIGEST_DTYPES.items():
        out[key] = _sample_digest(sample, dtype)
    return out


def _weight_matches(saved: Mapping[str, Any], w: torch.Tensor) -> bool | None:
    """Whether `w` has the values `saved` (from `weight_digests`) was taken from; None when
    it cannot tell. Compares at the coarser of the saved and the current precision."""
    sample = _sample(w)
    if sample is None or not isinstance(saved, Mapping):
        return None
    now = str(w.dtype).removeprefix("torch.")
    key = now if now in ("bfloat16", "float16") else (
        saved.get("dtype") if saved.get("dtype") in ("bfloat16", "float16") else "float32")
    if not isinstance(saved.get(key), str):
        return None
    return saved[key] == _sample_digest(sample, _DIGEST_DTYPES[key])


def _header_digest(header: Mapping[str, Any]) -> str:
    """sha256 of the header's canonical JSON, without its own ``header_sha256`` field."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write(path: str | os.PathLike, write: Any, suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` then rename onto `path`: a failure leaves `path` untouched."""
    path = Path(path)
    if not path.parent.exists():
        raise FileWriteError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not "
                          "exist; create it first.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp",
                                   dir=path.parent)
    except OSError as e:
        raise FileWriteError(f"cannot write to {str(path.parent)!r}: {e.strerror}.") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_adapter(train_model: Any, path: str | os.PathLike) -> Path:
    """Write the adapters (and ``spec.trainable`` parameters) of a training module.

    Example:
        >>> cbx.save_adapter(train_model, "adapter.safetensors")     # doctest: +SKIP
    """
    from safetensors.torch import save_file

    tm = require_training(train_model, "save_adapter()")
    base = getattr(tm, BASE)
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, Any] = {}
    for name, a in adapters(tm).items():
        shape = list(base.get_parameter(a.weight_fqn).shape) if a.weight_fqn else None
        for attr, _ in a.named_parameters():  # A, B (and a sequential adapter's biases)
            tensors[f"adapter.{name}.{attr}"] = getattr(a, attr).detach().cpu().contiguous()
        tensors[f"adapter.{name}.mask_A"] = _pack(a.mask_A)
        tensors[f"adapter.{name}.mask_B"] = _pack(a.mask_B)
        targets[name] = {"weight": a.weight_fqn, "weight_shape": shape, "output_of": a.output_of,
                         "layout": a.layout, "A": list(a.A.shape), "B": list(a.B.shape),
                         "mask_A": list(a.mask_A.shape), "mask_B": list(a.mask_B.shape)}
    # spec.trainable parameters: those still trainable besides the adapters' own A and B
    # (which may live inside the base module tree).
    own = {id(p) for a in adapters(tm).values() for p in a.parameters()}
    trainable = [n for n, p in base.named_parameters() if p.requires_grad and id(p) not in own]
    for n in trainable:
        tensors[f"trainable.{n}"] = base.get_parameter(n).detach().cpu().contiguous()
    base_weights = {}
    for name, info in targets.items():
        # No weight (after a module's output), or a trained one saved whole: nothing to compare.
        if info["weight"] and info["weight"] not in trainable:
            digests = weight_digests(base.get_parameter(info["weight"]))
            if digests is not None:
                base_weights[name] = digests
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "library": _version(),
              "spec": tm.spec.to_dict(), "targets": targets, "trainable": trainable,
              "fingerprint": fingerprint(targets), "base_weights": base_weights,
              "sha256": {k: _digest(t) for k, t in sorted(tensors.items())}}
    header = json.loads(json.dumps(header))  # canonical JSON types (lists, not tuples)
    header["header_sha256"] = _header_digest(header)
    return atomic_write(path, lambda tmp: save_file(
        tensors, tmp, metadata={"capaboost_fx": json.dumps(header)}))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an adapter file, validated (no tensors are read)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))[:5]
        hint = (f" It holds {found}; pass one of them." if found else "")
        if (path / "adapter_config.json").exists():
            hint += (" (adapter_config.json + adapter_model.safetensors is a PEFT LoRA export "
                     "from to_peft_lora: load that with peft, not load_adapter.)")
        raise AdapterFileNotFoundError(
            f"adapter path {str(path)!r} is a directory; load_adapter needs the single "
            f".safetensors file written by capaboost_fx.save_adapter.{hint}")
    if not path.is_file():
        raise AdapterFileNotFoundError(f"adapter file {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise AdapterFileError(
            f"{str(path)!r} is not a readable safetensors adapter file (truncated or damaged?): "
            f"{e}. Save it again with capaboost_fx.save_adapter."
        ) from None
    try:
        header = json.loads(meta["capaboost_fx"])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError("wrong format tag")
        version = header["format_version"]
        if not isinstance(version, int):
            raise ValueError("format_version is not an int")
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterFileError(
            f"{str(path)!r} has no valid capaboost_fx header ({e}); it was not written by "
            "capaboost_fx.save_adapter."
        ) from None
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{str(path)!r} uses adapter format {version}, written by capaboost_fx "
            f"{header.get('library', '?')}; this is {_version()} (format {FORMAT_VERSION}). "
            "Upgrade capaboost-fx to load it."
        )
    for key, kind in (("spec", dict), ("targets", dict), ("trainable", list), ("sha256", dict)):
        if not isinstance(header.get(key), kind):
            raise AdapterFileError(f"{str(path)!r}: header field {key!r} is missing or malformed.")
    digest = header.get("header_sha256")
    if digest is None:
        warnings.warn(CapaBoostWarning(
            f"{str(path)!r} has no header checksum (saved by an earlier capaboost_fx "
            f"{header.get('library', '?')}): its spec and shapes cannot be verified. Save it "
            "again to add one."), stacklevel=3)
    else:
        try:
            ok = digest == _header_digest(header)
        except ValueError:  # NaN/Inf smuggled into the header
            ok = False
        if not ok:
            raise AdapterFileError(
                f"{str(path)!r}: the header (spec, target shapes, checksums) does not match its "
                "sha256: it was edited or damaged after saving. Save the adapter again from the "
                "training module instead of editing the file."
            )
    return header


def load_adapter(
    model: torch.nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> Any:
    """Rebuild the training module on a fresh copy of `model` from an adapter file.

    Example:
        >>> tm = cbx.load_adapter(model, "adapter.safetensors", example_inputs=(ids,))  # doctest: +SKIP
    """
    from safetensors import safe_open

    from .api import transform

    header = read_header(path)
    try:
        spec = Spec.from_dict(header["spec"])
    except CapaBoostError as e:
        raise AdapterFileError(f"{str(path)!r} holds an invalid spec: {e}") from None
    _check_base(model, header, path)
    tm = transform(model, spec, example_inputs, example_kwargs, dynamic_shapes)
    base = getattr(tm, BASE)
    saved = header["targets"]
    ours = {}
    for name, a in adapters(tm).items():
        ours[name] = {"weight": a.weight_fqn, "weight_shape": list(
            base.get_parameter(a.weight_fqn).shape) if a.weight_fqn else None}
    if set(saved) != set(ours) or any(
            [saved[n].get("weight"), saved[n].get("weight_shape")] !=
            [ours[n]["weight"], ours[n]["weight_shape"]] for n in ours):
        missing = sorted(set(saved) - set(ours))[:5]
        extra = sorted(set(ours) - set(saved))[:5]
        shapes = [f"{n}: file {saved[n].get('weight_shape')} vs model {ours[n]['weight_shape']}"
                  for n in sorted(set(saved) & set(ours))
                  if saved[n].get("weight_shape") != ours[n]["weight_shape"]][:5]
        raise AdapterFileError(
            f"{str(path)!r} was saved for another base model: targets only in the file "
            f"{missing}, only in this model {extra}, weight shapes differing {shapes}. "
            "Load it onto the model it was trained on."
        )
    try:
        with safe_open(str(path), framework="pt") as raw, torch.no_grad():
            f = _Verified(raw, header["sha256"], path)
            keys = set(raw.keys())
            for name, a in adapters(tm).items():
                info = saved[name]
                for attr, _ in a.named_parameters():
                    t = f.get_tensor(f"adapter.{name}.{attr}")
                    getattr(a, attr).copy_(_checked(t, getattr(a, attr).shape, path, name))
                for attr in ("mask_A", "mask_B"):
                    mask = _unpack(f.get_tensor(f"adapter.{name}.{attr}"), info[attr])
                    getattr(a, attr).copy_(_checked(mask, getattr(a, attr).shape, path, name))
            for n in header["trainable"]:
                if f"trainable.{n}" not in keys:
                    raise AdapterFileError(f"{str(path)!r} lacks trainable tensor {n!r}")
                p = base.get_parameter(n)
                p.copy_(_checked(f.get_tensor(f"trainable.{n}"), p.shape, path, n))
    except CapaBoostError:
        raise
    except Exception as e:
        raise AdapterFileError(
            f"{str(path)!r} is damaged: {type(e).__name__}: {e}. Save it again."
        ) from None
    return tm


def _check_base(model: Any, header: Mapping[str, Any], path: Any) -> None:
    """Before any capture: the file's targets and trainable tensors must exist in `model` with
    the saved shapes (else it was saved for another model); warn when the targeted base
    weights hold other values than at save time."""
    if not isinstance(model, torch.nn.Module):
        return  # transform() reports the wrong type
    state = {**dict(model.named_buffers(remove_duplicate=False)),
             **dict(model.named_parameters(remove_duplicate=False))}
    saved = header["targets"]
    weights = {n: info.get("weight") for n, info in saved.items() if isinstance(info, Mapping)}
    wanted = [w for w in weights.values() if isinstance(w, str)]
    wanted += [n for n in header["trainable"] if isinstance(n, str)]
    missing = [w for w in wanted if w not in state]
    if missing:
        near = close_names(missing[0], state, n=3)
        raise AdapterFileError(
            f"{str(path)!r} was saved for another model: {len(missing)} of the {len(wanted)} "
            f"weights it adapts or trains are not in this {type(model).__name__}, e.g. "
            f"{missing[:3]} (closest names here: {near}). Load it onto the model it was "
            "trained on."
        )
    shapes = [f"{n}: file {saved[n].get('weight_shape')} vs model {list(state[w].shape)}"
              for n, w in weights.items()
              if isinstance(w, str) and saved[n].get("weight_shape") != list(state[w].shape)]
    if shapes:
        raise AdapterFileError(
            f"{str(path)!r} was saved for another base model: weight shapes differing "
            f"{shapes[:5]}. Load it onto the model it was trained on."
        )
    digests = header.get("base_weights")
    if not isinstance(digests, Mapping):
        return  # written before base weights were fingerprinted
    differ = [n for n, d in digests.items()
              if isinstance(weights.get(n), str) and _weight_matches(d, state[weights[n]]) is False]
    if differ:
        warnings.warn(CapaBoostWarning(
            f"{str(path)!r}: {len(differ)} of the {len(digests)} targeted base weights hold "
            f"other values than the base the adapter was trained on (e.g. {differ[:3]}); it "
            "loads, but the results will not be the trained model's. Load it onto the same "
            "base checkpoint."), stacklevel=3)


class _Verified:
    """Reads tensors from a safetensors handle and checks each against the header's sha256."""

    def __init__(self, handle: Any, digests: Mapping[str, str], path: Any) -> None:
        self.handle, self.digests, self.path = handle, digests, path

    def get_tensor(self, key: str) -> torch.Tensor:
        t = self.handle.get_tensor(key)
        if self.digests.get(key) != _digest(t):
            raise AdapterFileError(
                f"{str(self.path)!r}: tensor {key!r} does not match its checksum; the file is "
                "corrupted. Save it again from the training module."
            )
        return t


def _checked(t: torch.Tensor, shape: torch.Size, path: Any, name: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise AdapterFileError(
            f"{str(path)!r}: tensor for {name!r} has shape {tuple(t.shape)}, expected "
            f"{tuple(shape)}; the file is damaged or from another model."
        )
    return t
