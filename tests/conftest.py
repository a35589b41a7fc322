"""Shared test settings: deterministic hypothesis runs, two threads (the CI machine's cores)."""

import torch
from hypothesis import settings

settings.register_profile("capaboost", derandomize=True, print_blob=True)
settings.load_profile("capaboost")
torch.set_num_threads(2)
