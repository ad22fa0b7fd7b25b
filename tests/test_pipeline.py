"""The generation pipeline: official e2e parity, segment logic, guidance, seeds, streaming."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import DATA, load_meta
from wanimate.engine.errors import ValidationError
from wanimate.engine.pipeline import (ArraySource, GenerateOptions, Pipeline, TextContext, pingpong,
                                      plan_segments)
from wanimate.engine.verify import run_fixture

E2E = DATA / "e2e"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["animate_r1_g1", "replace_r1_g1"])
def test_e2e_fixtures(case):
    checks = run_fixture(E2E / f"{case}.json")
    bad = [c for c in checks if not c.passed]
    assert not bad, bad
    video = next(c for c in checks if c.output == "output.video")
    assert video.rel_l2 <= 1e-5
    names = {c.output for c in checks}
    for k in range(3):   # every segment's conditioning, noise, steps and carried frames were compared
        assert {f"seg{k}.noise", f"seg{k}.y", f"seg{k}.pred_cond", f"seg{k}.latents_after_step"} <= names
    assert {"seg1.refert_frames", "seg2.decoded_dropped"} <= names


@pytest.mark.parametrize("case", ["animate_r1_g1", "replace_r1_g1"])
def test_segment_plan_matches_official(case):
    meta = load_meta(E2E / f"{case}.json")
    d, call = meta["derived"], meta["call"]
    plan = plan_segments(d["real_frame_len"], call["clip_len"], call["refert_num"])
    assert plan.target_len == d["target_len"]
    assert pingpong(d["real_frame_len"], d["target_len"]) == d["padded_source_indices"]
    assert len(plan.segments) == d["n_segments"]
    for seg, ref in zip(plan.segments, d["segments"]):
        assert seg.start == ref["start"] and seg.source_indices == ref["source_frame_indices"]
        assert seg.mask_reft_len == ref["mask_reft_len"]


@pytest.mark.parametrize("n,clip_len,refert", [(1, 77, 1), (2, 77, 5), (77, 77, 1), (78, 77, 1), (153, 77, 1),
                                               (300, 77, 5), (9, 13, 5), (50, 9, 1)])
def test_segment_plan_properties(n, clip_len, refert):
    plan = plan_segments(n, clip_len, refert)
    stride = clip_len - refert
    assert plan.target_len >= max(n, clip_len)
    assert (plan.target_len - refert) % stride == 0 or plan.target_len == clip_len
    for i, seg in enumerate(plan.segments):
        assert len(seg.source_indices) == clip_len and seg.start == i * stride
        assert all(0 <= j < n for j in seg.source_indices)
        assert seg.mask_reft_len == (0 if i == 0 else refert)
    # the kept frames cover every input frame exactly once
    covered = clip_len + (len(plan.segments) - 1) * stride
    assert covered >= n


@pytest.mark.parametrize("bad,match", [
    (dict(clip_len=76), "4n\\+1"), (dict(clip_len=1), "4n\\+1"), (dict(refert_num=3), "1 or 5"),
    (dict(steps=0), "steps"), (dict(steps=-3), "steps"), (dict(mode="swap"), "mode"),
    (dict(guide_scale=float("nan")), "guide_scale"), (dict(guide_scale=0.5), "guide_scale"),
    (dict(solver="euler"), "solver"), (dict(seed=-2), "seed"),
    (dict(steps=(900.0, 950.0)), "decreasing"),
])
def test_invalid_options(bad, match):
    with pytest.raises(ValidationError, match=match):
        GenerateOptions(**bad).validate()


def test_options_are_checked_under_python_O(tmp_path):
    import subprocess, sys
    code = ("from wanimate.engine.pipeline import GenerateOptions\n"
            "try:\n    GenerateOptions(refert_num=3).validate()\nexcept Exception as e:\n    print(type(e).__name__)")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ValidationError"


# ---- behaviour on the embedded tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from wanimate.engine.components import embedded_pipeline
    return embedded_pipeline()


def _inputs(n=11, h=32, w=48, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), ArraySource(rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)),
            ArraySource(rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)))


def test_streaming_sink_equals_returned_frames_and_seed_is_reported(tiny):
    ref, pose, face = _inputs()
    opts = GenerateOptions(steps=2, clip_len=9, seed=-1)
    chunks = []
    a = tiny.generate(ref, pose, face, opts, sink=chunks.append)
    assert 0 <= a.seed < 2**63 and a.frames is None
    streamed = torch.cat(chunks, dim=1)
    assert streamed.shape == (3, 11, 32, 48) and streamed.abs().max() <= 1
    b = tiny.generate(ref, pose, face, GenerateOptions(steps=2, clip_len=9, seed=a.seed))
    assert torch.equal(b.frames, streamed)              # same seed -> bitwise the same video
    c = tiny.generate(ref, pose, face, GenerateOptions(steps=2, clip_len=9, seed=a.seed + 1))
    assert not torch.equal(c.frames, streamed)


def test_guidance_batched_equals_two_passes(tiny):
    ref, pose, face = _inputs(n=6)
    base = dict(steps=2, clip_len=5, seed=7, guide_scale=3.0)
    batched = tiny.generate(ref, pose, face, GenerateOptions(**base, batch_cfg=True))
    separate = tiny.generate(ref, pose, face, GenerateOptions(**base, batch_cfg=False))
    plain = tiny.generate(ref, pose, face, GenerateOptions(**(base | dict(guide_scale=1.0))))
    torch.testing.assert_close(batched.frames, separate.frames, rtol=1e-4, atol=1e-4)
    assert (batched.frames - plain.frames).abs().max() > 1e-3      # the guidance pass is live


def test_guidance_uses_black_face_and_negative_prompt(tiny):
    """With guide_scale > 1 the uncond pass must see a black face and the negative prompt."""
    ref, pose, face = _inputs(n=5)
    seen = {}
    real = tiny.dit.denoise

    def spy(latents, t, cond):
        seen.setdefault("motion", cond.motion.clone())
        return real(latents, t, cond)
    tiny.dit.denoise = spy
    try:
        tiny.generate(ref, pose, face, GenerateOptions(steps=1, clip_len=5, seed=1, guide_scale=2.0))
    finally:
        del tiny.dit.denoise
    black = tiny.dit.encode_motion(torch.full((1, 3, 5, 64, 64), -1.0))
    torch.testing.assert_close(seen["motion"][1:], black)


def test_short_clip_with_refert_5(tiny):
    """clip_len 9 with refert_num 5 works for two segments, as officially; a third segment would
    need more carried frames than the trimmed output has (the official code crashes there)."""
    ref, _, _ = _inputs()
    rng = np.random.default_rng(4)
    frames = lambda n, s: ArraySource(rng.integers(0, 255, (n, *s, 3), dtype=np.uint8))
    out = tiny.generate(ref, frames(10, (32, 48)), frames(10, (64, 64)), GenerateOptions(steps=1, clip_len=9,
                                                                                          refert_num=5, seed=0))
    assert out.segments == 2 and out.frames.shape[1] == 10
    with pytest.raises(ValidationError, match="too short to carry 5 frames"):
        tiny.generate(ref, frames(20, (32, 48)), frames(20, (64, 64)), GenerateOptions(steps=1, clip_len=9,
                                                                                         refert_num=5))


def test_pose_face_length_mismatch_rejected_before_work(tiny):
    ref, pose, _ = _inputs(n=11)
    face = ArraySource(np.zeros((10, 64, 64, 3), np.uint8))
    with pytest.raises(ValidationError, match="11 frames but face video has 10"):
        tiny.generate(ref, pose, face, GenerateOptions(steps=1, clip_len=9))


def test_size_not_multiple_of_16_rejected(tiny):
    ref, _, face = _inputs(n=11)
    pose = ArraySource(np.zeros((11, 40, 48, 3), np.uint8))
    with pytest.raises(ValidationError, match="multiples of 16"):
        tiny.generate(ref, pose, face, GenerateOptions(steps=1, clip_len=9))


def test_replace_requires_background_and_mask(tiny):
    ref, pose, face = _inputs(n=5)
    with pytest.raises(ValidationError, match="replace mode needs"):
        tiny.generate(ref, pose, face, GenerateOptions(mode="replace", steps=1, clip_len=5))


def test_single_frame_video_holds_the_frame(tiny):
    """The official code crashes on a 1-frame driving video; the engine generates one segment."""
    ref, _, _ = _inputs()
    rng = np.random.default_rng(3)
    pose = ArraySource(rng.integers(0, 255, (1, 32, 48, 3), dtype=np.uint8))
    face = ArraySource(rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8))
    out = tiny.generate(ref, pose, face, GenerateOptions(steps=1, clip_len=5, seed=0))
    assert out.frames.shape == (3, 1, 32, 48) and out.segments == 1
