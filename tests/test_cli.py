"""CLI: inspect and demo commands, exit codes."""

from __future__ import annotations

import json
import textwrap

import pytest

from capaboost_fx.cli import main


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "fac.py"
    path.write_text(textwrap.dedent("""
        import torch
        def mlp():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
            return m, (torch.randn(3, 8),)
    """))
    return f"{path}:mlp"


def test_inspect_prints_targets_and_writes_json(factory, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert main(["inspect", "--model", factory, "--targets", "0", "--rank", "2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 0 | linear | 8 | 16 | 2 | 2 | 48 |" in text and "not matched by targets" in text
    assert json.loads(out.read_text())["targets"][0]["name"] == "0"


def test_inspect_spec_file_and_errors(factory, tmp_path, capsys) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"targets": ["2"], "rank": 2, "num_masks": 3}))
    assert main(["inspect", "--model", factory, "--spec", str(spec)]) == 0
    assert "| 2 | linear | 16 | 4 | 2 | 3 |" in capsys.readouterr().out
    assert main(["inspect", "--model", factory, "--targets", "nope"]) == 1
    assert "matched no linear op" in capsys.readouterr().err
    spec.write_text(json.dumps({"targets": ["2"], "rnak": 2}))
    assert main(["inspect", "--model", factory, "--spec", str(spec)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'rnak'" in err
    assert main(["inspect"]) == 2
    assert main(["inspect", "--model", factory, "--rank", "0"]) == 2


def test_help_for_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    for command in ("inspect", "demo", "export", "compare"):
        assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--quick" in text  # the demo's own options


def test_demo_help_names_the_command(capsys) -> None:
    assert main(["demo", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: capaboost-fx demo")


def test_inspect_options_have_help_defaults_alpha_trainable(factory, capsys) -> None:
    assert main(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--rank", "8"), ("--num-masks", "2"), ("--density", "0.5"),
                            ("--alpha", "16.0"), ("--mask", "random"), ("--seed", "0"),
                            ("--trainable", "none"), ("--batch-size", "2")):
        assert option in text and f"(default: {default})" in text.split(option, 2)[-1][:600]
    assert main(["inspect", "--model", factory, "--targets", "0", "--rank", "2",
                 "--alpha", "4", "--trainable", "2"]) == 0
    assert "| 0 | linear | 8 | 16 | 2 | 2 |" in capsys.readouterr().out


def test_inspect_options_override_spec_file(factory, tmp_path, capsys) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"targets": ["2"], "rank": 2, "num_masks": 3}))
    assert main(["inspect", "--model", factory, "--spec", str(spec), "--num-masks", "4"]) == 0
    assert "| 2 | linear | 16 | 4 | 2 | 4 |" in capsys.readouterr().out
    assert main(["inspect", "--model", factory, "--rank", "2"]) == 1
    assert "no targets" in capsys.readouterr().err


def test_missing_model_directory_says_it_does_not_exist(tmp_path, capsys) -> None:
    missing = str(tmp_path / "no_such_model")
    assert main(["inspect", "--model", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'" + missing + "': no such directory" in err
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert main(["inspect", "--model", str(tmp_path / "weights.bin")]) == 1
    assert "is a file" in capsys.readouterr().err


def test_setup_script_skips_pip_when_nothing_changed(tmp_path) -> None:
    """scripts/setup.sh runs pip on a fresh checkout and after pyproject.toml changes only."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    shutil.copy(root / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    log = tmp_path / "pip.log"
    fake = tmp_path / "fake_python"  # logs pip calls; anything else runs the real Python
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> {log}; '
                    f'exit 0; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    maker = tmp_path / "make_venv"  # stands in for `python3 -m venv .venv`
    maker.write_text(f"#!/bin/sh\nmkdir -p .venv/bin && cp {fake} .venv/bin/python && "
                     "touch .venv/bin/capaboost-fx && chmod +x .venv/bin/capaboost-fx\n")
    maker.chmod(0o755)

    def setup() -> int:
        before = log.read_text().count("\n") if log.exists() else 0
        env = {**os.environ, "PYTHON": str(maker)}
        env.pop("FORCE_SETUP", None)
        subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, check=True)
        return log.read_text().count("\n") - before

    assert setup() == 3  # fresh: pip, torch, the package
    assert setup() == 0  # nothing changed
    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    assert setup() == 3
    assert setup() == 0


def test_pyproject_license_is_an_spdx_string() -> None:
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (3.10 is supported)
    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert data["project"]["license"] == "MIT"  # the table form prints a deprecation banner
