"""Shared test helpers (import with `from helpers import ...`). Tests run on the CPU with tiny configs; fixtures live in tests/data
(copied from shared/reference so that a clean clone is self-contained)."""
from __future__ import annotations

import json
from pathlib import Path


DATA = Path(__file__).parent / "data"
FIXTURES = DATA / "fixtures"
PREPROCESS_FIXTURES = DATA / "preprocess"
E2E_FIXTURES = DATA / "e2e"


def load_meta(path: Path) -> dict:
    return json.loads(Path(path).read_text())

