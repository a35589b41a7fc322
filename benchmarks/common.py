"""Shared pieces of the benchmarks: model sizes, the training configurations compared,
paired (side-by-side) timing, statistics and tables.

Every figure the benchmarks report is a ratio measured side by side in one process: the
configurations are run in alternation, round after round (the order rotates every round), and
each round gives one ratio A/B from two measurements taken seconds apart. The report is the
median of those per-round ratios with their spread (quartiles and min/max), so that a noisy,
shared machine moves both sides of a ratio together.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/run.py` from anywhere uses this checkout
    sys.path.insert(0, ROOT)

import capaboost_fx as cbx  # noqa: E402
from capaboost_fx.onnx.timing import (  # noqa: E402
    conditions,
    describe_conditions,
    round_order,  # noqa: E402
)

TARGETS = ["*.query", "*.value"]
THREADS = 2


# --------------------------------------------------------------------------- sizes and modes


@dataclass(frozen=True)
class Size:
    """A BERT shape: BertConfig(hidden_size, num_attention_heads, intermediate_size, L)."""

    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    layers: int = 4
    vocab: int = 30522

    def config(self) -> Any:
        from transformers import BertConfig

        return BertConfig(
            hidden_size=self.hidden, num_attention_heads=self.heads,
            intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            vocab_size=self.vocab, num_labels=2,
        )

    def describe(self) -> str:
        return (f"BertForSequenceClassification(BertConfig(hidden_size={self.hidden}, "
                f"num_attention_heads={self.heads}, intermediate_size={self.intermediate}, "
                f"num_hidden_layers={self.layers}, vocab_size={self.vocab}, num_labels=2))")

    def to_dict(self) -> dict[str, int]:
        return {"hidden_size": self.hidden, "num_attention_heads": self.heads,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "vocab_size": self.vocab}


@dataclass(frozen=True)
class Settings:
    """Everything a mode (full or quick) fixes: sizes, batch, rounds."""

    quick: bool
    size: Size
    batch: int
    seq: int
    step_rounds: int
    layer_rounds: int
    fold_sizes: tuple[Size, ...]
    fold_repeats: int
    onnx_rounds: int
    onnx_iters: dict[int, int] = field(default_factory=dict)
    threads: int = THREADS

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "quick" if self.quick else "full",
            "model": self.size.describe(), "size": self.size.to_dict(),
            "batch": self.batch, "seq": self.seq, "dtype": "float32", "device": "cpu",
            "threads": self.threads, "step_rounds": self.step_rounds,
            "layer_rounds": self.layer_rounds, "fold_repeats": self.fold_repeats,
            "onnx_rounds": self.onnx_rounds,
        }


BERT_BASE = Size()


def settings(quick: bool, layers: int | None = None) -> Settings:
    if quick:
        tiny = Size(hidden=64, heads=4, intermediate=256, layers=layers or 2, vocab=1000)
        return Settings(
            quick=True, size=tiny, batch=8, seq=32, step_rounds=2, layer_rounds=2,
            fold_sizes=tuple(Size(64, 4, 256, n, 1000) for n in (1, 2, 3, 4)),
            fold_repeats=1, onnx_rounds=2, onnx_iters={1: 2, 8: 2},
            # One thread: the quick run only checks that the scripts work, and on a shared CI
            # machine every 2-thread op of a tiny model waits a scheduler tick for its second
            # thread (a quick run took 117 s instead of 51 s that way).
            threads=1,
        )
    size = Size(layers=layers or 2)
    return Settings(
        quick=False, size=size, batch=8, seq=128, step_rounds=12, layer_rounds=10,
        fold_sizes=tuple(Size(layers=n) for n in (1, 2, 4, 8, 12)),
        fold_repeats=3, onnx_rounds=12, onnx_iters={1: 10, 8: 3},
    )


def setup_torch(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    for name in ("torch.onnx", "torch._export", "torch.export", "transformers", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- inputs / models


def make_batch(size: Size, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids, a padding mask (half the rows padded to 3/4 length) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, size.vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, (3 * seq) // 4:] = 0
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_model(size: Size, seed: int = 0) -> nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(size.config())
    model.train()
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def quiet() -> contextlib.AbstractContextManager:
    """Silence the stdout/stderr chatter of exporters (torch.onnx prints progress)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


# --------------------------------------------------------------------------- reference modules


class EagerAdapterLinear(nn.Module):
    """`y = base(x) + adapter(x)` in eager mode: exactly what capaboost_fx's rewrite inserts
    into the captured graph, installed by module replacement instead (same adapter object
    class, same math). Used to measure what the capture itself costs."""

    def __init__(self, base: nn.Linear, adapter: nn.Module) -> None:
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter(x)


