"""Multi-LoRA section of the deploy benchmark: one base serving many fine-tunes vs folded models.

Model: BERT-large shapes (hidden 1024, 16 heads, FFN 4096, vocab 30522), 2 layers, random
weights; CapaBoost on query/value (r=8, d=2: rank-16 LoRA paths), B set to nonzero values.
Three questions, every figure with the machine and its load beside it:

1. latency: the multi-LoRA base with an active adapter (another fine-tune's file) vs the folded
   model of that fine-tune, batch 1 and 8 × 128 tokens, onnxruntime CPU, interleaved rounds in
   one process (`measure_latency`), ratio of medians and the per-round ratios' IQR;
2. memory: process RSS growth for N = 1, 8, 64 adapter files loaded on the one base vs N folded
   sessions (measured for N = 1 and 8; N = 64 folded copies is 64 × the measured per-copy
   cost, labelled as extrapolated: it would not fit next to other users of the machine);
3. switching: one request's latency when every request changes adapter vs when all use the
   same one (batch 1), and the cost of `RunOptions` + ``add_active_adapter`` alone.

    .venv/bin/python benchmarks/bench_deploy.py --multi-lora-only        # this section only
    .venv/bin/python benchmarks/bench_deploy.py --multi-lora             # after the others
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

import capaboost_fx as cbx
from capaboost_fx.onnx import measure_latency

ML_SPEC = dict(targets=["*.query", "*.value"], rank=8, num_masks=2, density=0.5, alpha=16.0)


def _model() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                     num_hidden_layers=2)
    return BertModel(cfg).eval()


def _fine_tune(base: torch.nn.Module, example: dict, seed: int) -> cbx.CapaBoostModel:
    tm = cbx.transform(base, cbx.Spec(**ML_SPEC, seed=seed), example_kwargs=example)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=gen) * 0.02)
    return tm.eval()


_CHILD = r"""
import json, sys
import numpy as np, onnxruntime as ort, psutil
kind, path, threads, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
rss = lambda: psutil.Process().memory_info().rss / 2**20
def session(p):
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.log_severity_level = 3
    return ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
feeds = {"input_ids": np.full((1, 128), 1000, np.int64),
         "attention_mask": np.ones((1, 128), np.int64)}
out = {"start": rss()}
if kind == "adapters":
    s = session(path); s.run(None, feeds); out["base"] = rss()
    keep = []
    for f in files:
        ad = ort.LoraAdapter(); ad.Load(f); keep.append(ad)
        ro = ort.RunOptions(); ro.add_active_adapter(ad); s.run(None, feeds, ro)
else:
    keep = []
    for _ in files:
        s = session(path); s.run(None, feeds); keep.append(s)
out["after"] = rss()
print(json.dumps({k: round(v, 1) for k, v in out.items()}))
"""


def _child_rss(kind: str, path: str, files: list[str], threads: int) -> dict[str, float]:
    """RSS (MB) of a fresh process: at start, after the base session ran once ("adapters"),
    and after loading and running each of `files` (adapters), or one session per entry."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CHILD, kind, path, str(threads), *files],
                          capture_output=True, text=True, check=True, timeout=1200)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30522, (batch, seq), generator=g)
    return {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), np.int64)}


