"""Benchmark 3: transform (capture + rewrite) time and fold time against parameter count.

For each model size: `cbx.transform` once (two torch.export captures, train and eval, then
match + rewrite), then `cbx.fold` alternated with `copy.deepcopy(model)` of the same model, a
natural yardstick (the fold must copy the whole model once, since it never shares state with
the training module). Also timed alone: the merge arithmetic (ΔW = s·B_cat·A_cat and
W0 + ΔW for every target) and its NaN/Inf check; and the fold with torch limited to one
thread, because on a shared 2-core machine every 2-thread op of the fold waits for its second
thread to be scheduled (see README).
"""

from __future__ import annotations

import copy
import gc
import time
from typing import Any

import torch
from common import (
    TARGETS,
    Settings,
    Size,
    alternate,
    make_batch,
    make_model,
    num_params,
    randomize_B,
    ratio,
    summary,
    table,
)

import capaboost_fx as cbx


def _profile_fold(tm: Any) -> dict[str, Any]:
    """Where one fold's time goes: self CPU time of the top ATen ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        cbx.fold(tm)
    ev = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev) / 1e3
    return {"self_ms_total": round(total, 1),
            "top_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                         "calls": e.count} for e in ev[:8]]}


def _one_size(st: Settings, size: Size, profile: bool, log=print) -> dict[str, Any]:
    from capaboost_fx.fold import merged_weights

    model = make_model(size)
    batch = make_batch(size, st.batch, st.seq)
    spec = cbx.Spec(targets=TARGETS, rank=8, num_masks=2, density=0.5)
    t0 = time.perf_counter()
    tm = cbx.transform(model, spec, example_kwargs={
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    transform_s = time.perf_counter() - t0
    randomize_B(tm, 1)
    deltas = list(cbx.delta_weights(tm).values())

    def timed(fn) -> float:  # seconds of one call; its result is dropped inside the timing
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def fold() -> float:
        return timed(lambda: cbx.fold(tm))

    def fold_1thread() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fold()
        finally:
            torch.set_num_threads(threads)

    def deepcopy() -> float:
        return timed(lambda: copy.deepcopy(model))

    def merge() -> float:
        return timed(lambda: merged_weights(tm))

    def finite_check() -> float:  # what merged_weights does per target to refuse NaN/Inf
        return timed(lambda: [bool(torch.isfinite(d).all()) for d in deltas])

    fold()  # first call: imports, code paths
    samples = alternate({"fold": fold, "fold_1thread": fold_1thread, "deepcopy": deepcopy,
                         "merge": merge, "finite_check": finite_check}, st.fold_repeats)
    folded = cbx.fold(tm)
    tm.eval()
    with torch.no_grad():
        small = {k: v[:2] for k, v in batch.items() if k != "labels"}
        diff = float((folded(**small).logits - tm(**small).logits).abs().max())
    params = num_params(model)
    row = {
        "layers": size.layers, "hidden": size.hidden, "params": params,
        "targets": len(cbx.adapters(tm)),
        "transform_seconds": transform_s,
        "export_seconds": tm.capture_info.export_seconds,
        "fold_seconds": summary(samples["fold"]),
        "fold_1thread_seconds": summary(samples["fold_1thread"]),
        "deepcopy_seconds": summary(samples["deepcopy"]),
        "merge_seconds": summary(samples["merge"]),
        "finite_check_seconds": summary(samples["finite_check"]),
        "fold_over_deepcopy": ratio(samples, "fold", "deepcopy"),
        "fold_seconds_per_100M_params": summary(samples["fold"])["median"] / params * 1e8,
        "folded_vs_train_eval_max_abs_diff": diff,
    }
    if profile:
        row["profile"] = _profile_fold(tm)
    log(f"  L={size.layers} hidden={size.hidden}: {params / 1e6:.1f}M params, transform "
        f"{transform_s:.1f}s, fold {row['fold_seconds']['median']:.3f}s")
    return row


def run(st: Settings, ctx: Any = None, log=print) -> dict[str, Any]:
    rows = []
    for size in st.fold_sizes:
        rows.append(_one_size(st, size, size is st.fold_sizes[-1], log))
        gc.collect()
    big = [r for r in rows if r["hidden"] == 768 and r["layers"] == 12]
    out: dict[str, Any] = {"sizes": rows, "repeats": st.fold_repeats}
    if big:
        out["bert_base_110M"] = {
            "params": big[0]["params"], "fold_seconds": big[0]["fold_seconds"]["median"],
            "threads": torch.get_num_threads(),
            "fold_1thread_seconds": big[0]["fold_1thread_seconds"]["median"],
            "target": "< 1 s", "met": big[0]["fold_seconds"]["median"] < 1.0,
            "transform_seconds": big[0]["transform_seconds"],
        }
    else:
        out["bert_base_110M"] = {"skipped": "the 12-layer BERT-base size runs in full mode only"}
    return out


def report(res: dict[str, Any]) -> str:
    rows = [[r["layers"], r["hidden"], f"{r['params'] / 1e6:.1f}M", r["targets"],
             r["transform_seconds"], r["fold_seconds"]["median"],
             f"{r['fold_seconds']['min']:.3f}–{r['fold_seconds']['max']:.3f}",
             r["fold_1thread_seconds"]["median"],
             r["merge_seconds"]["median"], r["finite_check_seconds"]["median"],
             r["deepcopy_seconds"]["median"],
             r["fold_over_deepcopy"]["median"]] for r in res["sizes"]]
    out = ["### Transform and fold time vs parameter count (s)",
           table(["L", "hidden", "params", "targets", "transform", "fold (median)",
                  "fold min–max", "fold, 1 thread", "merge only", "of which NaN check", "deepcopy(model)",
                  "fold / deepcopy"], rows)]
    for r in res["sizes"]:
        if "profile" in r:
            p = r["profile"]
            out.append(f"profile of one fold at L={r['layers']} (self ms, total "
                       f"{p['self_ms_total']}): " + ", ".join(
                           f"{o['op']} {o['self_ms']} ({o['calls']} calls)"
                           for o in p["top_ops"][:6]))
    b = res["bert_base_110M"]
    if "fold_seconds" in b:
        out.append(f"BERT-base ({b['params'] / 1e6:.1f}M params): fold {b['fold_seconds']:.3f} s "
                   f"with {b['threads']} threads, target {b['target']}: "
                   f"{'met' if b['met'] else 'missed'}; with 1 thread "
                   f"{b['fold_1thread_seconds']:.3f} s")
    else:
        out.append(b["skipped"])
    return "\n".join(out)
