"""Facts about your model's structure that every layer asks: is a weight stored quantized,
which module owns a parameter, a weight's logical shape, which objects are its configs.
Nothing here changes a module."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _dense_subclasses() -> tuple[type, ...]:
    """Tensor subclasses that hold dense values: sharded (FSDP2), fake and functional ones."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    out: tuple[type, ...] = (FakeTensor, FunctionalTensor)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        out += (DTensor,)
    return out


_DENSE_SUBCLASSES = _dense_subclasses()


def is_quantized(t: Any) -> bool:
    """A weight stored in a form other than a dense float tensor (a tensor subclass that is
    neither ``nn.Parameter`` nor a distributed ``DTensor``, or a packed integer weight)."""
    if not isinstance(t, torch.Tensor):
        return False
    cls = type(t)
    if cls in (torch.Tensor, nn.Parameter) or issubclass(cls, _DENSE_SUBCLASSES):
        return False
    if issubclass(cls, nn.Parameter) and t.is_floating_point():
        # nn.Parameter subclasses over a plain float tensor are dense unless they carry
        # quantization state (bitsandbytes keeps it beside the data)
        return getattr(t, "quant_state", None) is not None or getattr(t, "SCB", None) is not None
    return True


def owner_of(base: nn.Module, fqn: str) -> nn.Module:
    owner = fqn.rpartition(".")[0]
    return base.get_submodule(owner) if owner else base


def weight_shape(model: nn.Module, fqn: str) -> list[int]:
    """A weight's logical shape as stored (a packed quantized weight reports its module's
    out × in, since the packed shape says nothing about the model)."""
    w = model.get_parameter(fqn)
    owner = owner_of(model, fqn)
    if is_quantized(w) and isinstance(getattr(owner, "in_features", None), int):
        return [owner.out_features, owner.in_features]
    return list(w.shape)


def config_objects(model: nn.Module) -> dict[int, Any]:
    """``{id: object}`` of the configuration objects the model's modules hold (anything with
    ``to_dict`` and ``to_json_string``: transformers' ``PretrainedConfig`` and
    ``GenerationConfig``), as a ``copy.deepcopy`` memo: every copy capaboost_fx makes of your
    model's structure shares your model's own configs (``tm.config is model.config``)."""
    out = {}
    for m in model.modules():
        for v in vars(m).values():
            if callable(getattr(v, "to_dict", None)) and callable(
                    getattr(v, "to_json_string", None)):
                out[id(v)] = v
    return out


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) wrapped modules of `module`."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())