def run_multi_lora(threads: int, rounds: int, warmup: int, log, conditions) -> dict[str, Any]:
    """Measure and return the section's figures (see the module docstring)."""
    import onnxruntime as ort

    base = _model()
    example = {k: torch.from_numpy(v) for k, v in _feeds(2, 16, 0).items()}
    out: dict[str, Any] = {"model": "BERT-large shapes (hidden 1024, 16 heads, FFN 4096), "
                           "2 layers, random weights", "spec": ML_SPEC, "threads": threads,
                           "rounds": rounds}
    with tempfile.TemporaryDirectory() as d:
        log("  multi-LoRA: fine-tunes, exports")
        tm_a, tm_b = _fine_tune(base, example, 1), _fine_tune(base, example, 2)
        rep = cbx.export_onnx(tm_a, os.path.join(d, "base.onnx"), example_kwargs=example,
                              multi_lora=True)
        folded_b = os.path.join(d, "folded_b.onnx")
        frep = cbx.export_onnx(cbx.fold(tm_b), folded_b, example_kwargs=example)
        ad_a = cbx.save_onnx_adapter(tm_a, os.path.join(d, "a.onnx_adapter"),
                                     base=rep.path)
        ad_b = cbx.save_onnx_adapter(tm_b, os.path.join(d, "b.onnx_adapter"),
                                     base=rep.path)
        out["fusions"] = {"multi_lora": rep.export.fusions, "folded": frep.fusions}
        out["nodes"] = {"multi_lora": rep.export.node_count, "folded": frep.node_count}
        out["file_MB"] = {"multi_lora": round(os.path.getsize(rep.path) / 1e6, 1),
                          "folded": round(os.path.getsize(folded_b) / 1e6, 1),
                          "adapter": round(os.path.getsize(ad_b) / 1e6, 3)}
        ml = _session(rep.path, threads)
        fo = _session(folded_b, threads)
        la = cbx.load_onnx_adapter(ad_a, base=rep.path)
        lb = cbx.load_onnx_adapter(ad_b, base=rep.path)
        ro_b = ort.RunOptions()
        ro_b.add_active_adapter(lb)
        ro_a = ort.RunOptions()
        ro_a.add_active_adapter(la)

        # 1. latency, paired in interleaved rounds
        out["latency"] = {}
        for batch in (1, 8):
            feeds = _feeds(batch, 128, batch)
            got = ml.run(None, feeds, ro_b)[0]
            want = fo.run(None, feeds)[0]
            diff = float(np.abs(got - want).max() / np.abs(want).max())
            log(f"  multi-LoRA: timing batch {batch} × 128, {rounds} rounds")
            before = conditions()
            stats = measure_latency({
                "folded": lambda f=feeds: fo.run(None, f),
                "multi_lora_active": lambda f=feeds: ml.run(None, f, ro_b),
                "multi_lora_defaults": lambda f=feeds: ml.run(None, f),
            }, runs=rounds, warmup=warmup)
            per_round = [a / b for a, b in zip(stats["multi_lora_active"].samples_ms,
                                               stats["folded"].samples_ms, strict=True)]
            q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            out["latency"][f"batch{batch}"] = {
                "folded_ms": round(stats["folded"].median_ms, 2),
                "active_adapter_ms": round(stats["multi_lora_active"].median_ms, 2),
                "no_adapter_ms": round(stats["multi_lora_defaults"].median_ms, 2),
                "ratio_active_vs_folded": round(stats["multi_lora_active"].median_ms
                                                / stats["folded"].median_ms, 3),
                "per_round_ratio_iqr": [round(q[0], 3), round(q[-1], 3)],
                "max_rel_diff_active_vs_folded": diff,
                "conditions_before": before, "conditions_after": conditions(before),
            }

        # 3. switching
        feeds = _feeds(1, 128, 7)
        log("  multi-LoRA: switching")
        alternating = [ro_a, ro_b]
        state = {"i": 0}

        def switch() -> Any:
            state["i"] += 1
            return ml.run(None, feeds, alternating[state["i"] % 2])

        stats = measure_latency({"same_adapter": lambda: ml.run(None, feeds, ro_b),
                                 "switching_every_request": switch},
                                runs=rounds, warmup=warmup)
        t0 = time.perf_counter()
        for _ in range(1000):
            r = ort.RunOptions()
            r.add_active_adapter(lb)
        make_ro_us = (time.perf_counter() - t0) * 1e3
        slots = cbx.lora_slots(rep.path)
        t0 = time.perf_counter()
        for _ in range(20):
            cbx.load_onnx_adapter(ad_b, slots=slots)
        load_ms = (time.perf_counter() - t0) / 20 * 1e3
        out["switch"] = {
            "same_adapter_ms": round(stats["same_adapter"].median_ms, 3),
            "switching_every_request_ms": round(stats["switching_every_request"].median_ms, 3),
            "run_options_with_adapter_us": round(make_ro_us, 2),
            "load_checked_adapter_file_ms": round(load_ms, 2),
            "conditions": conditions(),
        }

        # 2. memory, each configuration in a fresh process (RSS of this one is polluted)
        log("  multi-LoRA: memory (fresh processes)")
        files = []
        for i in range(64):
            tm_i = tm_a if i % 2 else tm_b
            with torch.no_grad():  # a distinct fine-tune per file: B scaled per index
                for a in cbx.adapters(tm_i).values():
                    a.B.mul_(1.0 + 1e-3)
            files.append(os.fspath(cbx.save_onnx_adapter(
                tm_i, os.path.join(d, f"t{i}.onnx_adapter"))))
        mem: dict[str, Any] = {}
        per_copy = None
        for n in (1, 8, 64):
            ml_rss = _child_rss("adapters", rep.path, files[:n], threads)
            mem[f"N={n}"] = {"multi_lora_MB": ml_rss["after"] - ml_rss["start"],
                             "adapters_only_MB": ml_rss["after"] - ml_rss["base"]}
            if n <= 8:
                fo_rss = _child_rss("folded", folded_b, [""] * n, threads)
                mem[f"N={n}"]["folded_copies_MB"] = fo_rss["after"] - fo_rss["start"]
                per_copy = mem[f"N={n}"]["folded_copies_MB"] / n
            else:
                mem[f"N={n}"]["folded_copies_MB"] = round(per_copy * n, 1)
                mem[f"N={n}"]["folded_copies_note"] = ("extrapolated: 64 × the measured "
                                                      "per-copy cost at N=8")
        out["memory"] = mem
        out["conditions_at_end"] = conditions()
    return out


