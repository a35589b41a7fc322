"""Many fine-tunes on one onnxruntime-genai decoder: adapters switched per generator.

`export_genai_multi_lora` builds an onnxruntime-genai folder (KV cache, GroupQueryAttention)
from the *unmerged* base with the training module's adapters as LoRA paths (the builder's own
LoRA support: a PEFT LoRA directory as ``extra_options={"adapter_path": ...}``, which
`to_peft_lora` writes exactly), then makes each path's two factors overridable initializers
named as in `capaboost_fx.onnx.multi_lora` (``capaboost.<target>.lora_A`` / ``lora_B``). The
``.onnx_adapter`` files `save_onnx_adapter` writes for the ONNX Runtime path are then the
same files onnxruntime-genai loads (``og.Adapters(model).load(path, name)``) and a generator
selects (``generator.set_active_adapter(adapters, name)``).

Example::

    rep = export_genai_multi_lora(tm_a, "llm", tokenizer_dir="tok")
    cbx.save_onnx_adapter(tm_b, "b.onnx_adapter", base="llm/model.onnx")
    import onnxruntime_genai as og
    model = og.Model("llm"); adapters = og.Adapters(model)
    adapters.load("b.onnx_adapter", "b")
    generator = og.Generator(model, og.GeneratorParams(model))
    generator.set_active_adapter(adapters, "b")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capaboost_fx.errors import InputError, MissingDependencyError, VerificationError
from capaboost_fx.model import require_training
from capaboost_fx.onnx.genai import _build, _copy_tokenizer, _greedy_genai
from capaboost_fx.onnx.multi_lora import (
    _base_digest,
    _inner,
    _make_overridable,
    _placeholders,
    onnx_adapter_tensors,
    slot_names,
)

__all__ = ["GenaiMultiLoraReport", "export_genai_multi_lora", "generate_with_adapter"]


@dataclass
class GenaiMultiLoraReport:
    """What `export_genai_multi_lora` built; `tokens_match`: greedy tokens of the folder run
    without an adapter equal the training module's folded ``generate``."""

    out_dir: str
    targets: list[str]
    slots: dict[str, dict[str, Any]]
    builder_seconds: float
    prompt_ids: list[int] = field(default_factory=list)
    onnx_tokens: list[int] = field(default_factory=list)
    torch_tokens: list[int] = field(default_factory=list)
    tokens_match: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unmerged_model(tm: Any) -> nn.Module:
    """Your model's class and structure with its original (unmerged) weights: the fold's
    structure, each target's weight put back to the training module's W0 (shared, not
    copied; your model is not touched)."""
    structure = _inner(tm.fold())
    shell = _inner(tm)
    for name, a in tm.adapters().items():
        owner = structure.get_submodule(name)
        owner.weight = nn.Parameter(shell.get_parameter(a.weight_fqn).detach(),
                                    requires_grad=False)
    return structure


def _peft_stand_ins(tm: Any, folder: Path, stand_ins: dict[str, torch.Tensor]) -> None:
    """A PEFT LoRA directory (`to_peft_lora`'s config) holding the stand-in factors with
    scaling 1, so the builder writes them unchanged (found again by their bytes)."""
    from safetensors.torch import save_file

    from capaboost_fx.peft_export import to_peft_lora

    to_peft_lora(tm, folder)
    tensors = {}
    for name in tm.adapters():
        na, nb = slot_names(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = stand_ins[na].T.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = stand_ins[nb].T.contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = config["r"]  # PEFT scales by alpha / r: 1 for every target
    config["alpha_pattern"] = dict(config.get("rank_pattern") or {})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def generate_with_adapter(out_dir: str | os.PathLike, prompt_ids: Sequence[int],
                          new_tokens: int, adapter: str | os.PathLike | None = None) -> list[int]:
    """Greedy new tokens from an onnxruntime-genai folder, with the ``.onnx_adapter`` file
    `adapter` active (None: the folder's own adapters).

    Example::

        >>> generate_with_adapter("llm", [1, 2, 3], 8, "b.onnx_adapter")   # doctest: +SKIP
    """
    import numpy as np
    import onnxruntime_genai as og

    from capaboost_fx.onnx.multi_lora import read_onnx_adapter

    model = og.Model(os.fspath(out_dir))
    params = og.GeneratorParams(model)
    prompt = [int(t) for t in prompt_ids]
    total = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    if adapter is not None:
        read_onnx_adapter(adapter)  # complete and unchanged, before onnxruntime reads it
        adapters = og.Adapters(model)
        adapters.load(os.fspath(adapter), "adapter")
        generator.set_active_adapter(adapters, "adapter")
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt):]]


