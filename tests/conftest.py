"""Shared test settings: deterministic hypothesis runs; the CI machine's two cores shared by
the pytest-xdist workers (`scripts/test.sh` runs two), one torch thread each."""

import os

import torch
from hypothesis import settings

settings.register_profile("capaboost", derandomize=True, print_blob=True)
settings.load_profile("capaboost")
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 2) // _workers) if _workers > 1 else 2)
