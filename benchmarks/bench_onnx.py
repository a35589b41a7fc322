"""Benchmark 4: inference in onnxruntime, folded CapaBoost model vs the base model.

The base model (eager, eval mode) and the folded CapaBoost d=2 model (`cbx.fold`, adapters
trained or randomised so ΔW ≠ 0) are exported to ONNX with dynamic batch and sequence, then
run in onnxruntime (CPUExecutionProvider, as many intra-op threads as torch, sequential)
alternately, round
after round, at batch 1 and batch 8. Reported: latency ratio folded/base, node counts and op
histograms, file sizes, and that each file reproduces its PyTorch model.

The exporter is `capaboost_fx.onnx.export_onnx` (verified, fused for onnxruntime).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from common import (
    RATIO_HEADERS,
    TARGETS,
    Context,
    Settings,
    make_batch,
    quiet,
    randomize_B,
    ratio,
    ratio_row,
    summary,
    table,
)

import capaboost_fx as cbx
from capaboost_fx.onnx import Session, export_onnx, measure_latency, onnx_stats, open_session

BATCHES = (1, 8)


def _session(path: str) -> Session:
    # Two sessions take turns on 2 cores: a session's idle pool spinning after its run would
    # slow down whichever session runs next, so spinning is off for both.
    return open_session(path, providers="cpu", intra_op_num_threads=torch.get_num_threads(),
                        inter_op_num_threads=1, sequential=True,
                        session_config={"session.intra_op.allow_spinning": "0"})


def _feeds(sess: Session, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: batch[n].numpy() for n in sess.input_names}


def _graph_stats(path: str) -> dict[str, Any]:
    """The benchmark's view of capaboost_fx.onnx.onnx_stats (the one implementation)."""
    s = onnx_stats(path)
    return {"nodes": s.node_count, "initializers": s.initializer_count,
            "initializer_bytes": s.initializer_bytes, "file_bytes": s.file_bytes,
            "op_histogram": s.op_histogram}


def export_both(base: torch.nn.Module, folded: torch.nn.Module, example: dict[str, torch.Tensor],
                check: dict[int, dict[str, torch.Tensor]], workdir: str) -> dict[str, Any]:
    """Export both models with `capaboost_fx.onnx.export_onnx` (verified, fused) and check each
    file takes batch 1 and batch 8; an export that fails raises."""
    paths = {"base": os.path.join(workdir, "base.onnx"),
             "folded": os.path.join(workdir, "folded.onnx")}
    seconds: dict[str, float] = {}
    for name, mod in {"base": base, "folded": folded}.items():
        t0 = time.perf_counter()
        with quiet():
            export_onnx(mod, paths[name], example_kwargs=example, verify=True)
        seconds[name] = time.perf_counter() - t0
        sess = _session(paths[name])
        for b in check.values():
            sess.run(_feeds(sess, b))
    return {"exporter": "capaboost_fx.onnx.export_onnx(verify=True) (optimize='ort': fused)",
            "paths": paths, "export_seconds": seconds}


