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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .adapter import CapaBoostAdapter, whole_tensor
from .errors import (
    AdapterFileError,
    CollectiveError,
    FileWriteError,
)
from .structure import is_quantized, weight_shape

FORMAT = "capaboost_fx.adapter"
FORMAT_VERSION = 1
#: The file's name inside a ``save_pretrained`` directory.
ADAPTER_FILE = "capaboost_adapter.safetensors"
#: The ``state_dict`` entry (uint8 JSON) that carries `state_header` in Trainer checkpoints.
HEADER_KEY = "capaboost_header"


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
    if hasattr(w, "full_tensor"):  # sharded: reading it would be a collective on one rank
        return None
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
    a base weight's values (a strided sample, rounded to each precision, in float32). None for
    a quantized weight: its stored bytes are not its values, and the same base loaded in float
    or quantized must match."""
    sample = None if is_quantized(w) else _sample(w)
    if sample is None:
        return None
    out = {"dtype": str(w.dtype).removeprefix("torch.")}
    for key, dtype in _DIGEST_DTYPES.items():
        out[key] = _sample_digest(sample, dtype)
    return out


def _weight_matches(saved: Mapping[str, Any], w: torch.Tensor) -> bool | None:
    """Whether `w` has the values `saved` (from `weight_digests`) was taken from; None when
    it cannot tell (a quantized weight). Compares at the coarser of the saved and the current
    precision."""
    sample = None if is_quantized(w) else _sample(w)
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


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU: a sharded ``DTensor`` (FSDP2) is gathered first."""
    return whole_tensor(t.detach()).cpu().contiguous()


def _targets(tm: Any) -> dict[str, Any]:
    out = {}
    for name, a in tm.adapters().items():
        shape = weight_shape(tm.wrapped, a.weight_fqn) if a.weight_fqn else None
        out[name] = {"weight": a.weight_fqn, "weight_shape": shape, "output_of": a.output_of,
                     "layout": a.layout, "A": list(a.A.shape), "B": list(a.B.shape),
                     "mask_A": list(a.mask_A.shape), "mask_B": list(a.mask_B.shape)}
    return out


def state_header(tm: Any) -> dict[str, Any]:
    """What a checkpoint of training module `tm` must agree with to be loaded into it: the
    spec, the base fingerprint (target names and weight shapes), digests of the base weights
    (taken now, from your storage: a sharded run keeps them) and the masks' checksums (masks
    are regenerated from the spec's seed, not stored)."""
    targets = {n: {"weight": t["weight"], "weight_shape": t["weight_shape"]}
               for n, t in _targets(tm).items()}
    base_weights = {}
    for name, info in targets.items():
        if info["weight"]:
            digests = weight_digests(tm.wrapped.get_parameter(info["weight"]))
            if digests is not None:
                base_weights[name] = digests
    masks = {n: _digest(torch.cat([_pack(_full(a.mask_A)), _pack(_full(a.mask_B))]))[:16]
             for n, a in tm.adapters().items()}
    header = {"format": FORMAT + ".state", "format_version": FORMAT_VERSION,
              "library": _version(), "spec": tm.spec.to_dict(), "targets": targets,
              "fingerprint": fingerprint(targets), "base_weights": base_weights,
              "masks_sha256": masks}
    return json.loads(json.dumps(header))


def check_state_header(own: Mapping[str, Any], saved: Mapping[str, Any], wrapped: Any) -> None:
    """Refuse a state (a Trainer checkpoint) whose header disagrees with this module's: another
    spec, another base architecture or base weights, other masks."""
    if saved.get("format") != own["format"]:
        raise AdapterFileError(f"the state's capaboost_fx header has format "
                               f"{saved.get('format')!r}, expected {own['format']!r}.")
    diff = {k: (saved["spec"].get(k), v) for k, v in own["spec"].items()
            if saved.get("spec", {}).get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in sorted(diff.items()))
        raise AdapterFileError(
            f"this checkpoint was trained with another spec ({shown}). Load it with "
            "capaboost_fx.load_adapter(model, checkpoint_dir, ...), which rebuilds the "
            "training module from the checkpoint's own spec.")
    if saved.get("fingerprint") != own["fingerprint"]:
        raise AdapterFileError(
            "this checkpoint was trained on another base architecture (its targets or their "
            f"weight shapes differ: {sorted(saved.get('targets', {}))[:4]} vs "
            f"{sorted(own['targets'])[:4]}); load it onto the model it was trained on.")
    other = [n for n, d in saved.get("base_weights", {}).items()
             if own["targets"].get(n, {}).get("weight")
             and _weight_matches(d, wrapped.get_parameter(own["targets"][n]["weight"])) is False]
    if other:
        shown = f"{other[:3]}" + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise AdapterFileError(
            f"this checkpoint was trained on other base weights: the weights of {len(other)} "
            f"targets ({shown}) hold other values than the ones it was trained on; load it "
            "onto the base checkpoint it was trained on.")
    masks = [n for n, d in saved.get("masks_sha256", {}).items()
             if own["masks_sha256"].get(n) != d]
    if masks:
        raise AdapterFileError(
            f"the masks regenerated here for {masks[:3]} differ from the ones the checkpoint "
            "was trained with (another torch version or mask kind registration?); save with "
            "capaboost_fx.save_adapter, which stores the masks themselves.")


