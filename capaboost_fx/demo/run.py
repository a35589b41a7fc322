"""The demo run: train both arms, fold CapaBoost, export base and folded to ONNX, serve the
folded file with onnxruntime, write the report. `run` is the function, `main` the command."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import capaboost_fx as cbx
from capaboost_fx.onnx.timing import conditions, describe_conditions

from .config import ARM_TITLES, ARMS, CITATIONS, MODEL_NAME, DemoConfig, arm_spec, parse
from .data import (
    SST2Data,
    collate,
    eval_chunks,
    fixed_batches,
    load_data,
    load_model,
    train_batches,
)
from .report import FOLD_ATOL, NEAR_TIE, plot_loss, plot_spectrum, write_report
from .train import ArmResult, TrainSettings, progress, train_arm


def _say(config: DemoConfig, text: str) -> None:
    if config.progress:
        print(text, file=sys.stderr, flush=True)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _environment(threads: int) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "capaboost_fx": cbx.__version__, "threads": threads, "cores_available": _cores(),
           "conditions": conditions()}  # CPU, threads, load average (its end added at the end)
    for dist in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    return env


def run(config: DemoConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the demo with `config` (a `DemoConfig` or a dict of its fields) and return the
    report dict (also written to ``<out>/report.json``, with ``report.md`` and the plots).

    Torch's thread count and global RNG are restored afterwards.
    """
    if config is None:
        config = DemoConfig()
    elif isinstance(config, Mapping):
        config = DemoConfig(**config)
    config = dataclasses.replace(config).validate()
    threads = config.threads or _cores()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _run(config, threads)
    finally:
        torch.set_num_threads(previous)


def _run(config: DemoConfig, threads: int) -> dict[str, Any]:
    # ~70 lines on purpose: the main job's stages in the order they run (load, train the arms,
    # compare, fold, export, serve, write), each one call, read top to bottom.
    t_start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer, model_path = load_model(config.model, config.seed)
    data = load_data(tokenizer, config.max_length, config.train_size, config.eval_size)
    timings: dict[str, float] = {"load_seconds": time.perf_counter() - t_start}
    report: dict[str, Any] = {
        "version": 2,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "config": config.to_dict(),
        "environment": _environment(threads),
        "data": {**data.summary(), "citations": CITATIONS},
        "model": {"name": MODEL_NAME if config.model is None else model_path, "path": model_path,
                  "parameters": sum(p.numel() for p in base.parameters()),
                  "hidden_size": base.config.hidden_size,
                  "layers": base.config.num_hidden_layers},
        "runs": {}, "comparison": {}, "fold": {}, "onnx": {}, "timings": timings, "files": {},
    }

    trained = _train_arms(config, base, data, report)
    timings["train_seconds"] = sum(report["runs"][a]["train_seconds"] for a in ARMS)
    _plots(report, out)
    report["status"] = "trained"
    _finish(report, t_start)
    write_report(out, report)  # a later failure still leaves the training results

    tm = trained.pop("capaboost").model
    trained.clear()  # only CapaBoost is folded; free the LoRA arm
    t0 = time.perf_counter()
    deploy = cbx.fold(tm)
    fold_seconds = time.perf_counter() - t0
    serve_batch = 16 if config.max_length != 16 else 8  # batch != sequence in the example
    ex_ids, ex_mask = collate([data.dev_seqs[i % len(data.dev_seqs)] for i in range(serve_batch)],
                              data.pad_id, length=config.max_length)
    example = {"input_ids": ex_ids, "attention_mask": ex_mask}

    paths, dynamic = None, True
    if not config.onnx:
        report["onnx"] = {"skipped": True, "reason": "--skip-onnx was given"}
    else:
        report["onnx"], paths = _stage(report, out, t_start,
                                       lambda: _export(config, base, deploy, example, out))
        dynamic = report["onnx"]["dynamic"]
        report["files"].update(onnx_base="onnx/base.onnx", onnx_folded="onnx/folded.onnx")

    # The folded model in PyTorch, on the batches onnxruntime will get: sorted and dynamically
    # padded when the ONNX graph takes any batch/sequence size, else of the export shape.
    if dynamic:
        batches = [(c, len(c)) for c in eval_chunks([len(s) for s in data.dev_seqs], serve_batch)]
        length = None
    else:
        batches, length = fixed_batches(len(data.dev_seqs), serve_batch), config.max_length
    inputs = [collate([data.dev_seqs[i] for i in idx], data.pad_id, length=length)
              for idx, _ in batches]
    report["fold"], pt_logits = _fold_check(config, tm, deploy, inputs, batches, data)
    report["fold"]["seconds"] = fold_seconds

    if paths is not None:
        _stage(report, out, t_start, lambda: _serve(config, report["onnx"], paths, inputs,
                                                    batches, pt_logits, data, example, threads))
        timings["onnx_seconds"] = report["onnx"]["seconds"]
    report["files"].update(report_json="report.json", report_md="report.md")
    serving = report["onnx"].get("serving")
    ok = report["fold"]["ok"] and (serving is None or serving["match"])
    report["status"] = "ok" if ok else "check failed"
    _finish(report, t_start)
    write_report(out, report)
    return report


