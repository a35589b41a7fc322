"""Exact export of a CapaBoost adapter as a plain PEFT LoRA adapter of rank d·r.

    ΔW = s · Σ_i (B ⊙ M^B_i)(A ⊙ M^A_i) = s · B_cat A_cat

so a LoRA adapter with ``lora_A = A_cat`` (d·r × in), ``lora_B = B_cat`` (out × d·r) and
``lora_alpha = s · d·r`` (PEFT scales by lora_alpha / r) is the same update with no
approximation: PEFT, vLLM and other LoRA runtimes load it as it is. Per-target ranks go to
``rank_pattern`` / ``alpha_pattern``; ``spec.trainable`` modules go to ``modules_to_save``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .adapter import not_lora_form
from .adapter_file import atomic_write
from .errors import MissingDependencyError, NotTransformedError, TargetError


def _lora_tensors(tm: Any) -> tuple[dict[str, torch.Tensor], dict[str, int],
                                     dict[str, float], set[str]]:
    """PEFT's ``lora_A``/``lora_B`` tensors of every target (A_cat, B_cat: rank d·r), with
    each target's rank and alpha and the weight layouts seen; refuses what LoRA cannot hold."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    layouts = set()
    for name, a in tm.adapters().items():
        why = not_lora_form(name, a)
        if why:
            raise TargetError(f"{why}: PEFT LoRA runs A/B pairs on modules only. Exclude it, "
                              "or use save_adapter / fold.")
        a_cat, b_cat = (t.detach().float().cpu().contiguous() for t in a.factors())
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_cat
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_cat
        r = a_cat.shape[0]
        ranks[name], alphas[name] = r, a.scaling * r
        layouts.add(a.layout)
    if len(layouts) > 1:
        raise TargetError(
            "targets mix nn.Linear (out×in) and Conv1D (in×out) weights; a PEFT config has one "
            "fan_in_fan_out flag. Export them in two adapters (two specs)."
        )
    return tensors, ranks, alphas, layouts


def _modules_to_save(tm: Any, tensors: dict[str, torch.Tensor]) -> list[str]:
    """PEFT's ``modules_to_save`` for `Spec.trainable`, their tensors added to `tensors`."""
    base = tm.wrapped
    modules_to_save: list[str] = []
    module_names = {n for n, _ in base.named_modules()}
    for n, p in base.named_parameters():
        if not p.requires_grad:
            continue
        owner = n.rpartition(".")[0]
        if owner not in module_names or not owner:
            raise TargetError(f"trainable parameter {n!r} has no owning module for PEFT.")
        top = next((m for m in tm.spec.trainable if owner == m or owner.startswith(m + ".")),
                   owner)
        if top not in modules_to_save:
            modules_to_save.append(top)
        tensors[f"base_model.model.{n}"] = p.detach().cpu().contiguous()
    return modules_to_save


def to_peft_lora(train_model: Any, path: str | os.PathLike) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into directory `path`.

    Example:
        >>> cbx.to_peft_lora(train_model, "peft_adapter")                 # doctest: +SKIP
        >>> PeftModel.from_pretrained(base_model, "peft_adapter")        # doctest: +SKIP
    """
    from safetensors.torch import save_file

    tm = train_model
    if not isinstance(getattr(tm, "adapter_paths", None), dict):  # a training module's registry
        raise NotTransformedError(
            f"to_peft_lora() needs a transformed module, got {type(tm).__name__}: pass the "
            "module capaboost_fx.transform(model, spec, ...) returned (not the folded one).")
    tensors, ranks, alphas, layouts = _lora_tensors(tm)
    modules_to_save = _modules_to_save(tm, tensors)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise MissingDependencyError(
            f"to_peft_lora writes PEFT's own adapter_config.json and needs peft ({e}): "
            "pip install 'capaboost-fx[peft]'"
        ) from e
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=tm.spec.dropout, target_modules=sorted(ranks),
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        fan_in_fan_out=layouts == {"in_out"}, bias="none",
        modules_to_save=modules_to_save or None, inference_mode=True,
    ).to_dict()  # PEFT's schema, as its save_pretrained writes it
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(
        tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)))
    return out