def run(st: Settings, ctx: Context, log=print) -> dict[str, Any]:
    size = st.size
    base = ctx.base
    if "capaboost_d2" in (ctx._cfgs or {}):
        tm = ctx.configs()["capaboost_d2"].module  # trained in benchmarks 1-2: ΔW ≠ 0
        source = "the CapaBoost d=2 training module of the step benchmark (after its steps)"
    else:
        tm = cbx.transform(base, cbx.Spec(targets=TARGETS, rank=8, num_masks=2, density=0.5),
                           example_kwargs={k: ctx.batch[k]
                                           for k in ("input_ids", "attention_mask")})
        randomize_B(tm, 3)
        source = "a fresh CapaBoost d=2 transform with random B"
    folded = cbx.fold(tm)
    base_eval = base.eval()
    example = {k: v for k, v in make_batch(size, 4, st.seq, seed=1).items()
               if k in ("input_ids", "attention_mask")}
    inputs = {b: {k: v for k, v in make_batch(size, b, st.seq, seed=2 + b).items()
                  if k in ("input_ids", "attention_mask")} for b in BATCHES}
    with tempfile.TemporaryDirectory() as workdir:
        exp = export_both(base_eval, folded, example, inputs, workdir)
        log(f"  exported with {exp['exporter']}")
        stats = {n: _graph_stats(p) for n, p in exp["paths"].items()}
        try:  # the library's own structural comparison, as a cross-check
            from capaboost_fx.onnx import compare_onnx

            same_graph = bool(compare_onnx(exp["paths"]["base"], exp["paths"]["folded"],
                                           latency=False).same_graph)
        except Exception as e:
            same_graph = f"compare_onnx unavailable: {type(e).__name__}: {str(e)[:200]}"
        sessions = {n: _session(p) for n, p in exp["paths"].items()}
        correctness = {}
        with torch.no_grad():
            for b, inp in inputs.items():
                ref = {"base": base_eval(**inp).logits, "folded": folded(**inp).logits}
                got = {n: torch.from_numpy(s.run(_feeds(s, inp))[s.output_names[0]])
                       for n, s in sessions.items()}
                correctness[f"batch{b}"] = {
                    "base_onnx_vs_torch": float((got["base"] - ref["base"]).abs().max()),
                    "folded_onnx_vs_torch": float((got["folded"] - ref["folded"]).abs().max()),
                    "folded_vs_base_logits": float((ref["folded"] - ref["base"]).abs().max()),
                }
        latency: dict[str, Any] = {}
        for b, inp in inputs.items():
            feeds = {n: _feeds(s, inp) for n, s in sessions.items()}
            iters = st.onnx_iters.get(b, 3)
            # One timer for the whole project: interleaved rounds, order rotated each round,
            # 3 warm-up runs (a new shape allocates and plans), median of `iters` calls a round.
            timed = measure_latency(sessions, feeds, runs=st.onnx_rounds, warmup=3,
                                    calls_per_run=iters)
            samples = {n: t.samples_ms for n, t in timed.items()}
            latency[f"batch{b}"] = {
                "seq": st.seq, "iters_per_measurement": iters,
                "ms": {n: summary(v) for n, v in samples.items()},
                "ratio": ratio(samples, "folded", "base", "<= 1.02"),
            }
            log(f"  batch {b}: folded/base {latency[f'batch{b}']['ratio']['median']:.3f}")
        sessions.clear()
    same_ops = stats["base"]["op_histogram"] == stats["folded"]["op_histogram"]
    return {
        "model": size.describe(), "folded_from": source,
        "exporter": exp["exporter"],
        "export_seconds": exp["export_seconds"],
        "graph": stats,
        "identical_node_counts": stats["base"]["nodes"] == stats["folded"]["nodes"],
        "identical_op_histograms": same_ops,
        "compare_onnx_same_graph": same_graph,
        "correctness_max_abs_diff": correctness,
        "latency": latency,
        "ort_settings": f"CPUExecutionProvider, intra_op_num_threads={torch.get_num_threads()}, "
                        "inter_op_num_threads=1, "
                        "ORT_SEQUENTIAL, default graph optimizations (ORT_ENABLE_ALL)",
    }


def report(res: dict[str, Any]) -> str:
    g = res["graph"]
    rows = [[n, g[n]["nodes"], g[n]["initializers"],
             f"{g[n]['initializer_bytes'] / 2**20:.2f} MiB",
             f"{g[n]['file_bytes'] / 2**20:.2f} MiB",
             f"{res['export_seconds'].get(n, 0):.1f}"] for n in ("base", "folded")]
    lat = res["latency"]
    lrows = [[k, f"{v['ms']['base']['median']:.2f}", f"{v['ms']['folded']['median']:.2f}",
              *ratio_row("", v["ratio"])[1:]] for k, v in lat.items()]
    return "\n".join([
        f"### ONNX inference (exporter: {res['exporter']})",
        table(["model", "nodes", "initializers", "initializer data", "file", "export s"], rows),
        f"identical node counts: {res['identical_node_counts']}, identical op histograms: "
        f"{res['identical_op_histograms']}, compare_onnx(...).same_graph: "
        f"{res['compare_onnx_same_graph']}",
        table(["input", "base ms", "folded ms", *RATIO_HEADERS[1:]], lrows),
        f"correctness (max abs diff): {res['correctness_max_abs_diff']}",
    ])
