import os

# Must precede the first torch import: with the default (active) wait policy, torch's OpenMP
# threads spin and, on a shared 2-core machine, one op can take 100x longer (measured: 30 VAE
# decode steps 35 s with spinning threads vs 0.6 s without).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The fixtures were made with 2 CPU threads; keep reductions comparable and runs repeatable.
    torch.set_num_threads(2)
    yield
