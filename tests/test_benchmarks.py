"""The benchmark scripts keep working: `benchmarks/run.py --quick` runs end to end and writes
JSON with the expected keys and sane numbers. No timing assertion: the numbers of a quick run
on a shared CI machine say nothing; `benchmarks/README.md` holds a full run's figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("step", "memory", "fold", "onnx")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"run.py --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc.stdout


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_summary(s: dict) -> None:
    assert {"median", "q1", "q3", "min", "max", "n", "samples"} <= set(s)
    assert s["n"] >= 1 and len(s["samples"]) == s["n"]
    assert all(_positive(v) for v in s["samples"])
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]


def _check_ratio(r: dict) -> None:
    _check_summary(r)
    assert r["a"] and r["b"]
    if "target" in r:
        assert r["target"].split()[0] in ("<=", ">=")
        assert isinstance(r["met"], bool)


def test_files_and_combined_json(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    for name in BENCHES:
        assert (out / f"{name}.json").is_file(), name
    data = json.loads((out / "cpu_quick.json").read_text())
    assert data["errors"] == {}
    assert set(BENCHES) <= set(data["benchmarks"])
    assert data["settings"]["mode"] == "quick"
    assert data["settings"]["size"]["num_hidden_layers"] >= 1
    assert data["machine"]["torch"].startswith("2.")
    assert _positive(data["wall_seconds"])
    figures = [r["figure"] for r in data["summary"]]
    assert any("capaboost_d2 / peft_r8" in f for f in figures)
    assert any("ONNX latency" in f for f in figures)
    assert "## summary" in stdout and "| figure" in stdout  # tables are printed
    # times carry their conditions: machine, threads, load average at start and end
    cond = data["contention"]["conditions"]
    assert cond["cpu_count"] == os.cpu_count() and cond["cpu_model"]
    assert cond["torch_threads"] == data["settings"]["threads"]
    assert data["machine"]["conditions"]["python"] == cond["python"]
    if hasattr(os, "getloadavg"):
        assert len(cond["load_average_start"]) == len(cond["load_average_end"]) == 3
    assert f"wall time {data['wall_seconds']} s" in stdout
    assert data["contention"]["conditions_text"] in stdout
    assert "torch threads, load average" in data["contention"]["conditions_text"]


def test_step_json(quick_run: tuple[Path, str]) -> None:
    res = json.loads((quick_run[0] / "step.json").read_text())
    expected = {"peft_r8", "peft_r16", "peft_r32", "capaboost_d2", "capaboost_d4", "loop_d4",
                "eager_capaboost_d2", "base_eager", "base_captured"}
    assert expected <= set(res["step_seconds"])
    for s in res["step_seconds"].values():
        _check_summary(s)
    pairs = {(r["a"], r["b"]) for r in res["ratios"]}
    assert {("capaboost_d2", "peft_r8"), ("capaboost_d4", "peft_r8"),
            ("loop_d4", "capaboost_d4"), ("base_captured", "base_eager")} <= pairs
    for r in res["ratios"]:
        _check_ratio(r)
    # Same trainable parameters for CapaBoost and LoRA at the same rank.
    cfg = res["configs"]
    assert cfg["capaboost_d2"]["trainable_params"] == cfg["peft_r8"]["trainable_params"]
    assert cfg["capaboost_d4"]["trainable_params"] == cfg["loop_d4"]["trainable_params"]
    # The compared configurations compute the same function.
    for name, diff in res["setup"]["equivalence_max_abs_diff"].items():
        assert diff < 1e-4, name
    assert res["profile"] and all(p["largest_differences"] for p in res["profile"].values())
    assert res["layer"]["loop_d4_vs_capaboost_d4_max_abs_diff"] < 1e-4
    for r in res["layer"]["ratios"]:
        _check_ratio(r)


def test_memory_json(quick_run: tuple[Path, str]) -> None:
    res = json.loads((quick_run[0] / "memory.json").read_text())
    for n, s in res["peak_MiB"].items():
        _check_summary(s)
        assert s["median"] > res["resident_MiB"][n] > 0  # a step allocates something
    for r in res["ratios"]:
        _check_ratio(r)
    assert "profiler" in res["method"]


def test_fold_json(quick_run: tuple[Path, str]) -> None:
    res = json.loads((quick_run[0] / "fold.json").read_text())
    sizes = res["sizes"]
    assert len(sizes) == 4
    params = [r["params"] for r in sizes]
    assert params == sorted(params) and len(set(params)) == 4
    for r in sizes:
        assert _positive(r["transform_seconds"])
        _check_summary(r["fold_seconds"])
        _check_ratio(r["fold_over_deepcopy"])
        assert r["folded_vs_train_eval_max_abs_diff"] < 1e-4
    assert "bert_base_110M" in res


def test_onnx_json(quick_run: tuple[Path, str]) -> None:
    res = json.loads((quick_run[0] / "onnx.json").read_text())
    g = res["graph"]
    for n in ("base", "folded"):
        assert g[n]["nodes"] > 0 and g[n]["file_bytes"] > 0
    assert res["identical_node_counts"] and res["identical_op_histograms"]
    for b in ("batch1", "batch8"):
        lat = res["latency"][b]
        _check_summary(lat["ms"]["base"])
        _check_summary(lat["ms"]["folded"])
        _check_ratio(lat["ratio"])
        c = res["correctness_max_abs_diff"][b]
        assert c["base_onnx_vs_torch"] < 1e-4 and c["folded_onnx_vs_torch"] < 1e-4
        assert c["folded_vs_base_logits"] > 0  # the fold changed the weights
    assert res["exporter"]
