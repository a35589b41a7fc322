"""Is the default export the fastest file? (issue 31, point 4)

For three model kinds — an encoder classifier (BERT-shaped), a decoder LM (GPT-2-shaped) and a
vision classifier (ViT-shaped), random weights, no download — the base model is exported with
every standard tool that can make its graph:

| base variant | how |
| --- | --- |
| dynamo | ``torch.onnx.export(dynamo=True)`` (``export_onnx(optimize="none")``) |
| dynamo+fusions | that graph with onnxscript's onnxruntime fusions (``optimize="ort"``) |
| dynamo+ort.transformers | the dynamo graph through ``onnxruntime.transformers.optimizer`` |
| torchscript | ``torch.onnx.export(dynamo=False)``, eager attention (``optimize="torchscript"``) |
| torchscript+ort.transformers | that graph through the optimizer (``optimize="torchscript+ort"``) |

and its CapaBoost fold (Spec on the attention's query/value projections, d=2, r=8, adapters'
B nonzero) is exported with the **default** ``export_onnx(folded, path, example_kwargs=...)``
and, for comparison, the previous default ``optimize="ort"``. All files run side by side in
interleaved rounds (`measure_latency`: CPUExecutionProvider, `--threads` intra-op threads,
sequential, no spinning) at the serving batch; the figure is folded-default ÷ fastest base
(ratio of medians, and the per-round ratios' interquartile range). Export seconds of the
default and of ``optimize="ort"`` are the wall time of each `export_onnx` call.

    .venv/bin/python benchmarks/bench_default_export.py            # ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_default_export.py --rounds 8 --kinds vision
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table, write_json  # noqa: E402

import capaboost_fx as cbx  # noqa: E402
from capaboost_fx.onnx import export_onnx, measure_latency, open_session  # noqa: E402
from capaboost_fx.onnx.exporters import ort_transformers  # noqa: E402

BASE_VARIANTS = {"dynamo": "none", "dynamo+fusions": "ort", "torchscript": "torchscript",
                 "torchscript+ort.transformers": "torchscript+ort"}


def encoder() -> tuple[Any, dict, dict, list[str]]:
    from transformers import BertConfig, BertForSequenceClassification

    m = BertForSequenceClassification(BertConfig(
        vocab_size=2000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, num_labels=3))
    ids = torch.randint(5, 2000, (8, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:2, 48:] = 0
    return m, {"input_ids": ids[:2, :16], "attention_mask": mask[:2, :16]}, \
        {"input_ids": ids, "attention_mask": mask}, ["*.query", "*.value"]


def decoder() -> tuple[Any, dict, dict, list[str]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=2000, n_embd=256, n_layer=4, n_head=4,
                                   n_positions=128, bos_token_id=0, eos_token_id=0))
    ids = torch.randint(5, 2000, (8, 64), generator=torch.Generator().manual_seed(1))
    return m, {"input_ids": ids[:2, :16], "use_cache": False}, \
        {"input_ids": ids, "use_cache": False}, ["*.c_attn"]


def vision() -> tuple[Any, dict, dict, list[str]]:
    from transformers import ViTConfig, ViTForImageClassification

    m = ViTForImageClassification(ViTConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        image_size=64, patch_size=8, num_labels=10))
    px = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return m, {"pixel_values": px[:2]}, {"pixel_values": px}, ["*.q_proj", "*.v_proj"]


KINDS = {"encoder": encoder, "decoder": decoder, "vision": vision}


def fold(base: Any, example: dict, targets: list[str]) -> Any:
    tm = cbx.transform(base, cbx.Spec(targets=targets, rank=8, num_masks=2, density=0.5,
                                      alpha=16.0, seed=0), example_kwargs=example)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in cbx.adapters(tm).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.02)
    return cbx.fold(tm.eval(), example_kwargs=example)


def run_kind(kind: str, args: argparse.Namespace, workdir: str, log) -> dict[str, Any]:
    torch.manual_seed(0)
    base, example, serve, targets = KINDS[kind]()
    base.eval()
    session = dict(providers="cpu", intra_op_num_threads=args.threads, inter_op_num_threads=1,
                   sequential=True, session_config={"session.intra_op.allow_spinning": "0"})
    paths: dict[str, str] = {}
    notes: dict[str, str] = {}
    for variant, optimize in BASE_VARIANTS.items():
        p = os.path.join(workdir, f"{kind}.base.{variant}.onnx")
        try:
            rep = export_onnx(base, p, example_kwargs=example, optimize=optimize,
                              providers="cpu")
        except Exception as e:  # noqa: BLE001 - a tool that cannot make this graph
            notes[f"base/{variant}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        if rep.optimize != optimize:  # export_onnx fell back: not this tool's graph
            notes[f"base/{variant}"] = f"cannot be made (export_onnx wrote {rep.optimize})"
            continue
        paths[f"base/{variant}"] = p
    if "base/dynamo" in paths:
        p = os.path.join(workdir, f"{kind}.base.dynamo_ortt.onnx")
        try:
            if ort_transformers(paths["base/dynamo"], p, base) is not None:
                paths["base/dynamo+ort.transformers"] = p
            else:
                notes["base/dynamo+ort.transformers"] = "optimizer knows no such model type"
        except Exception as e:  # noqa: BLE001
            notes["base/dynamo+ort.transformers"] = f"{type(e).__name__}"
    folded = fold(base, example, targets)
    seconds: dict[str, float] = {}
    chose: dict[str, str] = {}
    for label, options in (("folded/default", {}), ("folded/ort (old default)",
                                                    {"optimize": "ort"})):
        p = os.path.join(workdir, f"{kind}.{label.split()[0].replace('/', '.')}.onnx")
        t0 = time.perf_counter()
        try:
            rep = export_onnx(folded, p, example_kwargs=example, providers="cpu", **options)
        except Exception as e:  # noqa: BLE001 - reported, the other files still timed
            notes[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            seconds[label], chose[label] = float("nan"), "failed"
            continue
        seconds[label] = round(time.perf_counter() - t0, 1)
        chose[label] = rep.optimize
        paths[label] = p
    log(f"  {kind}: {len(paths)} files; default chose {chose['folded/default']} in "
        f"{seconds['folded/default']} s (optimize='ort': {seconds['folded/ort (old default)']} s)")
    sessions = {k: open_session(p, **session) for k, p in paths.items()}
    feeds = {k: {n: serve[n] for n in s.input_names} for k, s in sessions.items()}
    stats = measure_latency(sessions, feeds, runs=args.rounds, warmup=2)
    bases = [k for k in stats if k.startswith("base/")]
    ref = min(bases, key=lambda k: stats[k].median_ms)
    rows = {}
    for k, st in stats.items():
        per = [a / b for a, b in zip(st.samples_ms, stats[ref].samples_ms, strict=True)]
        q = statistics.quantiles(per, n=4) if len(per) > 1 else per * 3
        rows[k] = {"median_ms": round(st.median_ms, 2),
                   "ratio": round(st.median_ms / stats[ref].median_ms, 3),
                   "iqr": [round(q[0], 3), round(q[-1], 3)]}
    return {"kind": kind, "model": type(base).__name__, "reference": ref, "rows": rows,
            "not_made": notes, "export_seconds": seconds, "default_chose": chose}


def report(results: list[dict], args: argparse.Namespace) -> str:
    out = [f"batch of 8 (64 tokens / 64×64 images), onnxruntime CPU, {args.threads} threads, "
           f"{args.rounds} interleaved rounds", ""]
    rows = []
    missing = {"ratio": float("nan"), "iqr": [float("nan")] * 2}
    for r in results:
        d = r["rows"].get("folded/default", missing)
        o = r["rows"].get("folded/ort (old default)", missing)
        rows.append([r["kind"], r["model"], f"{r['reference'].split('/')[1]} "
                     f"({r['rows'][r['reference']]['median_ms']:.1f} ms)",
                     f"{r['default_chose']['folded/default']}", f"{d['ratio']:.3f}",
                     f"{d['iqr'][0]:.2f}–{d['iqr'][1]:.2f}", f"{o['ratio']:.3f}",
                     f"{r['export_seconds']['folded/default']} / "
                     f"{r['export_seconds']['folded/ort (old default)']}"])
    out.append(table(["kind", "model", "fastest base export", "default chose",
                      "default ÷ fastest base", "per-round IQR", "optimize='ort' ÷ fastest base",
                      "export s: default / 'ort'"], rows))
    for r in results:
        out.append("")
        out.append(f"{r['kind']}: " + ", ".join(
            f"{k} {v['median_ms']:.1f} ms ({v['ratio']:.3f})" for k, v in r["rows"].items()))
        if r["not_made"]:
            out.append("  not made: " + "; ".join(f"{k}: {v}" for k, v in r["not_made"].items()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "default_export.json"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    info = machine()
    with tempfile.TemporaryDirectory() as workdir:
        results = [run_kind(k, args, workdir, log) for k in args.kinds]
    text = report(results, args)
    print(text)
    write_json(args.out, {"command": "python benchmarks/bench_default_export.py "
                          + " ".join(argv if argv is not None else sys.argv[1:]),
                          "machine": info, "seconds": round(time.perf_counter() - t0),
                          "results": results, "markdown": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