def export_genai_multi_lora(train_model: Any, out_dir: str | os.PathLike, *,
                            tokenizer_dir: str | os.PathLike,
                            prompt_ids: Sequence[int] | None = None, new_tokens: int = 10,
                            verify: bool = True) -> GenaiMultiLoraReport:
    """Build an onnxruntime-genai folder (fp32, CPU) of the unmerged base whose LoRA factors
    are overridable: serve any fine-tune with the same targets and ranks by its
    ``.onnx_adapter`` file (`save_onnx_adapter` with ``base=out_dir/model.onnx``), one per
    generator.

    Args:
        train_model: the training module; its adapters are the folder's defaults.
        out_dir: the folder to write (model.onnx, genai_config.json, tokenizer files).
        tokenizer_dir: a folder holding the tokenizer (``tokenizer.save_pretrained(dir)``).
        verify: greedy-generate `new_tokens` after `prompt_ids` without an adapter and compare
            with the fold's ``generate``; a difference is a `VerificationError`.

    Example::

        rep = export_genai_multi_lora(tm, "llm", tokenizer_dir="tok")
        rep.tokens_match
    """
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"onnxruntime-genai is not installed ({e}): pip install 'capaboost-fx[genai]'"
        ) from e
    tm = require_training(train_model, "export_genai_multi_lora()")
    tensors = onnx_adapter_tensors(tm)
    stand_ins = _placeholders(tensors)
    out = Path(os.fspath(out_dir)).absolute()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="genai_multi_lora_"))
    try:
        checkpoint = work / "checkpoint"
        model = _unmerged_model(tm)
        if not hasattr(model, "save_pretrained"):
            raise InputError(f"export_genai_multi_lora needs a Hugging Face decoder, got "
                             f"{type(model).__name__}")
        model.save_pretrained(checkpoint)
        _copy_tokenizer(Path(os.fspath(tokenizer_dir)).absolute(), checkpoint)
        _peft_stand_ins(tm, work / "peft", stand_ins)
        built = work / "built"
        seconds = _build(checkpoint, built, "fp32", "cpu",
                         {"adapter_path": os.fspath(work / "peft")})
        staged = work / "staged"
        staged.mkdir()
        targets = sorted(tm.adapters())
        _make_overridable(built / "model.onnx", staged / "model.onnx", tensors, stand_ins,
                          targets, _base_digest(tm), keep_external=True)
        for f in built.iterdir():
            if f.name not in ("model.onnx", "model.onnx.data") and f.is_file():
                shutil.copy2(f, staged / f.name)
        for f in staged.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from capaboost_fx.onnx.multi_lora import _layout

    report = GenaiMultiLoraReport(os.fspath(out), targets, _layout(tensors), round(seconds, 2))
    if not verify:
        return report
    if prompt_ids is None:
        from transformers import AutoTokenizer

        prompt_ids = AutoTokenizer.from_pretrained(out).encode("hello world, the quick brown")
    prompt = [int(t) for t in prompt_ids]
    report.prompt_ids = prompt
    report.onnx_tokens = _greedy_genai(out, prompt, new_tokens)
    folded = tm.fold()
    with torch.no_grad():
        got = folded.generate(torch.tensor([prompt]), do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    report.torch_tokens = [int(t) for t in got[0, len(prompt):]]
    report.tokens_match = report.onnx_tokens == report.torch_tokens
    if not report.tokens_match:
        raise VerificationError(
            f"{out}: greedy tokens without an adapter {report.onnx_tokens} differ from the "
            f"training module's folded generate {report.torch_tokens}")
    return report