def adapter_tensors(tm: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """(tensors to write, per-target info, ``spec.trainable`` names) of a training module:
    the adapters' A and B (and biases), their masks bit-packed, the trainable tensors."""
    base = tm.wrapped
    named: dict[str, CapaBoostAdapter] = tm.adapters()
    tensors: dict[str, torch.Tensor] = {}
    targets = _targets(tm)
    for name, a in named.items():
        for attr, _ in a.named_parameters():  # A, B (and a sequential adapter's biases)
            tensors[f"adapter.{name}.{attr}"] = _full(getattr(a, attr))
        tensors[f"adapter.{name}.mask_A"] = _pack(_full(a.mask_A))
        tensors[f"adapter.{name}.mask_B"] = _pack(_full(a.mask_B))
    # spec.trainable parameters: those still trainable besides the adapters' own A and B
    # (which may live inside the base module tree).
    own = {id(p) for a in named.values() for p in a.parameters()}
    trainable = [n for n, p in base.named_parameters() if p.requires_grad and id(p) not in own]
    for n in trainable:
        tensors[f"trainable.{n}"] = _full(base.get_parameter(n))
    return tensors, targets, trainable


def gather_guard(tm: Any, what: str) -> None:
    """Before gathering sharded tensors (FSDP2), which every rank must do together: on a gloo
    process group a monitored barrier turns a call made on some ranks only into a clear
    `CollectiveError` (after ``CAPABOOST_FX_COLLECTIVE_TIMEOUT`` seconds, default 120),
    instead of a hang or an abort. NCCL has no monitored barrier: there such a call waits."""
    import datetime

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if dist.get_backend() != "gloo" or not any(hasattr(p, "full_tensor")
                                               for p in tm.parameters()):
        return
    seconds = float(os.environ.get("CAPABOOST_FX_COLLECTIVE_TIMEOUT", "120"))
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=seconds))
    except RuntimeError as e:
        raise CollectiveError(
            f"{what} gathers the sharded adapters from every rank, so every rank must call it; "
            f"rank {dist.get_rank()} waited {seconds:g} s and not all ranks came "
            f"({str(e).splitlines()[0][:200]}). Call it on every rank and write on one: "
            "train_model.save_pretrained(dir, is_main_process=rank == 0).") from None


def write_adapter(tm: Any, path: str | os.PathLike, main_process: bool | None = None) -> Path:
    """Write the adapter file of training module `tm` (see the module docstring). After
    per-block FSDP2 this is a collective: every rank must call it (sharded tensors are
    gathered); only `main_process` writes (default: rank 0, or the only process). The base
    weights' digests are the ones taken at transform (before any sharding)."""
    from safetensors.torch import save_file

    if main_process is None:
        dist = torch.distributed
        main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    gather_guard(tm, "save_adapter / save_pretrained")
    tensors, targets, trainable = adapter_tensors(tm)
    if not main_process:
        return Path(path)
    # No weight (after a module's output), or a trained one saved whole: nothing to compare.
    base_weights = {n: d for n, d in tm.header["base_weights"].items()
                    if targets[n]["weight"] not in trainable}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "library": _version(),
              "spec": tm.spec.to_dict(), "targets": targets, "trainable": trainable,
              "fingerprint": fingerprint(targets), "base_weights": base_weights,
              "sha256": {k: _digest(t) for k, t in sorted(tensors.items())}}
    header = json.loads(json.dumps(header))  # canonical JSON types (lists, not tuples)
    header["header_sha256"] = _header_digest(header)
    return atomic_write(path, lambda tmp: save_file(
        tensors, tmp, metadata={"capaboost_fx": json.dumps(header)}))


