"""Big models without big memory: give a training module built from a meta-device model its
real weights, streamed from safetensors shards straight into place.

    with accelerate.init_empty_weights():          # parameters on meta, buffers real
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    tm = capaboost_fx.transform(model, spec, example_kwargs={"input_ids": ids})
    capaboost_fx.load_base_weights(tm, "path/to/checkpoint_dir", device="cuda")

Each tensor is read from its shard (memory-mapped) and *assigned* in place of the meta
placeholder, never copied into existing storage, so peak memory is about the model's size and
a real model the shell shares storage with is never written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterFileNotFoundError, InputError, NotTransformedError
from .model import CapaBoostModel


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise AdapterFileNotFoundError(f"{path} does not exist: pass a safetensors file or a "
                                       "checkpoint directory (model.safetensors or shards).")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AdapterFileNotFoundError(f"{path} holds no *.safetensors file; save the model "
                                       "with save_pretrained(..., safe_serialization=True).")
    return files


def _slots(base: nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, list[tuple[dict, str]]]]:
    """Every parameter and buffer by name, and for each tensor the dict slots that hold it
    (tied weights: several)."""
    where: dict[int, list[tuple[dict, str]]] = {}
    named: dict[str, torch.Tensor] = {}
    for m_name, m in base.named_modules(remove_duplicate=False):
        for d in (m._parameters, m._buffers):
            for k, v in d.items():
                if v is None:
                    continue
                named[f"{m_name}.{k}" if m_name else k] = v
                where.setdefault(id(v), []).append((d, k))
    return named, where


def _stream(base: nn.Module, path: Path, target: torch.device, dtype: torch.dtype | None,
            prefix: str) -> tuple[int, list[str]]:
    """Assign each checkpoint tensor to every slot of the tensor it names; (loaded count,
    keys that name nothing)."""
    from safetensors import safe_open

    named, where = _slots(base)
    loaded, unexpected = 0, []
    done: set[int] = set()
    for shard in _shards(path):
        with safe_open(str(shard), framework="pt", device=str(target)) as f:
            for key in f.keys():
                name = key[len(prefix):] if prefix and key.startswith(prefix) else key
                old = named.get(name)
                if old is None:
                    unexpected.append(key)
                    continue
                if id(old) in done:
                    continue
                value = f.get_tensor(key)
                if tuple(value.shape) != tuple(old.shape):
                    raise InputError(f"{key}: checkpoint shape {tuple(value.shape)} != model "
                                     f"shape {tuple(old.shape)}; wrong checkpoint for this model.")
                value = value.to(dtype or old.dtype)
                new = (nn.Parameter(value, requires_grad=old.requires_grad)
                       if isinstance(old, nn.Parameter) else value)
                for d, k in where[id(old)]:
                    d[k] = new
                done.add(id(old))
                loaded += 1
    return loaded, unexpected


def load_base_weights(train_model: CapaBoostModel, path: str | Path,
                      device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None, strict: bool = True,
                      prefix: str = "") -> dict[str, Any]:
    """Stream the base model's weights from safetensors into `train_model`, shard by shard.

    Keys are your model's ``state_dict`` keys (``prefix`` is stripped first). Each loaded
    tensor goes to `device` (default: CPU) in `dtype` (default: the dtype the model was built
    with) and is assigned to every alias of that parameter (tied weights follow). The
    adapters move to `device` too and stay in float32 for a half-precision base.
    ``strict``: refuse keys that name nothing, and any parameter still on the meta device.
    Returns ``{"loaded": n, "unexpected": [...], "seconds": s}``."""
    if not isinstance(train_model, CapaBoostModel):
        raise NotTransformedError(
            f"load_base_weights needs the module capaboost_fx.transform returned, got "
            f"{type(train_model).__name__}."
        )
    import time

    t0 = time.perf_counter()
    base: nn.Module = train_model.wrapped
    target = torch.device(device) if device is not None else torch.device("cpu")
    loaded, unexpected = _stream(base, Path(path), target, dtype, prefix)
    for a in train_model.adapters().values():
        a.to(target)
    train_model.capaboost_constants.to(target)
    still = [n for n, t in base.named_parameters() if t.is_meta]
    still += [n for n, t in base.named_buffers() if t.is_meta]
    if strict and unexpected:
        raise InputError(f"{len(unexpected)} checkpoint keys name nothing in the model, e.g. "
                         f"{unexpected[:3]}; pass prefix=... or strict=False.")
    if strict and still:
        raise InputError(
            f"{len(still)} tensors are still on the meta device after loading, e.g. {still[:3]}. "
            "Non-persistent buffers (rotary inv_freq, ...) are not in checkpoints: build the "
            "model with accelerate.init_empty_weights() (parameters on meta, buffers real) "
            "rather than torch.device('meta')."
        )
    return {"loaded": loaded, "unexpected": unexpected,
            "seconds": round(time.perf_counter() - t0, 3)}