def _finish(report: dict[str, Any], t_start: float) -> None:
    """The total time so far, and the load average now beside the one at the start."""
    report["timings"]["total_seconds"] = time.perf_counter() - t_start
    env = report["environment"]
    env["conditions"] = conditions(env["conditions"])


def _train_arms(config: DemoConfig, base: nn.Module, data: SST2Data,
                report: dict[str, Any]) -> dict[str, ArmResult]:
    """Both arms on the same batches in the same order, each at its own learning rate."""
    order = train_batches(len(data.train_seqs), config.steps, config.batch_size, config.seed)
    trained: dict[str, ArmResult] = {}
    for arm in ARMS:
        spec = arm_spec(config, arm)
        _say(config, f"[demo] {ARM_TITLES[arm]} r={spec.rank} d={spec.num_masks} "
                     f"density={spec.density:g} lr={config.lr(arm):g}: capturing the model")
        settings = TrainSettings(
            steps=config.steps, batch_size=config.batch_size, lr=config.lr(arm),
            seed=config.seed, warmup=config.warmup, weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm, eval_batch_size=config.eval_batch_size)
        result = train_arm(base, spec, data, settings, order=order, show=config.progress,
                           desc=ARM_TITLES[arm])
        report["runs"][arm] = result.summary()
        trained[arm] = result
        s = result.adapters
        _say(config, f"[demo] {ARM_TITLES[arm]}: dev accuracy {100 * result.accuracy:.2f}%, "
                     f"ΔW rank {s['min_rank']}..{s['max_rank']}")
    preds = [trained[a].evaluation["predictions"] for a in ARMS]
    report["comparison"] = {
        "accuracy_delta": trained["capaboost"].accuracy - trained["lora"].accuracy,
        "disagreements": sum(int(a != b) for a, b in zip(*preds, strict=True)),
    }
    return trained


