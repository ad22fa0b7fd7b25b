import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The fixtures were made with 2 CPU threads; keep reductions comparable and runs repeatable.
    torch.set_num_threads(2)
    yield