class LoopMaskedLoRA(nn.Module):
    """The "official formulation": d masked copies of one shared (A, B), computed one after
    another in a Python loop, as the official CapaBoost code runs its d tied adapters:

        y = base(x) + Σ_i s · ((x @ (A ⊙ M^A_i)ᵀ) @ (B ⊙ M^B_i)ᵀ)
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor,
                 mask_A: torch.Tensor, mask_B: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        self.register_buffer("mask_A", mask_A.detach().clone())
        self.register_buffer("mask_B", mask_B.detach().clone())
        self.scaling = scaling
        self.num_masks = mask_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for i in range(self.num_masks):
            a = self.A * self.mask_A[i]
            b = self.B * self.mask_B[i]
            y = y + self.scaling * ((x @ a.T) @ b.T)
        return y


def replace_linears(model: nn.Module, names: Sequence[str],
                    make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Module replacement: `model.<name>` becomes `make(name, old_linear)`."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))


def freeze(model: nn.Module, keep: Callable[[str], bool] = lambda n: False) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(keep(n))


# --------------------------------------------------------------------------- training configs


@dataclass
class TrainConfig:
    """One configuration of the training-step comparison."""

    name: str
    label: str
    module: nn.Module
    params: list[nn.Parameter]
    trainable: int
    notes: str = ""

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out["logits"] if isinstance(out, dict) else out.logits

    def optimizer(self) -> torch.optim.Optimizer:
        # AdamW's defaults: on CPU tensors that is the per-parameter (for-loop) implementation.
        return torch.optim.AdamW(self.params, lr=1e-4)


def train_step(cfg: TrainConfig, opt: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """forward + backward + AdamW step (the loss is computed outside the model, the same way
    for every configuration)."""
    loss = F.cross_entropy(cfg.logits(batch), batch["labels"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _trainable(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def randomize_B(tm: nn.Module, seed: int) -> None:
    """B starts at 0 (the adapted model equals the base at step 0); give it values so that
    equivalence checks and the fold compare something non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.02)


def capaboost_config(base: nn.Module, d: int, example: dict[str, torch.Tensor],
                     seed: int = 0) -> tuple[TrainConfig, float]:
    spec = cbx.Spec(targets=TARGETS, rank=8, num_masks=d, density=0.5)
    t0 = time.perf_counter()
    tm = cbx.transform(base, spec, example_kwargs={"input_ids": example["input_ids"],
                                                   "attention_mask": example["attention_mask"]})
    seconds = time.perf_counter() - t0
    randomize_B(tm, seed + d)
    tm.train()
    params = [p for p in tm.parameters() if p.requires_grad]
    cfg = TrainConfig(f"capaboost_d{d}", f"CapaBoost d={d} (cbx.transform)", tm, params,
                      _trainable(params), f"Spec(targets={TARGETS}, rank=8, num_masks={d}, "
                      "density=0.5)")
    return cfg, seconds


