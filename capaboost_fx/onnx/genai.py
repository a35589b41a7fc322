"""Decoder LLMs for onnxruntime-genai: a merged checkpoint through its model builder, verified.

`export_genai` writes the model with its CapaBoost adapters merged (``merged_state_dict``) as a
Hugging Face checkpoint directory, copies the tokenizer beside it, runs
``python -m onnxruntime_genai.models.builder`` (KV-cache decoder graph, GroupQueryAttention,
fp32/fp16/bf16/int8/int4 for cpu/cuda/dml/webgpu; LLaMA, Qwen, Phi, Mistral, Gemma, ... — the
builder's list), and checks that greedy generation with onnxruntime-genai gives the tokens
``transformers``' ``generate`` gives. Needs ``pip install "capaboost-fx[genai]"``; runs offline.

Example (``cbx`` is ``capaboost_fx``)::

    from capaboost_fx.onnx.genai import export_genai
    rep = export_genai(train_model, "llm_onnx", base_model=model, tokenizer_dir="path/to/hf_dir")
    rep.tokens_match, rep.onnx_tokens

    import onnxruntime_genai as og
    og_model = og.Model("llm_onnx")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capaboost_fx.errors import ExportError, InputError, MissingDependencyError, VerificationError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

__all__ = ["GenaiReport", "export_genai"]


@dataclass
class GenaiReport:
    """What `export_genai` built and how its greedy tokens compare with transformers'."""

    out_dir: str
    checkpoint_dir: str  # the merged Hugging Face checkpoint the builder read
    precision: str
    execution_provider: str
    files: list[str]
    builder_seconds: float
    verified: bool
    prompt_ids: list[int] = field(default_factory=list)
    onnx_tokens: list[int] = field(default_factory=list)  # new tokens only
    torch_tokens: list[int] = field(default_factory=list)
    tokens_match: bool | None = None
    matching_prefix: int = 0  # new tokens equal before the first difference
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _write_checkpoint(module: Any, target: Path, base_model: nn.Module | None) -> None:
    from capaboost_fx.model import CapaBoostModel, FoldedModel

    if isinstance(module, CapaBoostModel):
        if base_model is not None:  # the caller's own model: merged weights, no copy of it
            base_model.save_pretrained(target, state_dict=module.merged_state_dict())
            return
        module = module.fold()
    if isinstance(module, FoldedModel):
        module = module.get_base_model()  # your class holding the merged weights
    if not hasattr(module, "save_pretrained"):
        raise InputError(
            f"export_genai needs a Hugging Face model (with save_pretrained), a capaboost_fx "
            f"training/deploy module of one, or a checkpoint directory; got "
            f"{type(module).__name__}"
        )
    module.save_pretrained(target)


def _copy_tokenizer(source: Path, target: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def _greedy_torch(checkpoint: Path, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else None,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def _greedy_genai(out_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(os.fspath(out_dir))
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt) :]]