def report_multi_lora(res: dict[str, Any]) -> str:
    """The section as Markdown."""
    lines = [f"### Multi-LoRA: {res['model']}, CapaBoost r=8 d=2 on query/value, onnxruntime "
             f"CPU, {res['threads']} threads, {res['rounds']} interleaved rounds"]
    rows = []
    for key, v in res["latency"].items():
        c = v["conditions_after"]
        rows.append([key.replace("batch", "batch ") + " × 128", f"{v['folded_ms']:.2f}",
                     f"{v['active_adapter_ms']:.2f}", f"{v['no_adapter_ms']:.2f}",
                     f"{v['ratio_active_vs_folded']:.3f}",
                     f"{v['per_round_ratio_iqr'][0]:.2f}–{v['per_round_ratio_iqr'][1]:.2f}",
                     f"{v['max_rel_diff_active_vs_folded']:.1e}", _load(c)])
    lines.append(_table(["shape", "folded ms", "multi-LoRA, adapter active ms",
                         "multi-LoRA, no adapter ms", "active ÷ folded", "per-round IQR",
                         "max rel diff", "load (1/5/15 min)"], rows))
    lines.append("")
    rows = []
    for n in ("N=1", "N=8", "N=64"):
        m = res["memory"][n]
        rows.append([n, f"{m['multi_lora_MB']:.0f}", f"{m['adapters_only_MB']:.1f}",
                     f"{m['folded_copies_MB']:.0f}" + (" (extrapolated)" if n == "N=64" else "")])
    lines.append(_table(["fine-tunes", "one base + N adapters, RSS MB", "of which adapters MB",
                         "N folded sessions, RSS MB"], rows))
    s = res["switch"]
    lines.append("")
    lines.append(f"Switching (batch 1 × 128): {s['same_adapter_ms']:.2f} ms per request with one "
                 f"adapter, {s['switching_every_request_ms']:.2f} ms when every request changes "
                 f"adapter; a RunOptions with an active adapter costs "
                 f"{s['run_options_with_adapter_us']:.1f} µs to make; loading (and checking) an "
                 f"adapter file {s['load_checked_adapter_file_ms']:.1f} ms "
                 f"({res['file_MB']['adapter']} MB). Load {_load(s['conditions'])}. Fusions: "
                 f"multi-LoRA {res['fusions']['multi_lora']}, folded {res['fusions']['folded']}; "
                 f"nodes {res['nodes']['multi_lora']} / {res['nodes']['folded']}.")
    return "\n".join(lines)


def _load(c: Any) -> str:
    if isinstance(c, dict):
        la = c.get("load_average_end") or c.get("load_average_start")
        if la:
            return "/".join(str(x) for x in la) if isinstance(la, (list, tuple)) else str(la)
    return str(c)[:40]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)
