"""Merge: the adapted weights ``W0 + ΔW`` and the eager modules that hold them.

    W = W0 + s · B_cat A_cat                       (LoRA-like adapters)
    W = W0 + M W0,  b = b0 + M b0 + c              (sequential adapters after a biased op)

computed in float32 (float64 for float64 weights) and rounded once to W0's dtype. A quantized
W0 (a tensor subclass such as torchao's NF4 or int8 weights, or a module such as bitsandbytes'
``Linear4bit`` whose weight is packed) is first turned into the dense weight the module
applies (`dense_weight`), and the merged result is dense.

`structure_copy` builds your model's eager structure over given tensors without copying the
rest (and sharing your model's config objects): `fold` uses it for the deploy module, the graph
executor for a generation view whose targets hold merged weights (cached until the adapters
change).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .adapter import ADAPTER_HOOKS, CapaBoostAdapter, expert_pre_hook, whole_tensor
from .errors import FoldError
from .structure import config_objects, is_quantized, owner_of


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def dense_weight(module: nn.Module | None, weight: torch.Tensor, layout: str = "out_in",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight (in `weight`'s storage layout) that `module` applies.

    Plain tensors are returned as they are. Quantized tensors dequantize themselves (torchao's
    ``get_original_weight()`` / ``dequantize()``); anything else (bitsandbytes' packed
    ``Params4bit``/``Int8Params``) is read off the module itself, by applying it to the
    identity: ``Wᵀ = module(I) - bias``, so no library is special-cased. The probe runs
    in train mode: bitsandbytes repacks a 4-bit weight in place on a no-grad eval call."""
    if not is_quantized(weight):
        return weight
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    logical = (out_f, in_f) if layout == "out_in" else (in_f, out_f)
    with torch.no_grad():
        for method in ("get_original_weight", "dequantize"):
            if getattr(type(weight), method, None) is getattr(torch.Tensor, method, None):
                continue  # torch's own (a plain int8 tensor "dequantizes" to its raw values)
            fn = getattr(weight, method, None)
            try:
                out = fn() if callable(fn) else None
            except Exception:  # noqa: BLE001 - try the next recipe; the probe always works
                out = None
            if (isinstance(out, torch.Tensor) and not is_quantized(out)
                    and out.is_floating_point() and tuple(out.shape) == logical):
                return out.to(dtype)
    if not isinstance(in_f, int):
        raise FoldError(f"cannot read the dense weight of a {type(weight).__name__} weight in "
                        f"{type(module).__name__}: the module has no in_features.")
    device = weight.device
    probe_dtype = getattr(module, "compute_dtype", None) or dtype
    was = module.training
    module.train()  # bitsandbytes repacks a 4-bit weight in place on a no-grad eval call
    try:
        with torch.no_grad():
            eye = torch.eye(in_f, dtype=probe_dtype, device=device)
            # forward, not __call__: the adapter hook of an eager target must not run here.
            # The bias is read, not probed with x = 0 (int8 kernels scale rows by their max).
            bias = getattr(module, "bias", None)
            w_t = module.forward(eye).to(dtype)
            if isinstance(bias, torch.Tensor):
                w_t = w_t - bias.to(dtype)
    finally:
        module.train(was)
    return w_t.T.contiguous() if layout == "out_in" else w_t.contiguous()


def refuse_nonlinear(adapters: Mapping[str, CapaBoostAdapter], what_to_do: str) -> None:
    """A `FoldError` when an adapter cannot merge into its weight, saying `what_to_do`."""
    nonlinear = [n for n, a in adapters.items() if not foldable(a)]
    if nonlinear:
        raise FoldError(
            f"targets {nonlinear[:3]} use an adapter that no weight of the model can hold "
            f"(nonlinear, or sequential after an op without bias); {what_to_do}.")


def foldable(a: CapaBoostAdapter) -> bool:
    """Folds into the model's own weights: LoRA-like adapters, and sequential adapters with an
    identity activation after an op that adds a bias (W' = (I+M)W, b' = (I+M)b + c)."""
    return a.linear or (a.sequential and a.activation == "identity" and a.bias_fqn is not None)


def base_weight(base: nn.Module, a: CapaBoostAdapter, dtype: torch.dtype) -> torch.Tensor:
    """The adapted weight W0 as a dense tensor in its storage layout."""
    w0 = base.get_parameter(a.weight_fqn)
    return whole_tensor(dense_weight(owner_of(base, a.weight_fqn), w0, a.layout, dtype))


