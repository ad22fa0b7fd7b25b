"""Every official preprocessing fixture through the runner (engine/verify/preprocess.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from wanimate.engine.verify import detect_kind, find_fixtures, run_fixture
from wanimate.engine.verify.preprocess import tolerance_for

from pathlib import Path
PREPROCESS_FIXTURES = Path(__file__).parent / "data" / "preprocess"

CASES = find_fixtures(PREPROCESS_FIXTURES)


def test_fixtures_present():
    index = json.loads((PREPROCESS_FIXTURES / "index.json").read_text())
    assert {c["case"] for c in index["cases"]} == {p.stem for p in CASES}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_fixture(path):
    meta = json.loads(path.read_text())
    assert detect_kind(meta) == "preprocess"
    checks = run_fixture(path)
    failed = [f"{c.output}: {c.note} (max abs {c.max_abs})" for c in checks if not c.passed]
    assert not failed, failed
    produced = {c.output for c in checks}
    outs = {k for k in np.load(path.with_suffix(".npz")).files if k.startswith("out_")}
    assert outs <= produced


def test_runner_ignores_case_names(tmp_path):
    # Dispatch is on group/function only: a case copied under another name runs the same.
    for stem in ("draw_small", "retarget_half", "pipeline_replace"):
        for ext in (".json", ".npz"):
            shutil.copy(PREPROCESS_FIXTURES / f"{stem}{ext}", tmp_path / f"renamed_{stem}{ext}")
        checks = run_fixture(tmp_path / f"renamed_{stem}.json")
        assert checks and all(c.passed for c in checks)


def test_runner_detects_a_wrong_output(tmp_path):
    src = PREPROCESS_FIXTURES / "draw_small"
    data = dict(np.load(src.with_suffix(".npz")))
    data["out_canvas"] = data["out_canvas"].copy()
    data["out_canvas"][0, 10, 10] ^= 1                      # one channel of one pixel
    np.savez(tmp_path / "draw_small.npz", **data)
    shutil.copy(src.with_suffix(".json"), tmp_path / "draw_small.json")
    checks = run_fixture(tmp_path / "draw_small.json")
    bad = [c for c in checks if not c.passed]
    assert [c.output for c in bad] == ["out_canvas"] and bad[0].max_abs == 1


def test_runner_rejects_a_corrupt_input(tmp_path):
    src = PREPROCESS_FIXTURES / "face_crop_portrait"
    data = dict(np.load(src.with_suffix(".npz")))
    data["in_frame"] = data["in_frame"].copy()
    data["in_frame"][0, 0, 0] ^= 1
    np.savez(tmp_path / "x.npz", **data)
    shutil.copy(src.with_suffix(".json"), tmp_path / "x.json")
    checks = run_fixture(tmp_path / "x.json")
    assert len(checks) == 1 and not checks[0].passed and "sha256" in checks[0].note


def test_tolerance_parsing():
    meta = {"env": {"opencv": "4.10.0", "numpy": "1.26.4"},
            "tolerance": {"out_input": "float32; exact on the same OpenCV build, else <= 1e-4",
                          "out_meta_*": "exact with numpy<2 (official), <= 1e-3 px / 1e-5 normalised otherwise",
                          "default": "exact (bitwise) for every out_* and mid_* array"}}
    assert tolerance_for(meta, "out_canvas")[0] is None
    assert tolerance_for(meta, "out_meta_keypoints_body")[0] in (None, 1e-5)
    tol, _ = tolerance_for(meta, "out_input")
    import cv2
    assert tol == (None if cv2.__version__.startswith("4.10") else 1e-4)
