"""Shared test helpers. Tests run on the CPU with tiny configs; fixtures live in tests/data
(copied from shared/reference so that a clean clone is self-contained)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
FIXTURES = DATA / "fixtures"
PREPROCESS_FIXTURES = DATA / "preprocess"
E2E_FIXTURES = DATA / "e2e"


def load_meta(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare against fixtures made with 2 threads; keep CPU reductions comparable.
    torch.set_num_threads(2)
    yield
