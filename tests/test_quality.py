"""`benchmarks/quality.py --quick` runs end to end, and what it writes is consistent: every run
present once, the summaries recomputed from the runs, the lr chosen on the select half, the
parameter counts, ranks and scales each arm must have."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("quality")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--quiet",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "quality.json").read_text(encoding="utf-8")), out


def _se(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs))


def test_every_run_once_and_summaries_recomputed(quick) -> None:
    result, _ = quick
    cfg, runs, summary = result["config"], result["runs"], result["summary"]
    keys = [(r["arm"], r["lr"], r["seed"]) for r in runs]
    assert sorted(keys) == sorted((a, lr, s) for a in cfg["arms"] for lr in cfg["lrs"]
                                  for s in cfg["seeds"])
    assert list(summary) == cfg["arms"]
    n = cfg["eval_size"]
    for r in runs:  # the two halves make up the whole dev set
        both = r["accuracy_select"] * math.ceil(n / 2) + r["accuracy_heldout"] * (n // 2)
        assert both == pytest.approx(r["accuracy"] * n)
    for arm, e in summary.items():
        for lr in cfg["lrs"]:
            rs = [r for r in runs if r["arm"] == arm and r["lr"] == lr]
            cell = e["lr_grid"][f"{lr:g}"]
            assert cell["n"] == len(cfg["seeds"])
            assert cell["full"]["mean"] == pytest.approx(statistics.fmean(r["accuracy"] for r in rs))
            assert cell["full"]["se"] == pytest.approx(_se([r["accuracy"] for r in rs]))
            assert cell["heldout"]["se"] == pytest.approx(_se([r["accuracy_heldout"] for r in rs]))
        select = {lr: e["lr_grid"][f"{lr:g}"]["select"] for lr in cfg["lrs"]}
        assert select[e["best_lr"]] == max(select.values())
        assert e["heldout"] == e["lr_grid"][f"{e['best_lr']:g}"]["heldout"]
        if "vs_baseline" in e:
            base = summary["lora_r8"]["best_lr"]
            diffs = [r["accuracy_heldout"] - next(
                b["accuracy_heldout"] for b in runs
                if (b["arm"], b["lr"], b["seed"]) == ("lora_r8", base, r["seed"]))
                for r in runs if r["arm"] == arm and r["lr"] == e["best_lr"]]
            assert e["vs_baseline"]["mean"] == pytest.approx(statistics.fmean(diffs))


def test_arms_have_their_parameters_ranks_and_scales(quick) -> None:
    result, out = quick
    s = result["summary"]
    lora = s["lora_r8"]["adapter_trainable_params"]
    for arm, e in s.items():
        spec = e["spec"]
        d, rho = spec["num_masks"], spec["density"]
        live = e["adapter_live_params"] / e["adapter_trainable_params"]
        if spec["method"] == "sadapter":  # equal parameters to within a bottleneck's rounding;
            assert abs(e["adapter_trainable_params"] - lora) < 0.05 * lora
            # its biases are never masked, so slightly more of it is live
            assert 1 - (1 - rho) ** d < live < 1 - (1 - rho) ** d + 0.05
        else:
            assert e["adapter_trainable_params"] == (2 * lora if arm == "lora_r16" else lora)
            assert live == pytest.approx(1 - (1 - rho) ** d, abs=0.02)
        expected_s = 16.0 / spec["rank"] / (d * rho**2 if spec["scaling"] == "normalized" else 1)
        assert e["scale"] == pytest.approx(expected_s)
        if spec["method"] in ("padapter", "sadapter"):
            assert e["mean_rank"] is None  # a ReLU adapter has no ΔW
        else:
            assert e["mean_rank"] == e["rank_bound"] == spec["rank"] * d
    assert s["cb_d2_norm"]["scale"] == 2 * s["cb_d2"]["scale"]
    assert s["cb_d4_norm"]["same_as"] == "cb_d4"  # d·ρ² = 1: both scalings train alike
    twins = {(r["lr"], r["seed"]): r["accuracy"] for r in result["runs"] if r["arm"] == "cb_d4"}
    assert all(twins[(r["lr"], r["seed"])] == r["accuracy"]
               for r in result["runs"] if r["arm"] == "cb_d4_norm")
    md = (out / "quality.md").read_text(encoding="utf-8")
    assert all(f"| {e['title']}" in md for e in s.values())
    assert (out / "quality.png").read_bytes().startswith(b"\x89PNG")
    lines = (out / "runs.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len([r for r in result["runs"] if not r.get("same_as")])