def export_genai(
    module_or_dir: Any,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    *,
    # Eleven parameters: the builder's own options (precision, provider, extra_options), where
    # the checkpoint and tokenizer come from, and the token check; all but two have defaults.
    base_model: nn.Module | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    extra_options: Mapping[str, Any] | None = None,
    verify: bool = True,
    prompt_ids: Sequence[int] | None = None,
    new_tokens: int = 16,
) -> GenaiReport:
    """Build an onnxruntime-genai model folder from a (CapaBoost-adapted) decoder LLM.

    Args:
        module_or_dir: a capaboost_fx training module (adapters merged with
            ``merged_state_dict``), `fold`'s deploy module, a Hugging Face model, or a
            checkpoint directory.
        out_dir: the onnxruntime-genai folder to write (model.onnx, genai_config.json, ...).
        precision: "fp32", "fp16", "bf16", "int8" or "int4" (the builder's valid pairs:
            fp32/int8/int4 on cpu; fp16/bf16 on cuda; ...).
        execution_provider: "cpu", "cuda", "dml" or "webgpu".
        base_model: with a training module: your original model, into whose class the merged
            weights are saved without copying it (default: ``fold(...).get_base_model()``).
        tokenizer_dir: where the tokenizer files are (the builder needs them beside the
            checkpoint); default: the checkpoint directory itself.
        checkpoint_dir: where to write the merged checkpoint (default: ``out_dir/checkpoint``).
        extra_options: the builder's ``--extra_options`` (``{"int4_block_size": 32}``).
        verify: greedy-generate `new_tokens` tokens after `prompt_ids` with onnxruntime-genai
            and with transformers' ``generate`` from the checkpoint; fp32 must match token for
            token (else `VerificationError`), lower precisions report the matching prefix.
        prompt_ids: the prompt (default: the tokenizer's encoding of a short sentence).

    Example::

        rep = export_genai(train_model, "out", base_model=model, tokenizer_dir=tok_dir)
        assert rep.tokens_match
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}; use one of {list(PRECISIONS)}")
    if execution_provider not in PROVIDERS:
        raise InputError(
            f"execution_provider={execution_provider!r}; use one of {list(PROVIDERS)}"
        )
    if new_tokens < 1:
        raise InputError(f"new_tokens={new_tokens}; need at least 1")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"onnxruntime-genai is not installed ({e}): pip install 'capaboost-fx[genai]'"
        ) from e
    out = Path(os.fspath(out_dir)).absolute()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = _checkpoint(module_or_dir, out, checkpoint_dir, base_model, tokenizer_dir)
    seconds = _build(checkpoint, out, precision, execution_provider, extra_options)
    report = GenaiReport(
        out_dir=os.fspath(out),
        checkpoint_dir=os.fspath(checkpoint),
        precision=precision,
        execution_provider=execution_provider,
        files=sorted(p.name for p in out.iterdir() if p.is_file()),
        builder_seconds=round(seconds, 2),
        verified=False,
        notes=[],
    )
    if not verify:
        return report
    if execution_provider != "cpu" and not (
            execution_provider == "cuda" and torch.cuda.is_available()):
        report.notes.append(f"not verified: no {execution_provider} device here")
        return report
    return _verify_tokens(report, checkpoint, prompt_ids, new_tokens)


def _checkpoint(module_or_dir: Any, out: Path, checkpoint_dir: Any,
                base_model: nn.Module | None, tokenizer_dir: Any) -> Path:
    """The Hugging Face checkpoint the builder reads (written from a module when given one),
    with the tokenizer files beside it."""
    if isinstance(module_or_dir, (str, os.PathLike)):
        checkpoint = Path(os.fspath(module_or_dir)).absolute()
        if not (checkpoint / "config.json").is_file():
            raise InputError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)")
    else:
        checkpoint = Path(os.fspath(checkpoint_dir or out / "checkpoint")).absolute()
        checkpoint.mkdir(parents=True, exist_ok=True)
        _write_checkpoint(module_or_dir, checkpoint, base_model)
    if tokenizer_dir is not None:
        source = Path(os.fspath(tokenizer_dir)).absolute()
        if source != checkpoint:
            _copy_tokenizer(source, checkpoint)
    if not any((checkpoint / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise InputError(
            f"{checkpoint} holds no tokenizer (tokenizer.json or tokenizer.model); the "
            "onnxruntime-genai builder needs one: pass tokenizer_dir"
        )
    return checkpoint


def _build(checkpoint: Path, out: Path, precision: str, execution_provider: str,
           extra_options: Mapping[str, Any] | None) -> float:
    """Run ``onnxruntime_genai.models.builder`` (offline); its seconds."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    cmd += ["-i", os.fspath(checkpoint), "-o", os.fspath(out)]
    cmd += ["-p", precision, "-e", execution_provider]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genai_cache_") as cache:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run(
            [*cmd, "-c", cache], capture_output=True, text=True, env=env, check=False
        )
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise ExportError(
            f"onnxruntime_genai.models.builder failed for {checkpoint} -> {out} "
            f"(exit {proc.returncode}):\n" + "\n".join(tail)
        )
    return seconds


def _verify_tokens(report: GenaiReport, checkpoint: Path, prompt_ids: Sequence[int] | None,
                   new_tokens: int) -> GenaiReport:
    """Greedy tokens from onnxruntime-genai beside transformers' ``generate``; fp32 must
    match token for token."""
    if prompt_ids is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        prompt_ids = tokenizer("hello world, the quick brown fox").input_ids
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise InputError("prompt_ids is empty")
    out = Path(report.out_dir)
    report.prompt_ids = prompt
    report.torch_tokens = _greedy_torch(checkpoint, prompt, new_tokens)
    report.onnx_tokens = _greedy_genai(out, prompt, new_tokens)
    same = 0
    for a, b in zip(report.onnx_tokens, report.torch_tokens, strict=False):
        if a != b:
            break
        same += 1
    report.matching_prefix = same
    report.tokens_match = report.onnx_tokens == report.torch_tokens
    report.verified = True
    if not report.tokens_match and report.precision == "fp32":
        raise VerificationError(
            f"{out}: greedy tokens from onnxruntime-genai differ from transformers' generate "
            f"after {same} of {new_tokens} new tokens: onnx {report.onnx_tokens} vs torch "
            f"{report.torch_tokens}"
        )
    return report
