"""The demo's outputs: ``report.md`` (from the report dict that ``report.json`` holds), the loss
and ΔW-spectrum plots, all written atomically (`capaboost_fx.adapter_file.atomic_write`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capaboost_fx.adapter_file import atomic_write

from .config import ARM_TITLES, CITATIONS

#: Top-level keys of ``report.json``.
REPORT_KEYS = (
    "version", "created", "status", "config", "environment", "data", "model", "runs",
    "comparison", "fold", "onnx", "timings", "files",
)
#: Predictions whose top-2 logit margin is at most this may flip between runtimes.
NEAR_TIE = 1e-4
#: Largest |logit| change the fold may cause (float32 rounding of W0 + ΔW).
FOLD_ATOL = 1e-3
COLORS = {"lora": "tab:blue", "capaboost": "tab:red"}


def write_text(path: str | os.PathLike, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))


def write_report(out: Path, report: Mapping[str, Any]) -> None:
    """``report.json`` and ``report.md`` in `out`."""
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "report.md", render_markdown(report))


# --------------------------------------------------------------------------- plots


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    pyplot().close(fig)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(curves: Mapping[str, Sequence[float]], path: str | os.PathLike) -> None:
    """Training-loss curves of each arm (raw, faint, and a moving average), as PNG."""
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=110)
    for i, (arm, losses) in enumerate(curves.items()):
        color = COLORS.get(arm, f"C{i}")
        window = max(1, len(losses) // 20)
        steps = range(1, len(losses) + 1)
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(losses, window), color=color, linewidth=1.8,
                label=f"{ARM_TITLES.get(arm, arm)} (moving average, {window} steps)")
    ax.set(xlabel="step", ylabel="cross-entropy", title="SST-2 training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_spectrum(spectra: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                  rtol: float | None = None, max_values: int = 40) -> None:
    """Singular values of ΔW normalised by the largest, per layer (`spectra`: layer ->
    {arm: values}), log scale, as PNG; `rtol` draws the rank threshold."""
    names = list(spectra)
    fig, axes = pyplot().subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.8),
                                  dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for i, (arm, values) in enumerate(spectra[name].items()):
            vals = [float(v) for v in values][:max_values]
            top = vals[0] if vals and vals[0] > 0 else 1.0
            ys = [max(v / top, 1e-17) for v in vals]
            ax.semilogy(range(1, len(ys) + 1), ys, marker="o" if arm == "lora" else "s",
                        markersize=3, linewidth=1, color=COLORS.get(arm, f"C{i}"),
                        label=ARM_TITLES.get(arm, arm))
        if rtol:
            ax.axhline(rtol, color="gray", linestyle="--", linewidth=1, label="rank threshold")
        ax.set(title=short_name(name), xlabel="index i")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("σ_i / σ_1 of ΔW")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Singular values of ΔW: CapaBoost (d masks) lifts the rank above r")
    fig.tight_layout()
    save_figure(fig, path)


def short_name(name: str) -> str:
    """'bert.encoder.layer.3.attention.self.value' -> 'layer 3 value'."""
    parts = name.split(".")
    if "layer" in parts and parts.index("layer") + 1 < len(parts):
        return f"layer {parts[parts.index('layer') + 1]} {parts[-1]}"
    return name


# --------------------------------------------------------------------------- markdown


def _int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "n/a"


def _pct(x: Any, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%" if isinstance(x, (int, float)) else "n/a"


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, (int, float)) else "n/a"


def verdict(report: Mapping[str, Any]) -> str:
    """One sentence comparing the two arms' dev accuracy, with its noise level."""
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
    return (f"On this run CapaBoost-LoRA scored {_pct(cb)} and LoRA {_pct(lo)} on {n} dev "
            f"sentences ({100 * diff:+.1f} points; one standard error is about "
            f"{100 * se:.1f} points): {call}. One seed and {report['config']['steps']} steps on "
            "a CPU: a demonstration of the pipeline, not a replication of the paper's results; "
            "README \"Quality\" has the multi-seed study.")


def _spec_text(run: Mapping[str, Any]) -> str:
    s = run["spec"]
    text = f"r={s['rank']}, d={s['num_masks']}, density={s['density']:g}"
    if s.get("scaling", "paper") != "paper":
        text += f", {s['scaling']} scaling"
    if s.get("init", "standard") != "standard":
        text += f", {s['init']} init"
    return text + f", lr {run['lr']:g}"


