"""The training and deploy modules behave as the model they wrap.

`ModelLike`: attributes and methods the wrapped model has (``config``, ``generation_config``,
``get_input_embeddings``, ``main_input_name``, ``can_generate``, ...) are reachable on the
module itself, as on a PEFT ``PeftModel``; ``device`` and ``dtype`` work for any model.

`AdapterModelLike` (the training module) adds what fine-tuning stacks (the HF ``Trainer``,
TRL) call on a PEFT model:

- ``generate(...)`` runs your model's own ``generate`` (every argument, KV cache) on a
  *generation view*: your model's eager structure over the training module's tensors, with
  the targets' merged weights ``W0 + ΔW``. The view is built once and reused until an
  adapter changes (the optimizer's in-place updates bump the tensors' versions), so many
  generate calls between optimizer steps (RL rollouts) merge once; it holds no copy of the
  model besides the merged target weights.
- ``disable_adapter()``: a context in which the model runs without adapters (the reference
  model of DPO/GRPO), in forward and in ``generate``.
- ``state_dict()`` holds only what training changes (adapters and their masks, parameters
  that require grad, buffers the graph writes): the frozen base is your model's own storage,
  so Trainer checkpoints are adapter-sized; ``load_state_dict`` accepts such a dict.
- ``save_pretrained(dir)`` writes the adapter file (`capaboost_fx.load_adapter` reads the
  directory back), ``print_trainable_parameters()``, ``gradient_checkpointing_enable()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import CapaBoostAdapter
from .adapter_file import ADAPTER_FILE, write_adapter
from .errors import CapaBoostError
from .merge import is_quantized, merged_weights, restore_cache, structure_copy


class ModelLike:
    """Mixin for modules with a ``base_model``: unknown attributes come from the wrapped model."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__"):
                raise
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None:
                raise
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object (and the {type(base).__name__} it wraps) has "
                f"no attribute {name!r}") from None

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        """The wrapped model's dtype (the adapters' own may be float32 over a bf16 base)."""
        base = self.__dict__["_modules"]["base_model"]
        for p in base.parameters():
            if p.is_floating_point() and not is_quantized(p):
                return p.dtype
        return torch.float32


