"""The face the training and deploy modules show to Hugging Face, TRL and PEFT users: your
model's own surface, with HF's and PEFT's meanings. Written once, over the executor
interface (`capaboost_fx.executors`), so it never asks which path runs the model.

`ModelFace` (both modules):

- attributes the wrapped model has (``config``, ``generation_config``, ``base_model`` (the
  backbone, as transformers means it), ``get_input_embeddings``, ``can_generate``, ...) are
  the wrapped model's own objects: ``tm.config is model.config``; what you or TRL set there
  drives ``generate`` and is what the fold and ``save_pretrained`` write;
- ``get_base_model()`` (PEFT's name): the wrapped model itself; ``device``, ``dtype``.

`TrainingFace` (the training module) adds what fine-tuning stacks call on a PEFT model:
``generate`` (on the executor's generation view), ``disable_adapter()`` and
``enable_adapter_layers()`` / ``disable_adapter_layers()``, ``merge_and_unload()`` (the fold),
``print_trainable_parameters()`` / ``get_nb_trainable_parameters()``,
``gradient_checkpointing_enable()``, TRL's fused LM head (``save_pretrained``, the adapter
file, is the training module's own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CapaBoostError
from .structure import is_quantized

if TYPE_CHECKING:
    from .adapter import CapaBoostAdapter


class ModelFace:
    """Mixin of modules holding your model as ``wrapped``: see the module docstring."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            if name.startswith("__"):
                raise
            wrapped = self.__dict__.get("_modules", {}).get("wrapped")
            if wrapped is None:
                raise
        try:
            return getattr(wrapped, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object (and the {type(wrapped).__name__} it wraps) "
                f"has no attribute {name!r}") from None

    def get_base_model(self) -> nn.Module:
        """Your model's structure that this module runs (PEFT's ``get_base_model``): over your
        storage with the adapters beside their targets (training module), or with merged
        weights (deploy module)."""
        return self.__dict__["_modules"]["wrapped"]

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        """The wrapped model's dtype (the adapters' own may be float32 over a bf16 base)."""
        for p in self.get_base_model().parameters():
            if p.is_floating_point() and not is_quantized(p):
                return p.dtype
        return torch.float32


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


class TrainingFace(ModelFace):
    """Mixin of the training module (`capaboost_fx.model.CapaBoostModel`)."""

    # transformers' own mark for "trainable adapters are attached to this model" (its
    # ``add_adapter`` sets it): true of every training module, so the Trainer accepts a
    # quantized base under it as it does under PEFT. Whether the quantization method can
    # train at all is checked by `transform` itself (`check_quantized_base`).
    _hf_peft_config_loaded = True

    executor: Any
    fused_head: dict[str, Any] | None

    def adapters(self) -> dict[str, CapaBoostAdapter]:
        raise NotImplementedError

    def __setattr__(self, name: str, value: Any) -> None:
        # TRL's trainers call add_fused_lm_head(model), which sets model.forward to a wrapper
        # running model.base_model as the backbone. The executor runs TRL's calls instead,
        # with the wrapper's settings (`Executor.fused_call`).
        settings = fused_settings(value) if name == "forward" else None
        if settings is None:
            super().__setattr__(name, value)
        else:
            super().__setattr__("fused_head", settings)

    # ------------------------------------------------------------------ PEFT's habits

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """As PEFT's: your model's class with the merged weights (the eager model inside
        `capaboost_fx.fold`'s deploy module; `fold` itself also keeps the captured graph)."""
        return self.fold(*args, **kwargs).get_base_model()  # type: ignore[attr-defined]

    def enable_adapter_layers(self) -> None:
        """Adapters on (PEFT's name)."""
        for a in self.adapters().values():
            a.enabled = True

    def disable_adapter_layers(self) -> None:
        """Adapters off until `enable_adapter_layers` (PEFT's name): the base model runs."""
        for a in self.adapters().values():
            a.enabled = False

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

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(parameters that require grad, all parameters), as PEFT counts them."""
        params = list(self.parameters())  # type: ignore[attr-defined]
        return (sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params))

    def print_trainable_parameters(self) -> None:
        """Trainable, live (kept by at least one mask: the paper's count) and all parameters."""
        trainable, total = self.get_nb_trainable_parameters()
        dead = sum(a.num_trainable() - a.num_live() for a in self.adapters().values())
        print(f"trainable params: {trainable:,} || live params: {trainable - dead:,} || "
              f"all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")

    # ------------------------------------------------------------------ generation

    def generation_model(self) -> nn.Module:
        """What ``generate`` runs: your model's eager structure with the adapters applied
        (graph path: merged into the target weights once, until an adapter changes)."""
        return self.executor.generation_view(self)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Your model's ``generate`` (every argument, KV cache, its ``generation_config``)
        with the adapters applied; inside `disable_adapter` the base model generates."""
        view = self.generation_model()
        if not callable(getattr(view, "generate", None)):
            raise CapaBoostError(
                f"{type(view).__name__} has no generate(): only generative Hugging Face models "
                "(GenerationMixin) can generate. Call the training module for a forward pass."
            )
        return view.generate(*args, **kwargs)

    # ------------------------------------------------------------------ checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Activation checkpointing per block (transformer layer), as your model's own
        ``activation_checkpointing_enable()``: what the HF Trainer and TRL call for
        ``gradient_checkpointing=True`` (either ``use_reentrant`` setting)."""
        if offload:
            raise CapaBoostError("checkpointing with CPU offload is not supported; drop "
                                 "offload=True.")
        done = self.executor.set_checkpointing(self, every_n_layers,
                                               dict(activation_checkpointing_kwargs or {}))
        self.capture_info.checkpointed = sorted(done)  # type: ignore[attr-defined]

    def activation_checkpointing_disable(self) -> None:
        self.executor.set_checkpointing(self, 0, {})
        self.capture_info.checkpointed = []  # type: ignore[attr-defined]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None
                                      ) -> None:
        """`activation_checkpointing_enable` under its older name (PEFT's and transformers 4's)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.executor.checkpointing(self)