def _results(report: Mapping[str, Any]) -> list[str]:
    lo, cb = report["runs"]["lora"], report["runs"]["capaboost"]
    rows = [
        ("spec", _spec_text(lo), _spec_text(cb)),
        ("dev accuracy", f"{_pct(lo['accuracy'])} ({lo['correct']}/{lo['eval_examples']})",
         f"{_pct(cb['accuracy'])} ({cb['correct']}/{cb['eval_examples']})"),
        ("final training loss (mean of last 10% steps)", f"{lo['final_loss']:.4f}",
         f"{cb['final_loss']:.4f}"),
        ("trainable adapter parameters (A + B)", _int(lo["adapter_trainable_params"]),
         _int(cb["adapter_trainable_params"])),
        ("live adapter parameters (kept by ≥ 1 mask)",
         f"{_int(lo['adapter_live_params'])} ({_pct(lo['live_fraction'])})",
         f"{_int(cb['adapter_live_params'])} ({_pct(cb['live_fraction'])})"),
        ("trainable head parameters (classifier)", _int(lo["head_trainable_params"]),
         _int(cb["head_trainable_params"])),
        (f"numerical rank of ΔW (min / mean / max over {len(lo['layers'])} layers)",
         f"{lo['min_rank']} / {lo['mean_rank']:.1f} / {lo['max_rank']}",
         f"{cb['min_rank']} / {cb['mean_rank']:.1f} / {cb['max_rank']}"),
        ("training time", f"{lo['train_seconds']:.1f} s", f"{cb['train_seconds']:.1f} s"),
    ]
    lines = ["| | LoRA | CapaBoost-LoRA |", "| --- | ---: | ---: |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [
        "", verdict(report), "",
        "Training time is wall clock, one arm after the other, so load from other processes "
        "lands on whichever arm runs at the time; per step both arms run the same ops, "
        "CapaBoost with a rank d·r instead of r adapter product.", "",
        f"Dev predictions differ between the two arms on {report['comparison']['disagreements']} "
        f"of {lo['eval_examples']} sentences.", "",
        "## Numerical rank of ΔW per layer", "",
        f"Rank by `capaboost_fx.rank_report` ({lo['rank_rule'].split(': ', 1)[-1]}); the bound "
        "is min(d · r, out, in).", "",
        "| layer | LoRA rank | CapaBoost rank | bound (LoRA / CapaBoost) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in lo["layers"].items():
        crow = cb["layers"].get(name, {})
        lines.append(f"| `{name}` | {row['rank']} | {crow.get('rank', 'n/a')} | "
                     f"{row['max_rank']} / {crow.get('max_rank', 'n/a')} |")
    return lines


def _fold(fold: Mapping[str, Any]) -> list[str]:
    if not fold:
        return []
    return [
        f"`cbx.fold` merged {fold['targets']} ΔW into the base weights in {fold['seconds']:.2f} s. "
        f"Folded model vs training module (eval mode) on {fold['compared_examples']} dev "
        f"sentences: max |Δlogit| = {fold['max_abs_logit_diff']:.2e} (tolerance {FOLD_ATOL:g}), "
        f"identical predictions: {'yes' if fold['predictions_equal'] else 'NO'}. Folded model "
        f"accuracy in PyTorch: {_pct(fold['accuracy'])}.",
    ]


def _latency_call(onnx: Mapping[str, Any]) -> str:
    c = onnx.get("latency_comparison")
    return f": folded vs base {c['text']}" if c else ""


def _onnx(onnx: Mapping[str, Any], threads: int) -> list[str]:
    if onnx.get("skipped"):
        return [f"Skipped: {onnx.get('reason', 'not requested')}."]
    if onnx.get("error"):
        return [f"Failed: `{onnx['error']}`."]
    if not onnx:
        return []
    base, folded, lat = onnx["base"], onnx["folded"], onnx["latency"]
    b, s = onnx["serve_shape"]
    lines = [
        "| | base model | folded CapaBoost model |",
        "| --- | ---: | ---: |",
        f"| ONNX nodes | {base['nodes']} | {folded['nodes']} |",
        f"| initializers | {base['initializers']} | {folded['initializers']} |",
        f"| file size | {_mb(base['file_bytes'])} | {_mb(folded['file_bytes'])} |",
        f"| onnxruntime latency, median (p90), batch {b} × {s} tokens | "
        f"{lat['base']['median_ms']:.2f} ms ({lat['base']['p90_ms']:.2f}) | "
        f"{lat['folded']['median_ms']:.2f} ms ({lat['folded']['p90_ms']:.2f}) |",
        f"| export time | {base['export_seconds']:.1f} s | {folded['export_seconds']:.1f} s |",
        "",
        f"Same op histogram: {'yes' if onnx['same_ops'] else 'NO'}; `compare_onnx`: "
        f"{onnx.get('graph_summary') or ('same graph: ' + ('yes' if onnx['same_graph'] else 'NO'))}"
        f". Folded/base latency ratio: {onnx['latency_ratio']:.3f} (medians of "
        f"{lat['folded']['runs']} interleaved runs, {threads} threads){_latency_call(onnx)}.",
        "",
    ]
    srv = onnx["serving"]
    ties = (f" (+{srv['near_ties']} near-ties, top-2 margin ≤ {NEAR_TIE:g})"
            if srv.get("near_ties") else "")
    batching = ("Batches sorted by length and padded to their longest sentence (the ONNX graph "
                "has dynamic batch and sequence dims)." if onnx.get("dynamic") else
                f"Batches of the export shape {b} × {s} (static ONNX shapes).")
    lines.append(
        f"Serving check: onnxruntime predictions equal PyTorch's (folded model) on "
        f"{srv['equal']}/{srv['n']} dev sentences{ties} ({'PASS' if srv['match'] else 'FAIL'}); "
        f"max |Δlogit| = {srv['max_abs_logit_diff']:.2e}; onnxruntime accuracy "
        f"{_pct(srv['accuracy'])}. {batching}")
    if onnx.get("int8"):
        q = onnx["int8"]
        lines += ["", "| folded model, onnxruntime CPU | fp32 | dynamic int8 |",
                  "| --- | ---: | ---: |",
                  f"| dev accuracy | {_pct(q['accuracy_fp32'])} | {_pct(q['accuracy'])} |",
                  f"| latency, median, batch {b} × {s} | {q['latency_ms']['fp32']:.2f} ms | "
                  f"{q['latency_ms']['int8']:.2f} ms |",
                  f"| file size | {_mb(q['file_bytes']['fp32'])} | "
                  f"{_mb(q['file_bytes']['int8'])} |", "",
                  f"int8 is {q['speedup']:.2f}× as fast as fp32 and agrees with it on "
                  f"{_pct(q['agreement_with_fp32'])} of dev predictions (accuracy change "
                  f"{100 * (q['accuracy'] - q['accuracy_fp32']):+.2f} points)."]
    if onnx.get("compare_markdown"):
        lines += ["", "### `compare_onnx(base, folded)`", "", onnx["compare_markdown"]]
    return lines


def _conditions(report: Mapping[str, Any]) -> str:
    from capaboost_fx.onnx.timing import describe_conditions  # stdlib only: no ONNX needed

    c = report["environment"].get("conditions")
    return describe_conditions(c) if c else "an unrecorded machine"


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md`` for a report dict (as `run` returns and ``report.json`` holds)."""
    cfg, data, model = report["config"], report["data"], report["model"]
    targets = report["runs"]["lora"]["spec"]["targets"]
    lines = [
        "# CapaBoost-LoRA vs LoRA on SST-2 (MiniLM-L6)", "",
        f"Created {report['created']} · status: **{report['status']}** · "
        f"{report['environment']['threads']} CPU threads · total "
        f"{report['timings'].get('total_seconds', 0):.0f} s, measured on {_conditions(report)}."
        " Times here are wall clock on that machine at that load; the ratios are what carries "
        "over to another machine.", "",
        f"Model: `{model['name']}` ({_int(model['parameters'])} parameters, hidden "
        f"{model['hidden_size']}, {model['layers']} layers) with a fresh 2-way classifier. Data: "
        f"{data['train_examples']:,} SST-2 training rows, {data['eval_examples']:,} held-out dev "
        f"sentences (majority-class accuracy {_pct(data['eval_majority_accuracy'])}). Both arms: "
        f"adapters on `{'`, `'.join(targets)}`, classifier trainable, {cfg['steps']} steps × "
        f"batch {cfg['batch_size']}, AdamW (each arm's learning rate below; warm-up "
        f"{cfg['warmup']:g}, linear decay), max length {cfg['max_length']}, seed {cfg['seed']}; "
        "same data order and dropout seed.", "",
        "## Results", "",
        *_results(report),
        "", "## Fold", "", *_fold(report.get("fold") or {}),
        "", "## ONNX export and onnxruntime serving", "",
        *_onnx(report.get("onnx") or {}, report["environment"]["threads"]),
        "", "## Plots", "",
    ]
    files = report.get("files", {})
    if "loss" in files:
        lines += ["Training loss of both arms (same batches, same order):", "",
                  f"![training loss]({files['loss']})", ""]
    if "spectrum" in files:
        lines += ["Singular values of ΔW (normalised by the largest; dashed: rank threshold):",
                  "", f"![spectrum of ΔW]({files['spectrum']})", ""]
    lines += ["## Data and citations", "",
              "SST-2 sample shipped in `capaboost_fx/data` (see its README). Cite: "
              + "; ".join(CITATIONS) + ".", ""]
    return "\n".join(lines)