def _plots(report: dict[str, Any], out: Path) -> None:
    runs = report["runs"]
    plot_loss({a: runs[a]["losses"] for a in ARMS}, out / "loss.png")
    names = list(runs["lora"]["layers"])
    picks = list(dict.fromkeys(names[i] for i in (0, len(names) // 2, len(names) - 1)))
    spectra = {n: {a: runs[a]["layers"][n]["singular_values"] for a in ARMS} for n in picks}
    shape = runs["lora"]["layers"][picks[0]]["shape"]
    plot_spectrum(spectra, out / "spectrum.png", rtol=max(shape) * torch.finfo(torch.float64).eps)
    report["files"].update(loss="loss.png", spectrum="spectrum.png")


def _stage(report: dict[str, Any], out: Path, t_start: float, fn: Any) -> Any:
    """Run an ONNX stage; on failure keep what was measured, record the error, re-raise."""
    try:
        return fn()
    except Exception as e:
        report["onnx"] = {**report.get("onnx", {}), "error": f"{type(e).__name__}: {e}"}
        report["status"] = "failed in the ONNX stage"
        _finish(report, t_start)
        write_report(out, report)
        raise


def _top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@torch.no_grad()
def _fold_check(config: DemoConfig, tm: nn.Module, deploy: nn.Module,
                inputs: list[tuple[torch.Tensor, torch.Tensor]],
                batches: list[tuple[list[int], int]], data: SST2Data
                ) -> tuple[dict[str, Any], torch.Tensor]:
    """Logits of the folded model on every batch, and on a few batches its difference from the
    training module (the fold must not change the function)."""
    logits_all = torch.zeros(len(data.dev_seqs), 2)
    max_diff, equal, compared = 0.0, True, 0
    step = max(1, len(batches) // 4)
    for k, ((ids, mask), (idx, real)) in enumerate(progress(
            list(zip(inputs, batches, strict=True)), config.progress,
            desc="eval folded (PyTorch)", unit="batch")):
        logits = deploy(input_ids=ids, attention_mask=mask).logits[:real].float()
        logits_all[idx[:real]] = logits
        if k % step == 0 and compared < 4 * len(idx):
            ref = tm(input_ids=ids, attention_mask=mask).logits[:real].float()
            max_diff = max(max_diff, float((ref - logits).abs().max()))
            flips = (ref.argmax(-1) != logits.argmax(-1)) & (_top2_margin(ref) > NEAR_TIE)
            equal &= not bool(flips.any())
            compared += real
    labels = torch.tensor(data.dev_labels)
    fold = {"targets": len(cbx.adapters(tm)), "compared_examples": compared,
            "max_abs_logit_diff": max_diff,
            "predictions_equal": equal,  # up to near-ties (top-2 margin <= NEAR_TIE)
            "ok": equal and max_diff <= FOLD_ATOL,
            "accuracy": float((logits_all.argmax(-1) == labels).float().mean())}
    return fold, logits_all


def _export(config: DemoConfig, base: nn.Module, deploy: nn.Module,
            example: Mapping[str, torch.Tensor], out: Path
            ) -> tuple[dict[str, Any], dict[str, str]]:
    """Export base and folded into ``out/onnx`` (moved there once both exist). Returns what
    the files hold (`onnx_stats`), whether the folded graph's batch and sequence dims are
    dynamic, and the paths."""
    from capaboost_fx.onnx.stats import onnx_stats  # the ONNX extras: only when exporting

    t0 = time.perf_counter()
    final = out / "onnx"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".onnx-"))
    info: dict[str, Any] = {}
    try:
        for key, module in (("base", base), ("folded", deploy)):
            _say(config, f"[demo] exporting the {key} model to ONNX")
            t1 = time.perf_counter()
            rep = cbx.export_onnx(module, str(tmp / f"{key}.onnx"), example_kwargs=dict(example),
                                  verify=True)
            info[key] = {"export_seconds": time.perf_counter() - t1, "export": rep.to_dict()}
        _say(config, "[demo] exporting the folded model as dynamic int8 (CPU)")
        t1 = time.perf_counter()
        rep = cbx.export_onnx(deploy, str(tmp / "folded_int8.onnx"),
                              example_kwargs=dict(example), quantize="int8")
        info["folded_int8"] = {"export_seconds": time.perf_counter() - t1,
                               "export": rep.to_dict()}
        final.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):  # same names, so external-data links stay valid
            os.replace(f, final / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    paths = {k: str(final / f"{k}.onnx") for k in ("base", "folded", "folded_int8")}
    for key, path in paths.items():
        s = onnx_stats(path)
        info[key].update(nodes=s.node_count, initializers=s.initializer_count,
                         file_bytes=s.file_bytes, ops=s.op_histogram,
                         inputs=[v["name"] for v in s.inputs],
                         input_shapes={v["name"]: v["shape"] for v in s.inputs})
    # Symbolic batch and sequence dims let the serving check use the sorted, unpadded batches.
    dynamic = all(len(s) >= 2 and all(isinstance(d, str) for d in s[:2])
                  for s in info["folded"]["input_shapes"].values())
    result = {"serve_shape": list(example["input_ids"].shape), "dynamic": dynamic,
              "same_ops": info["base"]["ops"] == info["folded"]["ops"],
              "seconds": time.perf_counter() - t0, **info}
    return result, paths


def _serve(config: DemoConfig, result: dict[str, Any], paths: Mapping[str, str],
           inputs: list[tuple[torch.Tensor, torch.Tensor]], batches: list[tuple[list[int], int]],
           pt_logits: torch.Tensor, data: SST2Data, example: Mapping[str, torch.Tensor],
           threads: int) -> None:
    """Serve the folded file with onnxruntime and check it predicts what PyTorch predicts; then
    compare base and folded (graph, size, latency side by side on the same real input).
    Nine parameters: what the earlier stages of `_run` produced, passed on as they are."""
    from capaboost_fx.onnx.runtime import open_session
    from capaboost_fx.onnx.stats import compare_onnx

    t0 = time.perf_counter()

    def serve(path: str, what: str) -> torch.Tensor:
        session = open_session(path, providers="cpu", intra_op_num_threads=threads)
        logits = torch.zeros_like(pt_logits)
        for (ids, mask), (idx, real) in progress(list(zip(inputs, batches, strict=True)),
                                                 config.progress, desc=f"serve {what}",
                                                 unit="batch"):
            got = session.run({"input_ids": ids, "attention_mask": mask})
            logits[idx[:real]] = torch.as_tensor(got[session.output_names[0]])[:real].float()
        return logits

    ort_logits = serve(paths["folded"], "folded (onnxruntime)")
    ort_preds, pt_preds = ort_logits.argmax(-1), pt_logits.argmax(-1)
    equal = int((ort_preds == pt_preds).sum())
    # A prediction may only flip where PyTorch's own top-2 margin is within rounding noise.
    near_ties = int(((ort_preds != pt_preds) & (_top2_margin(pt_logits) <= NEAR_TIE)).sum())
    labels = torch.tensor(data.dev_labels)
    result["serving"] = {
        "n": int(pt_preds.numel()), "equal": equal, "near_ties": near_ties,
        "match": equal + near_ties == pt_preds.numel(),
        "max_abs_logit_diff": float((ort_logits - pt_logits).abs().max()),
        "accuracy": float((ort_preds == labels).float().mean()),
    }
    _say(config, "[demo] comparing base and folded ONNX models (graph, size, latency)")
    cmp = compare_onnx(paths["base"], paths["folded"], latency=True, runs=config.latency_runs,
                       providers="cpu", intra_op_num_threads=threads, inputs=dict(example),
                       batch_size=int(example["input_ids"].shape[0]),
                       seq_len=int(example["input_ids"].shape[1]))
    lat = {"base": cmp.latency_base, "folded": cmp.latency_other}
    result["latency"] = {k: {"median_ms": v.median_ms, "p90_ms": v.p90_ms, "runs": v.runs}
                         for k, v in lat.items()}
    result["latency_ratio"] = lat["folded"].median_ms / max(lat["base"].median_ms, 1e-9)
    result["same_graph"] = cmp.same_graph
    result["same_graph_up_to_folding"] = cmp.same_graph_up_to_folding
    result["graph_summary"] = cmp.graph_summary("base", "folded")
    result["latency_comparison"] = cmp.latency_comparison.to_dict()
    result["compare_markdown"] = cmp.to_markdown("base", "folded")
    # int8: what dynamic quantization costs in accuracy, and what it buys in latency.
    _say(config, "[demo] serving the int8 model and timing it against fp32")
    int8_preds = serve(paths["folded_int8"], "folded int8 (onnxruntime)").argmax(-1)
    q = compare_onnx(paths["folded"], paths["folded_int8"], latency=True,
                     runs=config.latency_runs, providers="cpu", intra_op_num_threads=threads,
                     inputs=dict(example), batch_size=int(example["input_ids"].shape[0]),
                     seq_len=int(example["input_ids"].shape[1]))
    result["int8"] = {
        "accuracy": float((int8_preds == labels).float().mean()),
        "accuracy_fp32": result["serving"]["accuracy"],
        "agreement_with_fp32": float((int8_preds == ort_preds).float().mean()),
        "latency_ms": {"fp32": q.latency_base.median_ms, "int8": q.latency_other.median_ms},
        "speedup": q.latency_base.median_ms / max(q.latency_other.median_ms, 1e-9),
        "file_bytes": {"fp32": result["folded"]["file_bytes"],
                       "int8": result["folded_int8"]["file_bytes"]},
    }
    result["seconds"] += time.perf_counter() - t0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command line entry point; returns 0 when every check passed, 1 otherwise."""
    config = parse(argv, prog)
    # bitsandbytes (installed with the [dev] extra, imported by transformers while tracing)
    # warns on CPUs with AVX-512 BF16 that an optional 4-bit kernel package is missing; this
    # demo quantizes nothing with it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    report = run(config)
    print(f"\nreport: {Path(config.out) / 'report.md'}")
    for arm in ARMS:
        r = report["runs"][arm]
        print(f"  {ARM_TITLES[arm]:<15} dev accuracy {100 * r['accuracy']:.2f}%  "
              f"ΔW rank {r['min_rank']}..{r['max_rank']}  "
              f"live/trainable {r['adapter_live_params']:,}/{r['adapter_trainable_params']:,}")
    onnx = report["onnx"]
    if not onnx.get("skipped"):
        print(f"  ONNX nodes base/folded {onnx['base']['nodes']}/{onnx['folded']['nodes']}, "
              f"latency {onnx['latency']['base']['median_ms']:.1f}/"
              f"{onnx['latency']['folded']['median_ms']:.1f} ms, onnxruntime == PyTorch: "
              f"{onnx['serving']['equal']}/{onnx['serving']['n']}")
        if onnx.get("int8"):
            q = onnx["int8"]
            print(f"  int8: dev accuracy {100 * q['accuracy']:.2f}% (fp32 "
                  f"{100 * q['accuracy_fp32']:.2f}%), {q['speedup']:.2f}x as fast as fp32")
    print(f"  total {report['timings']['total_seconds']:.0f} s "
          f"({describe_conditions(report['environment']['conditions'])}), "
          f"status: {report['status']}")
    return 0 if report["status"] == "ok" else 1
