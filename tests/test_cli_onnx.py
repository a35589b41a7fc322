"""Command line `export` and `compare` (capaboost_fx.cli): output, JSON, exit codes 0/1/2."""

from __future__ import annotations

import json
import sys
import textwrap

import onnx
import pytest
import torch
from torch import nn

from capaboost_fx.cli import COMMANDS, _build_parser, main
from capaboost_fx.onnx import export_onnx


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    base, other = MLP(), MLP()  # same architecture, other weights
    export_onnx(base, folder / "base.onnx", (X,))
    export_onnx(other, folder / "folded.onnx", (X,))
    return folder / "base.onnx", folder / "folded.onnx"


def test_compare_prints_a_table_and_writes_json(two_files, tmp_path, capsys):
    base, folded = two_files
    out = tmp_path / "cmp.json"
    code = main(
        [
            "compare",
            str(base),
            str(folded),
            "--runs",
            "3",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--json",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert "| | base | folded | diff |" in stdout
    assert "| nodes |" in stdout and "| Gemm |" in stdout
    assert "latency median ms (batch 2" in stdout
    assert "| same graph |  |  | yes |" in stdout
    data = json.loads(out.read_text())
    assert data["same_graph"] is True and data["latency_base"]["runs"] == 3
    assert data["base"]["node_count"] == data["other"]["node_count"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["compare", "only_one.onnx"],
        ["compare", "a.onnx", "b.onnx", "--runs", "0"],
        ["compare", "a.onnx", "b.onnx", "--runs", "many"],
        ["export", "--out", "x.onnx"],  # --model missing
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "export" in out and "compare" in out


def test_missing_file_exits_1_with_error_and_no_traceback(two_files, tmp_path, capsys):
    missing = tmp_path / "missing.onnx"
    assert main(["compare", str(two_files[0]), str(missing), "--no-latency"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err
    assert "Traceback" not in err


def test_export_from_a_factory_file(tmp_path, capsys):
    factory = tmp_path / "factory.py"
    factory.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
            return model, (torch.randn(3, 8),)
    """)
    )
    out = tmp_path / "m.onnx"
    report = tmp_path / "m.json"
    assert (
        main(["export", "--model", f"{factory}:make", "--out", str(out), "--json", str(report)])
        == 0
    )
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "verified on CPUExecutionProvider" in stdout
    onnx.checker.check_model(str(out))
    data = json.loads(report.read_text())
    assert data["verified"] is True and len(data["verified_shapes"]) == 2
    assert data["op_histogram"]["Tanh"] == 1


def test_export_from_an_importable_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_factory_mod.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(4, 2), {'input': torch.randn(2, 4)}\n"
    )
    monkeypatch.chdir(tmp_path)  # `capaboost-fx export` imports from the working directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "cli_factory_mod", raising=False)
    out = tmp_path / "lin.onnx"
    assert main(["export", "--model", "cli_factory_mod:make", "--out", str(out)]) == 0
    assert [i.name for i in onnx.load(out).graph.input] == ["input"]  # dict -> keyword inputs
    sys.modules.pop("cli_factory_mod", None)


def test_export_from_a_hugging_face_directory(tmp_path, capsys):
    import transformers
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    out = tmp_path / "bert.onnx"
    code = main(["export", "--model", str(tmp_path / "hf"), "--out", str(out), "--seq-len", "6"])
    assert code == 0, capsys.readouterr().err
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:make", "cannot import no_such_module_xyz"),
        ("json:no_such_factory", "has no callable 'no_such_factory'"),
        ("just_a_name", "expected module:factory"),
    ],
)
def test_export_bad_model_exits_1(spec, message, tmp_path, capsys):
    assert main(["export", "--model", spec, "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_export_no_verify_and_unwritable_out(tmp_path, capsys):
    factory = tmp_path / "f.py"
    factory.write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(4, 2), (torch.randn(2, 4),)\n"
    )
    assert (
        main(
            [
                "export",
                "--model",
                f"{factory}:make",
                "--out",
                str(tmp_path / "a.onnx"),
                "--no-verify",
            ]
        )
        == 0
    )
    assert "verified" not in capsys.readouterr().out
    bad_out = tmp_path / "no_dir" / "a.onnx"
    assert main(["export", "--model", f"{factory}:make", "--out", str(bad_out)]) == 1
    assert "error: " in capsys.readouterr().err


def test_commands_are_a_registry():
    """Adding a command is one COMMANDS entry (the other engineer adds inspect/demo this way)."""
    assert set(COMMANDS) >= {"export", "compare"}
    parser = _build_parser()
    args = parser.parse_args(["compare", "a.onnx", "b.onnx"])
    assert args._run is COMMANDS["compare"].run and args.runs == 30


def test_export_options_optimize_and_quantize(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_q_mod.py").write_text(
        "import torch\ntorch.manual_seed(0)\n"
        "def make():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),"
        " torch.nn.Linear(32, 4))\n"
        "    return m, (torch.randn(8, 16),)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "cli_q_mod", raising=False)
    report = tmp_path / "q.json"
    args = ["export", "--model", "cli_q_mod:make", "--out", str(tmp_path / "q.onnx"),
            "--optimize", "none", "--quantize", "int8", "--json", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "quantize int8" in out and "argmax agreement with PyTorch" in out
    data = json.loads(report.read_text())
    assert data["quantize"] == "int8" and data["optimize"] == "none"
    assert data["op_histogram"].get("MatMulInteger", 0) == 2
    assert list(data["input_shapes"].values()) == [["batch", 16]]
    sys.modules.pop("cli_q_mod", None)
    bad = ["export", "--model", "cli_q_mod:make", "--out", "x.onnx", "--optimize", "fast"]
    assert main(bad) == 2
