"""Adapter files: save a training module's adapter, read and verify a file's header, and
rebuild a training module from a file (the format: `capaboost_fx.adapter_file`)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .adapter_file import (
    ADAPTER_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEADER_KEY,
    _digest,
    _header_digest,
    _unpack,
    _version,
    _weight_matches,
)
from .errors import (
    AdapterFileError,
    AdapterFileNotFoundError,
    CapaBoostError,
    CapaBoostWarning,
    SpecTypeError,
    close_names,
)
from .structure import weight_shape


def as_path(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise SpecTypeError(f"{what} needs a file path (str or os.PathLike), got "
                            f"{type(path).__name__}.")
    return Path(path)


def adapter_path(path: str | os.PathLike) -> Path:
    """`path`, or the adapter file inside it when it is a ``save_pretrained`` directory."""
    path = as_path(path, "an adapter file")
    if path.is_dir() and (path / ADAPTER_FILE).is_file():
        return path / ADAPTER_FILE
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an adapter file (or of the one in a ``save_pretrained``
    directory), validated (no tensors are read)."""
    from safetensors import safe_open

    path = adapter_path(path)
    if path.is_dir():
        _refuse_directory(path)
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
    _check_header_digest(header, path)
    return header


def _refuse_directory(path: Path) -> None:
    """A directory that is no ``save_pretrained`` output: say what it holds instead."""
    found = sorted(p.name for p in path.glob("*.safetensors"))[:5]
    hint = (f" It holds {found}; pass one of them." if found else "")
    if (path / "adapter_config.json").exists():
        hint = (" It holds a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors: "
                "a PEFT checkpoint, or to_peft_lora's export): load that with peft's "
                "PeftModel.from_pretrained, not load_adapter.")
    raise AdapterFileNotFoundError(
        f"adapter path {str(path)!r} is a directory that holds no capaboost_fx adapter; "
        "load_adapter takes the .safetensors file save_adapter wrote, a directory "
        f"train_model.save_pretrained wrote (holding {ADAPTER_FILE}), or a Trainer checkpoint "
        f"of a training module (holding model.safetensors with its header).{hint}")


def _check_header_digest(header: dict[str, Any], path: Path) -> None:
    digest = header.get("header_sha256")
    if digest is None:
        warnings.warn(CapaBoostWarning(
            f"{str(path)!r} has no header checksum (saved by an earlier capaboost_fx "
            f"{header.get('library', '?')}): its spec and shapes cannot be verified. Save it "
            "again to add one."), stacklevel=4)
        return
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


#: The file the HF Trainer writes a module's ``state_dict`` to in each checkpoint.
TRAINER_FILE = "model.safetensors"


def trainer_checkpoint(path: str | os.PathLike) -> Path | None:
    """The ``model.safetensors`` of a Trainer checkpoint of a training module (a directory
    holding one with a capaboost_fx header, or that file itself), else None."""
    from safetensors import safe_open

    path = as_path(path, "an adapter file")
    if path.is_dir():
        if (path / ADAPTER_FILE).is_file():
            return None
        path = path / TRAINER_FILE
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return path if HEADER_KEY in f.keys() else None
    except Exception:  # noqa: BLE001 - not a readable safetensors file: read_header says why
        return None


def check_targets(tm: Any, saved: dict[str, Any], path: Path) -> None:
    """The file's targets and weight shapes are this training module's."""
    base = tm.wrapped
    ours = {}
    for name, a in tm.adapters().items():
        ours[name] = {"weight": a.weight_fqn, "weight_shape": weight_shape(
            base, a.weight_fqn) if a.weight_fqn else None}
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


def copy_tensors(tm: Any, header: dict[str, Any], path: Path) -> None:
    """The file's adapter tensors, masks and trainable tensors into `tm`, each checksummed."""
    from safetensors import safe_open

    base, saved = tm.wrapped, header["targets"]
    try:
        with safe_open(str(path), framework="pt") as raw, torch.no_grad():
            f = _Verified(raw, header["sha256"], path)
            keys = set(raw.keys())
            for name, a in tm.adapters().items():
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


def check_base(model: Any, header: Mapping[str, Any], path: Any) -> None:
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
    now = {n: weight_shape(model, w) for n, w in weights.items() if isinstance(w, str)}
    shapes = [f"{n}: file {saved[n].get('weight_shape')} vs model {shape}"
              for n, shape in now.items() if saved[n].get("weight_shape") != shape]
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
