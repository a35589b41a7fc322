"""Run the capaboost_fx benchmarks: one command, tables on stdout, JSON on disk.

    .venv/bin/python benchmarks/run.py                 # full run (12 min measured on 2 shared cores)
    .venv/bin/python benchmarks/run.py --quick         # tiny sizes, 1-2 rounds (< 60 s), for CI
    .venv/bin/python benchmarks/run.py --out DIR --only step,fold --threads 1

Benchmarks: step (training step time), memory (peak memory of a step), fold (transform and
fold time vs parameter count), onnx (onnxruntime latency of the folded vs the base model).
Each writes DIR/<name>.json; the whole run is also written to DIR/cpu.json (cpu_quick.json in
quick mode, cpu_<N>thread.json with --threads N). These are measurements, not tests: nothing
here fails on a slow number. The exit status is 1 only if a benchmark raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

BENCHES = ("step", "memory", "fold", "onnx")
HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 rounds (CI)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    ap.add_argument("--only", default=",".join(BENCHES),
                    help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--layers", type=int, default=None,
                    help="override L of the step/memory/onnx model (default 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/onnxruntime intra-op threads (default 2; quick mode 1)")
    args = ap.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")

    import bench_fold
    import bench_memory
    import bench_onnx
    import bench_step

    modules = {"step": bench_step, "memory": bench_memory, "fold": bench_fold,
               "onnx": bench_onnx}
    st = common.settings(args.quick, args.layers)
    if args.threads:
        st = dataclasses.replace(st, threads=args.threads)
    common.setup_torch(st.threads)
    ctx = common.Context(st)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    whole = common.Contention()
    result = {"settings": st.to_dict(), "machine": common.machine(), "benchmarks": {},
              "errors": {}}
    print(f"# capaboost_fx benchmarks ({'quick' if args.quick else 'full'} mode)")
    print(f"model: {st.size.describe()}, batch {st.batch}, seq {st.seq}, float32, CPU, "
          f"{st.threads} threads; torch {result['machine']['torch']}")
    for name in BENCHES:
        if name not in only:
            continue
        print(f"\n## {name}", flush=True)
        t0 = time.perf_counter()
        load = common.Contention()
        try:
            res = modules[name].run(st, ctx, log=lambda m: print(m, flush=True))
        except Exception as e:
            traceback.print_exc()
            result["errors"][name] = f"{type(e).__name__}: {e}"
            continue
        res["wall_seconds"] = round(time.perf_counter() - t0, 1)
        res["contention"] = load.stop()
        result["benchmarks"][name] = res
        common.write_json(os.path.join(args.out, f"{name}.json"),
                          {"settings": result["settings"], "machine": result["machine"], **res})
        print(modules[name].report(res))
        print(f"({name}: {res['wall_seconds']} s; CPU share taken by other processes: "
              f"{res['contention'].get('others_cpu_share')}; "
              f"{res['contention']['conditions_text']})", flush=True)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    result["contention"] = whole.stop()
    result["summary"] = summarize(result)
    stem = "cpu_quick" if args.quick else "cpu"
    if st.threads != (1 if args.quick else common.THREADS):
        stem += f"_{st.threads}thread"
    path = os.path.join(args.out, stem + ".json")
    common.write_json(path, result)
    print("\n## summary")
    print(summary_table(result["summary"]))
    print(f"\nwall time {result['wall_seconds']} s; CPU share taken by other processes: "
          f"{result['contention'].get('others_cpu_share')}; "
          f"{result['contention']['conditions_text']}; JSON: {path}")
    return 1 if result["errors"] else 0


def summarize(result: dict) -> list[dict]:
    """The headline figures, each beside its target."""
    rows = []
    b = result["benchmarks"]
    for r in b.get("step", {}).get("ratios", []):
        if "target" in r:
            rows.append({"figure": f"step time {r['a']} / {r['b']}", "median": r["median"],
                         "q1": r["q1"], "q3": r["q3"], "target": r["target"],
                         "verdict": common.verdict(r)})
    for r in b.get("memory", {}).get("ratios", []):
        if "target" in r:
            rows.append({"figure": f"peak memory {r['a']} / {r['b']}", "median": r["median"],
                         "q1": r["q1"], "q3": r["q3"], "target": r["target"],
                         "verdict": common.verdict(r)})
    big = b.get("fold", {}).get("bert_base_110M", {})
    if "fold_seconds" in big:
        rows.append({"figure": f"fold time, BERT-base {big['params'] / 1e6:.1f}M params (s)",
                     "median": big["fold_seconds"], "q1": None, "q3": None,
                     "target": big["target"], "verdict": "met" if big["met"] else "missed"})
        one = big["fold_1thread_seconds"]
        rows.append({"figure": "fold time, BERT-base, torch.set_num_threads(1) (s)",
                     "median": one, "q1": None, "q3": None, "target": big["target"],
                     "verdict": "met" if one < 1.0 else "missed"})
    onnx = b.get("onnx", {})
    for k, v in onnx.get("latency", {}).items():
        r = v["ratio"]
        rows.append({"figure": f"ONNX latency folded / base, {k}", "median": r["median"],
                     "q1": r["q1"], "q3": r["q3"], "target": r["target"],
                     "verdict": common.verdict(r)})
    if onnx:
        g = onnx["graph"]
        rows.append({"figure": "ONNX node count folded vs base",
                     "median": f"{g['folded']['nodes']} vs {g['base']['nodes']}", "q1": None,
                     "q3": None, "target": "identical",
                     "verdict": "met" if onnx["identical_node_counts"] else "missed"})
    return rows


def summary_table(rows: list[dict]) -> str:
    def f(x):
        return "" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    return common.table(["figure", "median", "IQR", "target", "verdict"],
                        [[r["figure"], f(r["median"]),
                          "" if r["q1"] is None else f"{r['q1']:.3f}–{r['q3']:.3f}",
                          r["target"], r["verdict"]] for r in rows])


if __name__ == "__main__":
    sys.exit(main())
