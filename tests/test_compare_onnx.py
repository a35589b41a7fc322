"""What `compare_onnx` calls the same graph (and what not), initializers the exporter folded
away named as such, latency differences inside the spread of the rounds called noise, the
conditions a time is measured under — and the README's deploy snippet run as written."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import capaboost_fx as cbx
from capaboost_fx.onnx import LatencyStats, compare_onnx, onnx_stats
from capaboost_fx.onnx.timing import compare_latency, conditions, describe_conditions

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


class MLP(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _export(module: nn.Module, path: Path) -> Path:
    # The dynamo exporter's graph: its optimizer folds the initializers these tests name (the
    # default, "auto", writes the TorchScript exporter's graph of an MLP, which folds none).
    cbx.export_onnx(module, path, (X,), optimize="ort")
    return path


def _mlp(**biases: float) -> MLP:
    torch.manual_seed(0)
    m = MLP()
    with torch.no_grad():
        for name, value in biases.items():
            getattr(m, name).bias.fill_(value)
    return m


# --------------------------------------------------------------------------- same graph


def test_an_all_zero_bias_the_exporter_dropped_is_named(tmp_path):
    trained = _export(_mlp(), tmp_path / "trained.onnx")
    fresh = _export(_mlp(c=0.0), tmp_path / "fresh.onnx")  # a fresh head: all-zero bias
    rep = compare_onnx(fresh, trained, latency=False)
    assert not rep.same_graph and rep.same_graph_up_to_folding
    assert rep.folded_in_base == ["c.bias"] and rep.folded_in_other == []
    assert rep.graph_summary("base", "folded") == (
        "same graph up to 1 initializer the exporter folded away: c.bias (in folded, folded "
        "away in base); otherwise same operators node by node and the same initializer shapes")
    assert "| same graph |  |  | up to 1 folded initializer(s) |" in rep.to_markdown()
    back = compare_onnx(trained, fresh, latency=False)  # the other way round
    assert back.same_graph_up_to_folding and back.folded_in_other == ["c.bias"]


def test_identical_initializers_merged_by_the_exporter_are_named(tmp_path):
    dup = _export(_mlp(a=0.5, b=0.5), tmp_path / "dup.onnx")  # two equal biases: one initializer
    distinct = _export(_mlp(a=0.5, b=0.25), tmp_path / "distinct.onnx")
    rep = compare_onnx(dup, distinct, latency=False)
    assert rep.base.initializer_count == rep.other.initializer_count - 1
    assert rep.same_graph_up_to_folding and rep.folded_in_base == ["b.bias"]


def test_genuinely_different_graphs_are_not_the_same(tmp_path):
    small = _export(_mlp(), tmp_path / "small.onnx")
    torch.manual_seed(0)
    wide = _export(MLP(hidden=32), tmp_path / "wide.onnx")  # same ops and node count
    rep = compare_onnx(small, wide, latency=False)
    assert rep.base.op_histogram == rep.other.op_histogram
    assert rep.base.node_count == rep.other.node_count
    assert not rep.same_graph and not rep.same_graph_up_to_folding
    assert not rep.folded_in_base and not rep.folded_in_other
    text = rep.graph_summary()
    assert text.startswith("same graph: NO (") and "float32[32,32]" in text
    assert "**no**" in rep.to_markdown()
    # zero bias AND another width: the folded bias does not excuse the shapes
    fresh_wide = MLP(hidden=32)
    with torch.no_grad():
        fresh_wide.c.bias.zero_()
    rep = compare_onnx(_export(fresh_wide, tmp_path / "fw.onnx"), small, latency=False)
    assert not rep.same_graph_up_to_folding and rep.graph_summary().startswith("same graph: NO")


def test_identical_files_are_the_same_graph_and_their_latency_is_called_by_its_spread(tmp_path):
    path = _export(_mlp(), tmp_path / "m.onnx")
    name = onnx_stats(path).inputs[0]["name"]
    rep = compare_onnx(path, path, runs=12, warmup=2, providers="cpu", intra_op_num_threads=1,
                       inputs={name: X})
    assert rep.same_graph and rep.graph_summary().startswith("same graph: yes (same operators")
    c = rep.latency_comparison
    assert c is not None and c.per_round and c.rounds == 12
    assert c.noise == (abs(c.difference) <= c.spread)
    line = rep.latency_summary()
    assert re.fullmatch(r"latency other vs base: [+-]\d+\.\d % \((within|beyond) the ±\d+\.\d % "
                        r"spread of 12 interleaved rounds: (noise|a real difference)\)", line)
    assert line in rep.to_markdown() and line in rep.summary()
    assert rep.to_dict()["latency_comparison"]["noise"] == c.noise


# --------------------------------------------------------------------------- latency calls


def _stats(ms: list[float]) -> LatencyStats:
    return LatencyStats.of([x / 1e3 for x in ms], ["CPUExecutionProvider"])


def test_a_difference_inside_the_spread_of_the_rounds_is_noise():
    base = _stats([10, 12, 9, 11, 10, 13, 10, 9, 11, 10])
    other = _stats([10.5, 11, 10, 10, 12, 12, 9, 10, 10.5, 11])  # same thing, measured again
    c = compare_latency(base, other)
    assert c.noise and abs(c.difference) <= c.spread
    assert c.describe().endswith("spread of 10 interleaved rounds: noise)")
    assert "within the ±" in c.describe()


def test_a_real_difference_beyond_the_spread_is_not_noise():
    base = _stats([10, 12, 9, 11, 10, 13, 10, 9, 11, 10])
    other = _stats([x * 1.4 for x in [10, 12, 9, 11, 10, 13, 10, 9, 11, 10]])  # 40 % slower
    c = compare_latency(base, other)
    assert not c.noise and c.difference == pytest.approx(0.4)
    assert c.describe().startswith("+40.0 % (beyond the ±0.0 % spread of 10 interleaved rounds")
    assert c.describe().endswith("a real difference)")
    # without per-round samples, each file's own p10-p90 spread decides
    lone = LatencyStats(median_ms=10, p10_ms=9, p90_ms=11, mean_ms=10, min_ms=9, runs=5,
                        providers=[])
    assert not compare_latency(lone, _stats([14] * 5)).noise
    assert compare_latency(lone, _stats([10.5] * 5)).noise
    one = compare_latency(_stats([10]), _stats([12]))  # one round: no spread to judge by
    assert one.describe() == "+20.0 % (one round: no spread measured, no call made)"


# --------------------------------------------------------------------------- conditions


def test_conditions_record_the_machine_threads_and_load_at_start_and_end():
    start = conditions()
    assert start["cpu_count"] == os.cpu_count() and start["cpu_model"]
    assert start["torch_threads"] == torch.get_num_threads()
    assert start["torch"] == torch.__version__ and "load_average_end" not in start
    end = conditions(start)
    assert end["cpu_model"] == start["cpu_model"]
    text = describe_conditions(end)
    assert f"{start['cores_available']} cores ({start['cpu_model']})" in text
    assert f"{torch.get_num_threads()} torch threads" in text and f"torch {torch.__version__}" in text
    if hasattr(os, "getloadavg"):
        assert len(end["load_average_end"]) == 3
        assert re.search(r"load average \d+\.\d at start / \d+\.\d at end \(1 min\)", text)


# --------------------------------------------------------------------------- the deploy snippet


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_readme_deploy_snippet_prints_same_graph(tmp_path, monkeypatch):
    """README's quickstart, then docs/deploy.md's first snippet, executed as written."""
    quickstart = _python_blocks(ROOT / "README.md")[0]
    deploy = _python_blocks(ROOT / "docs" / "deploy.md")[0]
    assert "compare_onnx(\"base.onnx\", \"model.onnx\")" in deploy
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(quickstart, "README.md quickstart", "exec"), scope)  # noqa: S102
        exec(compile(deploy, "docs/deploy.md snippet", "exec"), scope)  # noqa: S102
    printed = out.getvalue()
    assert "same graph: NO" not in printed and "**no**" not in printed
    assert re.search(r"^- same graph( up to 1 initializer the exporter folded away: "
                     r"wrapped\.classifier\.bias \(in other, folded away in base\)|: yes)",
                     printed, flags=re.M), printed
    assert re.search(r"^- latency other vs base: .* interleaved rounds: (noise|a real difference)\)$",
                     printed, flags=re.M), printed
    assert (tmp_path / "model.int8.onnx").is_file()


class _Positions(nn.Module):
    """Token and position embeddings: sequences beyond 16 positions index out of range."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(50, 8), nn.Embedding(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1]))


def test_timing_inputs_beyond_the_model_say_which_and_how_to_fix(tmp_path, capsys):
    """The default timing sequence (128) exceeds a 16-position model: a library error naming
    the inputs and seq_len= (and the CLI prints it without a traceback), not onnxruntime's."""
    from capaboost_fx.cli import main

    path = tmp_path / "pos.onnx"
    cbx.export_onnx(_Positions().eval(), path, (torch.randint(0, 50, (2, 8)),))
    with pytest.raises(cbx.InputError, match=r"timing inputs \{'ids': \[1, 128\]\}.*seq_len="):
        compare_onnx(path, path, runs=2)
    assert compare_onnx(path, path, runs=2, warmup=1, seq_len=12).same_graph
    assert main(["compare", str(path), str(path), "--runs", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the files cannot run the timing inputs") and "Traceback" not in err