@torch.no_grad()
def _sequential_merge(a: CapaBoostAdapter, w0: torch.Tensor, b0: torch.Tensor,
                      ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """y' = y + M y + c with y = W x + b:  W' = W + M W,  b' = b + M b + c."""
    m = a.delta_weight(ct).to(w0.device)
    b_down, b_up = (whole_tensor(b) for b in a.biases())
    _, b_cat = a.factors(whole=True)
    c = (b_cat.to(ct) @ b_down.to(ct) + b_up.to(ct)) * a.scaling
    w = w0.to(ct).T if a.layout == "in_out" else w0.to(ct)
    w_new = w + m @ w
    b_new = b0.to(ct) + m @ b0.to(ct) + c.to(w0.device)
    return (w_new.T if a.layout == "in_out" else w_new), b_new


def _out_dtype(module: nn.Module, w0: torch.Tensor) -> torch.dtype:
    """Merged weights keep W0's dtype; a packed (integer) W0 merges into the dtype its module
    computes in (``compute_dtype``, else its bias's, else float32)."""
    if w0.is_floating_point():
        return w0.dtype  # torchao's quantized tensors report their logical dtype
    bias = getattr(module, "bias", None)
    return (getattr(module, "compute_dtype", None)
            or (bias.dtype if isinstance(bias, torch.Tensor) else torch.float32))


@torch.no_grad()
def merged_weights(base: nn.Module, adapters: Mapping[str, CapaBoostAdapter]
                   ) -> dict[str, torch.Tensor]:
    """``{weight fqn: W0 + ΔW}`` (and merged biases of sequential adapters) in the original
    dtypes (dense for quantized weights) and storage layout, checked finite."""
    out = {}
    for name, a in adapters.items():
        if not foldable(a):
            continue
        raw = base.get_parameter(a.weight_fqn)
        ct = compute_dtype(raw)
        w0 = base_weight(base, a, ct)
        dtype = _out_dtype(owner_of(base, a.weight_fqn), raw)
        if a.sequential:
            b0 = whole_tensor(base.get_parameter(a.bias_fqn))
            w_new, b_new = _sequential_merge(a, w0, b0, ct)
            if not torch.isfinite(w_new.sum() + b_new.sum()):
                raise FoldError(f"the merged weight of sequential adapter {name!r} is not "
                                "finite; training diverged: lower the learning rate.")
            out[a.weight_fqn] = w_new.to(dtype)
            out[a.bias_fqn] = b_new.to(b0.dtype)
            continue
        delta = a.delta_weight(ct)
        if a.layout == "in_out":
            delta = delta.T
        # One reduction first (cheap); the exact count only when it is not finite.
        if not torch.isfinite(delta.sum()) and (bad := int((~torch.isfinite(delta)).sum())):
            raise FoldError(
                f"ΔW of target {name!r} has {bad} NaN/Inf entries; folding would corrupt the "
                "model. Training diverged: lower the learning rate or use gradient clipping, "
                "and reload the last good adapter."
            )
        out[a.weight_fqn] = (w0.to(ct) + delta.to(w0.device)).to(dtype)
    return out


def _plain_linear(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A dense ``nn.Linear`` holding `weight` (out × in) and the module's bias: what a
    quantized linear becomes once merged."""
    out_f, in_f = weight.shape
    bias = getattr(module, "bias", None)
    plain = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    return plain


def structure_copy(source: nn.Module, base: nn.Module, weights: Mapping[str, torch.Tensor],
                   snapshot: set[int] = frozenset(),
                   requantize: Callable[[nn.Linear], nn.Module] | None = None) -> nn.Module:
    """Your model's eager structure (`source`: the meta twin, or the eager shell itself) over
    `base`'s tensors: `weights` where given (merged targets), clones of the tensors whose ids
    are in `snapshot` (what training changes), aliases of everything else (no copy). Adapters
    and their hooks are left out; a quantized target given a dense weight becomes a plain
    ``nn.Linear`` (then ``requantize(linear)`` when given, e.g. your quantizer again)."""
    memo: dict[int, object] = dict(config_objects(source))
    adapters = [m for m in source.modules() if isinstance(m, CapaBoostAdapter)]
    for a in adapters:
        memo[id(a)] = a  # shared, then dropped below: never copied
    for fqn, t in source.named_parameters(remove_duplicate=False):
        if id(t) in memo:
            continue
        real = base.get_parameter(fqn)
        if real.is_meta:
            raise FoldError(
                f"{fqn} is still on the meta device: load the model's weights first "
                "(capaboost_fx.load_base_weights(train_model, checkpoint_dir))."
            )
        value = weights.get(fqn)
        if value is None:
            value = real.detach().clone() if id(real) in snapshot else real
        if is_quantized(value):
            memo[id(t)] = value  # a quantized parameter keeps its own class and state
        else:
            memo[id(t)] = nn.Parameter(value.detach() if value is real else value,
                                       requires_grad=False)
    for fqn, t in source.named_buffers(remove_duplicate=False):
        if id(t) in memo:
            continue
        real = base.get_buffer(fqn)
        memo[id(t)] = real.clone() if id(real) in snapshot else real
    out = copy.deepcopy(source, memo)
    for m in out.modules():
        for k in [k for k, v in m._modules.items() if isinstance(v, CapaBoostAdapter)]:
            del m._modules[k]
        for k in [k for k, h in m._forward_hooks.items() if h in ADAPTER_HOOKS]:
            del m._forward_hooks[k]
        for k in [k for k, h in m._forward_pre_hooks.items() if h is expert_pre_hook]:
            del m._forward_pre_hooks[k]
    for fqn, w in weights.items():
        owner_name, _, attr = fqn.rpartition(".")
        owner = out.get_submodule(owner_name) if owner_name else out
        if attr == "weight" and is_quantized(base.get_parameter(fqn)):
            parent_name, _, child = owner_name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            plain = _plain_linear(owner, w)
            parent._modules[child] = requantize(plain) if requantize is not None else plain
    return out