class AdapterModelLike(ModelLike, nn.Module):
    """Mixin of the training module: see the module docstring."""

    # What the training module (`capaboost_fx.model.CapaBoostModel`) provides.
    eager: bool
    base_model: nn.Module
    private_buffers: set[str]

    def adapters(self) -> dict[str, CapaBoostAdapter]:
        raise NotImplementedError

    def blocks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def structure_source(self) -> nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------ TRL's fused LM head

    def __setattr__(self, name: str, value: Any) -> None:
        # TRL's trainers call add_fused_lm_head(model), which sets model.forward to a wrapper
        # that runs model.base_model as a backbone; ours is the whole model. Keep our forward
        # and take the wrapper's settings instead (see `_fused_call`).
        settings = fused_settings(value) if name == "forward" else None
        if settings is None:
            super().__setattr__(name, value)
            return
        self.__dict__["_fused_settings"] = settings
        if self.eager:
            from trl.trainer.utils import add_fused_lm_head  # what sent us here

            add_fused_lm_head(self.base_model, **settings)

    def _fused_call(self, args: tuple, kwargs: dict) -> Any:
        """A call with TRL's ``fused_lm_head=...``: per-token log-probabilities (and the fields
        TRL asked for) of the labels, as TRL's fused head returns them."""
        fused = kwargs.pop("fused_lm_head")
        labels = kwargs.pop("labels", None)
        extra = {k: kwargs.pop(k) for k in ("shift_labels", "num_items_in_batch") if k in kwargs}
        if not fused:
            return self(*args, **kwargs, **({"labels": labels} if labels is not None else {}),
                        **extra)
        if self.eager:  # the shell carries TRL's own fused head (memory-efficient)
            return self.base_model(*args, fused_lm_head=True, labels=labels,
                                   **kwargs, **extra)
        kwargs["use_cache"] = False
        logits = self(*args, **kwargs).logits
        return fused_from_logits(logits, labels, extra.get("shift_labels"),
                                 extra.get("num_items_in_batch"),
                                 **self.__dict__.get("_fused_settings", {}))

    # ------------------------------------------------------------------ generation

    def _generation_key(self) -> tuple:
        adapters = self.adapters()
        key: list[Any] = [self.training]
        for a in adapters.values():
            key.append(a.enabled)
            key += [(id(p), p._version, p.device, p.dtype) for p in a.parameters()]
        return tuple(key)

    def generation_model(self) -> nn.Module:
        """Your model's eager structure with the adapters merged into the target weights
        (dense), over the training module's tensors: what ``generate`` runs. Rebuilt only
        when an adapter changed since the last call."""
        key = self._generation_key()
        cached = self.__dict__.get("_generation")
        if cached is not None and cached[0] == key:
            return cached[1]
        self.__dict__.pop("_generation", None)  # free the old merged weights first
        base = self.base_model
        on = {n: a for n, a in self.adapters().items() if a.enabled}
        quantized = [n for n, a in on.items() if a.weight_fqn and is_quantized(
            base.get_parameter(a.weight_fqn))]
        if self.eager and (quantized or not on):
            # Quantized targets stay quantized: the hooked eager model runs as it is.
            view = base
        else:
            # Generation uses the KV cache, as your model does.
            view = restore_cache(structure_copy(self.structure_source(), base,
                                                merged_weights(base, on)),
                                 self.capture_info.cache_users)
        view.train(self.training)
        self.__dict__["_generation"] = (key, view)
        return view

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Your model's ``generate`` (every argument, KV cache) with the adapters applied
        (merged into the target weights once, until they change); inside
        `disable_adapter` the base model generates."""
        view = self.generation_model()
        if not callable(getattr(view, "generate", None)):
            raise CapaBoostError(
                f"{type(view).__name__} has no generate(): only generative Hugging Face models "
                "(GenerationMixin) can generate. Call the training module for a forward pass."
            )
        return view.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model, adapters off (forward and ``generate``), as PEFT's
        ``disable_adapter()``: DPO's and GRPO's reference model at no memory cost."""
        adapters = list(self.adapters().values())
        before = [a.enabled for a in adapters]
        for a in adapters:
            a.enabled = False
        try:
            yield
        finally:
            for a, was in zip(adapters, before, strict=True):
                a.enabled = was

    # ------------------------------------------------------------------ training stacks

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Activation checkpointing per block (transformer layer), as your model's own
        ``activation_checkpointing_enable()`` does (non-reentrant): what the HF Trainer and
        TRL call for ``gradient_checkpointing=True``."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        if self.eager:
            base = self.base_model
            kwargs.setdefault("use_reentrant", False)
            if callable(getattr(base, "activation_checkpointing_enable", None)):
                base.activation_checkpointing_enable(kwargs, every_n_layers, offload)
            elif callable(getattr(base, "gradient_checkpointing_enable", None)):
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                raise CapaBoostError(
                    f"{type(base).__name__} has no activation_checkpointing_enable(); wrap its "
                    "blocks in torch.utils.checkpoint yourself.")
            return
        if offload or kwargs.get("use_reentrant"):
            raise CapaBoostError(
                "the graph path checkpoints blocks non-reentrantly, without CPU offload; drop "
                "offload / use_reentrant, or transform with capture='eager'.")
        blocks = list(self.blocks().values())
        if not blocks:
            raise CapaBoostError(
                "this training module has no blocks to checkpoint: call "
                "capaboost_fx.transform(..., blocks=['model.layers.*'], checkpoint=True) to name "
                "them (transformer layers are found automatically for Hugging Face models).")
        for i, b in enumerate(blocks):
            b.checkpoint = i % every_n_layers == 0

    def activation_checkpointing_disable(self) -> None:
        if self.eager:
            base = self.base_model
            off = getattr(base, "activation_checkpointing_disable", None) or \
                base.gradient_checkpointing_disable
            off()
            return
        for b in self.blocks().values():
            b.checkpoint = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None
                                      ) -> None:
        """`activation_checkpointing_enable` under its older name (PEFT's and transformers 4's)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        if self.eager:
            return bool(getattr(self.base_model, "is_gradient_checkpointing", False))
        return any(b.checkpoint for b in self.blocks().values())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(parameters that require grad, all parameters), as PEFT counts them."""
        params = list(self.parameters())
        return (sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params))

    def print_trainable_parameters(self) -> None:
        """Trainable, live (kept by at least one mask: the paper's count) and all parameters."""
        trainable, total = self.get_nb_trainable_parameters()
        adapters: dict[str, CapaBoostAdapter] = self.adapters()
        dead = sum(a.num_trainable() - a.num_live() for a in adapters.values())
        print(f"trainable params: {trainable:,} || live params: {trainable - dead:,} || "
              f"all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True,
                        **kwargs: Any) -> Path:
        """Write the adapter (and ``spec.trainable`` tensors) into `save_directory` as
        ``capaboost_adapter.safetensors``; `capaboost_fx.load_adapter(model, dir)` reads it.
        Every rank of a sharded run calls it; only the main process writes. Other keyword
        arguments of ``PreTrainedModel.save_pretrained`` are accepted and ignored."""
        out = Path(save_directory)
        if is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        write_adapter(self, out / ADAPTER_FILE, main_process=is_main_process)
        return out

    # ------------------------------------------------------------------ state

    def _frozen(self, name: str, t: torch.Tensor) -> bool:
        """A tensor of the caller's model that training never changes (not saved)."""
        if ".capaboost" in name or name.startswith("capaboost"):
            return False
        if isinstance(t, nn.Parameter):
            return not t.requires_grad
        return name.removeprefix("base_model.") not in self.private_buffers

    def _install_state_hooks(self) -> None:
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_allow_missing_frozen)


