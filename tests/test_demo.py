"""The SST-2 demo end to end: shipped data, a short run of both arms (with and without the ONNX
stage), the report it writes, and its command lines."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from capaboost_fx import demo
from capaboost_fx.data import SPLITS, load_sst2, read_sst2_tsv, sst2_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- shipped data


def test_shipped_sst2_files_load_with_expected_counts_and_labels():
    train, dev = load_sst2("train"), load_sst2("dev")
    assert (len(train), len(dev)) == (4000, 2000)
    for split in (train, dev):
        assert set(split.labels) == {0, 1}
        assert len(split.sentences) == len(split.labels)
        assert all(s.strip() and "\t" not in s and "\n" not in s for s in split.sentences)
    assert train.labels.count(1) == 2321 and dev.labels.count(1) == 1044
    assert not set(train.sentences) & set(dev.sentences)  # dev is held out by exact string
    for split in SPLITS:  # header and format kept from the source files
        with open(sst2_path(split), encoding="utf-8") as f:
            assert f.readline() == "sentence\tlabel\n"
    readme = (sst2_path("dev").parent / "README.md").read_text(encoding="utf-8")
    assert "Socher" in readme and "GLUE" in readme


def test_load_sst2_limit_and_bad_input(tmp_path):
    assert len(load_sst2("dev", limit=5)) == 5
    assert load_sst2("dev", limit=10**6).labels == load_sst2("dev").labels
    with pytest.raises(ValueError, match="unknown SST-2 split"):
        load_sst2("test")
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\na fine film\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 has label '2'"):
        read_sst2_tsv(bad)
    bad.write_text("text\tlabel\nx\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        read_sst2_tsv(bad)


# --------------------------------------------------------------------------- command lines


def test_options_quick_preset_and_per_arm_learning_rates():
    from capaboost_fx.demo.config import parse

    cfg = parse(["--quick", "--steps", "5", "--out", "x"])
    assert cfg.quick and cfg.steps == 5 and cfg.out == "x"
    assert cfg.max_length == demo.QUICK["max_length"] and cfg.eval_size == demo.QUICK["eval_size"]
    best = demo.DemoConfig()
    assert (cfg.lora_lr, cfg.capaboost_lr) == (best.lora_lr, best.capaboost_lr)  # not the preset
    cfg = parse(["--lr", "0.01", "--capaboost-lr", "0.02", "--skip-onnx", "--no-progress"])
    assert (cfg.lora_lr, cfg.capaboost_lr) == (0.01, 0.02) and not cfg.onnx and not cfg.progress
    spec = demo.arm_spec(parse(["--num-masks", "4", "--scaling", "normalized"]), "capaboost")
    assert (spec.num_masks, spec.scaling) == (4, "normalized")
    assert demo.arm_spec(best, "lora").num_masks == 1
    with pytest.raises(SystemExit):
        demo.main(["--batch-size", "1"])
    with pytest.raises(ValueError):
        demo.run({"steps": 0})


@pytest.mark.parametrize("command,prog", [
    ([sys.executable, "-m", "capaboost_fx.demo"], "python -m capaboost_fx.demo"),
    ([str(Path(sys.executable).with_name("capaboost-fx")), "demo"], "capaboost-fx demo"),
])
def test_help_names_the_command_typed(command, prog):
    assert Path(command[0]).exists(), f"{command[0]} is not installed: run scripts/setup.sh"
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {prog}") and "--quick" in proc.stdout
    assert "minutes on 2 cores" not in proc.stdout  # a time without its conditions


def test_example_script_is_a_thin_wrapper(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["finetune_sst2.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "examples" / "finetune_sst2.py"), run_name="__main__")
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


# --------------------------------------------------------------------------- end to end


def _check_common(out: Path, report: dict) -> None:
    for name in ("report.md", "report.json", "loss.png", "spectrum.png"):
        assert (out / name).is_file(), name
    for name in ("loss.png", "spectrum.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(demo.REPORT_KEYS) <= set(saved)
    assert saved["runs"] == report["runs"]
    lo, cb = saved["runs"]["lora"], saved["runs"]["capaboost"]
    d, r = cb["spec"]["num_masks"], cb["spec"]["rank"]
    for run in (lo, cb):
        assert len(run["layers"]) == 12  # query and value of 6 layers
        assert 0.0 <= run["accuracy"] <= 1.0 and run["correct"] == round(run["accuracy"] *
                                                                         run["eval_examples"])
        assert len(run["losses"]) == saved["config"]["steps"]
    assert lo["lr"] == saved["config"]["lora_lr"] and cb["lr"] == saved["config"]["capaboost_lr"]
    assert lo["adapter_trainable_params"] == cb["adapter_trainable_params"] == 12 * r * (384 + 384)
    assert lo["adapter_live_params"] == lo["adapter_trainable_params"]
    density = cb["spec"]["density"]
    assert cb["live_fraction"] == pytest.approx(1 - (1 - density) ** d, abs=0.02)
    assert lo["head_trainable_params"] == cb["head_trainable_params"] == 384 * 2 + 2
    assert lo["max_rank"] == r and cb["min_rank"] == min(d * r, 384)  # the rank boost
    assert saved["fold"]["predictions_equal"] and saved["fold"]["ok"]
    cond = saved["environment"]["conditions"]  # what the times were measured under
    assert cond["cpu_count"] >= 1 and cond["cpu_model"] and cond["torch_threads"] >= 1
    if hasattr(os, "getloadavg"):
        assert len(cond["load_average_start"]) == len(cond["load_average_end"]) == 3
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f"measured on {cond['cores_available']} cores ({cond['cpu_model']})" in md
    assert "load average" in md or not hasattr(os, "getloadavg")
    assert f"| dev accuracy | {100 * lo['accuracy']:.1f}% ({lo['correct']}/" in md
    assert "| numerical rank of ΔW (min / mean / max over 12 layers) |" in md
    assert "![training loss](loss.png)" in md and "Socher" in md


def test_quick_run_without_onnx(tmp_path):
    out = tmp_path / "demo"
    report = demo.run(demo.DemoConfig(out=str(out), steps=2, batch_size=4, eval_size=8,
                                      max_length=16, onnx=False, progress=False, threads=1))
    _check_common(out, report)
    assert report["onnx"]["skipped"] and report["status"] == "ok"
    assert "Skipped: --skip-onnx was given." in (out / "report.md").read_text(encoding="utf-8")
    assert not (out / "onnx").exists()


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rc = demo.main(["--quick", "--out", str(out), "--steps", "3", "--batch-size", "8",
                    "--eval-size", "32", "--latency-runs", "3", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    _check_common(out, report)
    onnx = report["onnx"]
    assert report["status"] == "ok"
    assert onnx["serving"]["match"] and onnx["serving"]["n"] == 32
    assert onnx["base"]["nodes"] == onnx["folded"]["nodes"] and onnx["same_ops"]
    for key in ("base", "folded"):
        assert (out / "onnx" / f"{key}.onnx").is_file()
        assert onnx["latency"][key]["median_ms"] > 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f"| ONNX nodes | {onnx['base']['nodes']} | {onnx['folded']['nodes']} |" in md
    # the fresh classifier's all-zero bias is folded away in the base file: said as such
    assert onnx["same_graph_up_to_folding"], onnx["graph_summary"]
    assert onnx["graph_summary"] in md and onnx["graph_summary"].startswith("same graph")
    call = onnx["latency_comparison"]
    assert call["noise"] == (abs(call["difference"]) <= call["spread"]) and call["text"] in md
    assert "(PASS)" in md
    q = onnx["int8"]  # dynamic int8: its accuracy and speed are measured, not assumed
    assert (out / "onnx" / "folded_int8.onnx").is_file()
    assert 0 <= q["accuracy"] <= 1 and q["speedup"] > 0
    assert q["file_bytes"]["int8"] < q["file_bytes"]["fp32"]
    assert "dynamic int8" in md
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