def peft_config(base: nn.Module, r: int) -> TrainConfig:
    import peft

    model = peft.get_peft_model(copy.deepcopy(base),
                                peft.LoraConfig(r=r, target_modules=["query", "value"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return TrainConfig(f"peft_r{r}", f"PEFT LoRA r={r}", model, params, _trainable(params),
                       f"peft.LoraConfig(r={r}, target_modules=['query', 'value'])")


def loop_config(base: nn.Module, capa: TrainConfig) -> TrainConfig:
    """The loop formulation with the same A, B, masks and scaling as `capa`."""
    adapters = cbx.adapters(capa.module)
    model = copy.deepcopy(base)
    freeze(model)
    replace_linears(model, list(adapters), lambda n, lin: LoopMaskedLoRA(
        lin, adapters[n].A, adapters[n].B, adapters[n].mask_A, adapters[n].mask_B,
        adapters[n].scaling))
    model.train()
    d = next(iter(adapters.values())).num_masks
    params = [p for p in model.parameters() if p.requires_grad]
    return TrainConfig(f"loop_d{d}", f"loop formulation d={d} (eager)", model, params,
                       _trainable(params), "LoopMaskedLoRA by module replacement on an eager "
                       "copy; A, B, masks copied from the CapaBoost config")


def eager_adapter_config(base: nn.Module, capa: TrainConfig) -> TrainConfig:
    """The CapaBoost adapters of `capa`, installed eagerly (no capture)."""
    adapters = cbx.adapters(capa.module)
    model = copy.deepcopy(base)
    freeze(model)
    replace_linears(model, list(adapters),
                    lambda n, lin: EagerAdapterLinear(lin, copy.deepcopy(adapters[n])))
    model.train()
    d = next(iter(adapters.values())).num_masks
    params = [p for p in model.parameters() if p.requires_grad]
    return TrainConfig(f"eager_capaboost_d{d}", f"CapaBoost d={d} adapters, eager", model,
                       params, _trainable(params), "the same CapaBoostAdapter modules, by "
                       "module replacement on an eager copy (no capture)")


BASE_TRAINABLE = ("bert.embeddings.LayerNorm",)


def base_eager_config(base: nn.Module) -> TrainConfig:
    model = copy.deepcopy(base)
    freeze(model, lambda n: n.startswith(BASE_TRAINABLE))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return TrainConfig("base_eager", "base model, eager", model, params, _trainable(params),
                       "all frozen but bert.embeddings.LayerNorm (so backward runs through "
                       "every layer, as with adapters)")


def base_captured_config(base: nn.Module, example: dict[str, torch.Tensor]) -> TrainConfig:
    """The captured-but-not-rewritten model: cbx.transform, then every adapter node removed
    again (the fold's own `unrewrite` pass) and the graphs recompiled. It runs through exactly
    the runtime a CapaBoost training module uses (GraphProgram: input check, shape guards,
    generated code over the shared state), minus the adapters."""
    from capaboost_fx.passes.rewrite import unrewrite

    spec = cbx.Spec(targets=TARGETS, rank=8, num_masks=2, density=0.5,
                    trainable=list(BASE_TRAINABLE))
    tm = cbx.transform(base, spec, example_kwargs={"input_ids": example["input_ids"],
                                                   "attention_mask": example["attention_mask"]},
                       blocks=None)  # one flat graph per mode, so unrewrite sees every node
    removed = {m: len(unrewrite(g)) for m, g in tm.graphs.items()}
    tm.recompile()
    for a in cbx.adapters(tm).values():
        for p in a.parameters():
            p.requires_grad_(False)
    tm.train()
    params = [p for p in tm.parameters() if p.requires_grad]
    return TrainConfig("base_captured", "base model, captured (no rewrite)", tm, params,
                       _trainable(params), f"cbx.transform, adapter nodes removed again "
                       f"({removed}), bert.embeddings.LayerNorm trainable")


def build_train_configs(base: nn.Module, example: dict[str, torch.Tensor]) -> tuple[
        dict[str, TrainConfig], dict[str, float]]:
    """Every configuration of the step-time and memory benchmarks, over one set of weights."""
    capa2, t2 = capaboost_config(base, 2, example)
    capa4, t4 = capaboost_config(base, 4, example)
    cfgs = [
        peft_config(base, 8), peft_config(base, 16), peft_config(base, 32),
        capa2, capa4, loop_config(base, capa4), eager_adapter_config(base, capa2),
        base_eager_config(base), base_captured_config(base, example),
    ]
    return {c.name: c for c in cfgs}, {"capaboost_d2": t2, "capaboost_d4": t4}


@torch.no_grad()
def equivalence_checks(cfgs: dict[str, TrainConfig], batch: dict[str, torch.Tensor]) -> dict:
    """Eval-mode logits of configurations that must compute the same function."""
    pairs = [("loop_d4", "capaboost_d4"), ("eager_capaboost_d2", "capaboost_d2"),
             ("base_captured", "base_eager")]
    out = {}
    for a, b in pairs:
        if a in cfgs and b in cfgs:
            cfgs[a].module.eval()
            cfgs[b].module.eval()
            la, lb = cfgs[a].logits(batch), cfgs[b].logits(batch)
            cfgs[a].module.train()
            cfgs[b].module.train()
            out[f"{a} vs {b}"] = float((la - lb).abs().max())
    return out


# --------------------------------------------------------------------------- statistics


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: Sequence[float]) -> dict[str, Any]:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "q1": quantile(xs, 0.25),
            "q3": quantile(xs, 0.75), "min": min(xs), "max": max(xs), "n": len(xs),
            "samples": [round(x, 6) for x in xs]}


def ratio(samples: dict[str, list[float]], a: str, b: str, target: str | None = None) -> dict:
    """Per-round ratios samples[a][i] / samples[b][i] (measured seconds apart), summarised;
    `target` is '<= x' or '>= x'. `met` is judged on the median; `within_noise` says whether
    the quartile range reaches the target."""
    rs = [x / y for x, y in zip(samples[a], samples[b], strict=True)]
    out = {"a": a, "b": b, **summary(rs)}
    if target:
        op, value = target.split()
        value = float(value)
        ok = (lambda r: r <= value) if op == "<=" else (lambda r: r >= value)
        out.update(target=target, met=ok(out["median"]),
                   within_noise=ok(out["q1"]) or ok(out["q3"]))
    return out


def verdict(r: dict) -> str:
    if "target" not in r:
        return ""
    if r["met"]:
        return "met"
    return "missed (target inside IQR)" if r["within_noise"] else "missed"


def alternate(fns: dict[str, Callable[[], float]], rounds: int,
              on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Run every `fns[name]()` (which returns seconds) once per round, rotating the order each
    round (and reversing it every other cycle of rotations) so that every configuration takes
    every position and no configuration always follows the same neighbour; returns
    {name: [seconds per round]}."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in round_order(names, r):
            gc.collect()
            out[n].append(fns[n]())
        if on_round:
            on_round(r)
    return out


def timed(fn: Callable[[], Any], iters: int = 1) -> float:
    """Median seconds of `iters` calls."""
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# --------------------------------------------------------------------------- output


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.3f}"
        return f"{v:.4f}"
    return str(v)


def ratio_row(label: str, r: dict) -> list[Any]:
    return [label, f"{r['median']:.3f}", f"{r['q1']:.3f}–{r['q3']:.3f}",
            f"{r['min']:.3f}–{r['max']:.3f}", r.get("target", ""), verdict(r)]


RATIO_HEADERS = ["ratio", "median", "IQR", "min–max", "target", "verdict"]


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for mod in ("transformers", "peft", "onnx", "onnxruntime", "onnxscript"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            info[mod] = None
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Flags"):
                value = value.strip()
                if key.strip() == "Flags":
                    value = " ".join(f for f in value.split() if f.startswith(("avx", "amx")))
                    key = "Flags (avx/amx)"
                info[f"lscpu {key.strip()}"] = value
    except Exception:  # pragma: no cover
        pass
    info["loadavg_at_start"] = loadavg()
    info["conditions"] = conditions()  # CPU model, cores, threads, load average, versions
    return info


def loadavg() -> list[str] | None:
    """The 1, 5 and 15 minute load averages (Linux), None elsewhere."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:  # pragma: no cover
        return None


class Contention:
    """How much CPU other processes took while a benchmark ran: (busy CPU time of the whole
    machine from /proc/stat − this process's CPU time) / (wall time × cores). 0 on an idle
    machine; 0.5 means other processes held one of the two cores on average. On a shared
    machine every parallel op waits for its second thread to be scheduled (a 4 ms tick), so
    configurations made of many small ops are hurt more than those made of few large ones."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), time.process_time()
        self.conditions = conditions()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):  # pragma: no cover - not Linux
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        busy, own = self._busy(), time.process_time() - self.own0
        out: dict[str, Any] = {"wall_seconds": round(wall, 1), "own_cpu_seconds": round(own, 1)}
        if busy is not None and self.busy0 is not None and wall > 0:
            others = max(0.0, (busy - self.busy0) - own)
            out["others_cpu_share"] = round(others / (wall * (os.cpu_count() or 1)), 3)
        out["loadavg_at_end"] = loadavg()
        out["conditions"] = conditions(self.conditions)  # the load average at start and end
        out["conditions_text"] = describe_conditions(out["conditions"])  # print beside times
        return out


# --------------------------------------------------------------------------- shared context


class Context:
    """What several benchmarks share in one run: the base weights, the batch and the training
    configurations (built once: each costs a capture)."""

    def __init__(self, st: Settings) -> None:
        self.st = st
        self.batch = make_batch(st.size, st.batch, st.seq)
        self._base: nn.Module | None = None
        self._cfgs: dict[str, TrainConfig] | None = None
        self.setup: dict[str, Any] = {}

    @property
    def base(self) -> nn.Module:
        if self._base is None:
            self._base = make_model(self.st.size)
        return self._base

    def configs(self) -> dict[str, TrainConfig]:
        if self._cfgs is None:
            t0 = time.perf_counter()
            self._cfgs, transform_s = build_train_configs(self.base, self.batch)
            self.setup["transform_seconds"] = {k: round(v, 3) for k, v in transform_s.items()}
            self.setup["build_seconds"] = round(time.perf_counter() - t0, 3)
            self.setup["equivalence_max_abs_diff"] = equivalence_checks(self._cfgs, self.batch)
        return self._cfgs
