"""The HF Trainer example trains a transformed module for a few steps."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_hf_trainer_example_runs(tmp_path) -> None:
    import hf_trainer

    out = hf_trainer.main(["--tiny", "--steps", "4", "--out", str(tmp_path)])
    assert out["sum_abs_B"] > 0  # the Trainer's optimizer reached the adapters
    assert out["fold_max_abs_diff"] < 1e-5
    assert 0.3 < out["training_loss"] < 1.5