def _named_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def _drop_frozen(module: Any, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for name, t in _named_state(module).items():
        if module._frozen(name, t):
            state_dict.pop(prefix + name, None)


def _allow_missing_frozen(module: Any, incompatible: Any) -> None:
    state = _named_state(module)
    keep = [k for k in incompatible.missing_keys
            if k not in state or not module._frozen(k, state[k])]
    incompatible.missing_keys[:] = keep


def fused_settings(value: Any) -> dict[str, Any] | None:
    """The settings of TRL's ``_fused_forward`` wrapper (temperature, outputs, ...), or None
    when `value` is something else."""
    fn = getattr(value, "__func__", None)
    code = getattr(fn, "__code__", None)
    if code is None or code.co_name != "_fused_forward":
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ()),
                     strict=False))
    return {k: cells[k] for k in ("temperature", "cast_lm_head_to_fp32", "outputs") if k in cells}


def fused_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                      shift_labels: torch.Tensor | None, num_items_in_batch: Any,
                      temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> Any:
    """TRL's ``FusedCausalLMOutput`` computed from the logits of the captured graph (the
    logits are materialized; TRL's fused kernel avoids that on an eager model)."""
    from trl.trainer.utils import FusedCausalLMOutput

    if shift_labels is None:
        logits, labels = logits[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    mask = labels != -100
    z = logits.float() / temperature
    logp = z.log_softmax(-1)
    log_probs = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    fields: dict[str, Any] = {"log_probs": log_probs}
    if "entropy" in outputs:
        fields["entropy"] = -(logp.exp() * logp).sum(-1) * mask
    with torch.no_grad():
        if "log_sum_sq_probs" in outputs:
            fields["log_sum_sq_probs"] = torch.logsumexp(2 * logp, -1) * mask
        if "mean_logits" in outputs:
            fields["mean_logits"] = z.mean(-1) * mask
        if "is_top1" in outputs:
            fields["is_top1"] = (z.argmax(-1) == labels) & mask
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, label_mask=mask, **fields)
