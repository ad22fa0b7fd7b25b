"""Face boxes and their gap filling, masks, resizing, SAM-2 prompting, retargeting edge cases."""
from __future__ import annotations

import numpy as np
import pytest

from wanimate.engine.errors import ValidationError
from wanimate.engine.preprocess import face as F
from wanimate.engine.preprocess import masks as M
from wanimate.engine.preprocess.keypoints import PoseMeta, normalise_frame, normalise_sequence
from wanimate.engine.preprocess.pipeline import sam_masks, sam_prompts
from wanimate.engine.preprocess.resize import letterbox, size_by_area


def _box(x):
    return (x, x + 40, 10, 60)


def test_fill_interpolates_inside_gaps_and_holds_at_ends():
    boxes = [None, _box(0), None, None, _box(30), None]
    fill = F.fill_face_boxes(boxes)
    assert fill.found.tolist() == [False, True, False, False, True, False]
    assert fill.interpolated == 2 and fill.held == 2
    assert fill.boxes[0].tolist() == list(_box(0))              # held from the first found
    assert fill.boxes[2].tolist() == list(_box(10))             # 1/3 of the way
    assert fill.boxes[3].tolist() == list(_box(20))
    assert fill.boxes[5].tolist() == list(_box(30))             # held from the last found


def test_fill_without_any_face():
    with pytest.raises(F.FaceNotFoundError):
        F.fill_face_boxes([None, None])
    fill = F.fill_face_boxes([None, None], [None, _box(5)])
    assert fill.from_head and fill.boxes[0].tolist() == list(_box(5))


def test_face_box_rejects_degenerate_faces():
    face = np.zeros((69, 3), np.float32)
    assert F.face_box(face[:, :2], 640, 480) is None            # zero width and height
    face[1:, 0] = np.linspace(0.4, 0.5, 68)
    face[1:, 1] = 0.5
    assert F.face_box(face[:, :2], 640, 480) is None            # zero height
    face[1:, 1] = np.linspace(0.3, 0.45, 68)
    x1, x2, y1, y2 = F.face_box(face[:, :2], 640, 480)
    assert x1 < 0.4 * 640 and x2 > 0.5 * 640 and y1 < 0.3 * 480 and y2 > 0.45 * 480
    # three quarters of the vertical growth goes up
    assert (0.3 * 480 - y1) > 2.5 * (y2 - 0.45 * 480)


def test_coarsen_default_grid_is_the_bounding_box_minus_last_row_and_column():
    m = np.zeros((50, 60), np.uint8)
    m[10, 12] = m[30, 40] = 1
    out = M.coarsen(m.copy(), 1, 1)
    assert out[10:30, 12:40].all() and out.sum() == 20 * 28 + 1   # (30, 40) keeps its own value


def test_refine_mask_empty_and_no_dilation():
    empty = np.zeros((20, 20), np.uint8)
    assert not M.refine_mask(empty.copy()).any()
    m = np.zeros((20, 20), np.uint8)
    m[5, 5] = 1
    assert np.array_equal(M.refine_mask(m.copy(), iterations=0), m)


def _standing_person(w=640, h=480) -> PoseMeta:
    kp = np.zeros((133, 3), np.float32)
    body = {0: (320, 100), 1: (310, 90), 2: (330, 90), 3: (300, 95), 4: (340, 95), 5: (280, 150),
            6: (360, 150), 7: (270, 220), 8: (370, 220), 9: (265, 280), 10: (375, 280), 11: (295, 290),
            12: (345, 290), 13: (295, 370), 14: (345, 370), 15: (295, 450), 16: (345, 450)}
    for i, (x, y) in body.items():
        kp[i] = (x, y, 0.9)
    return normalise_frame(kp, w, h)


def test_pose_region_mask_covers_the_person_not_the_background():
    meta = _standing_person()
    mask = M.pose_region_mask(meta, 480, 640)
    px = meta.body[:, :2] * (640, 480)
    for r in (0, 1, 2, 5, 8, 11):          # nose, neck, shoulders, hips
        x, y = px[r]
        assert mask[int(y), int(x)] == 1
    assert mask[220, 320] == 1              # torso centre
    assert mask[:, :200].sum() == 0 and mask[:, 450:].sum() == 0 and mask[:40].sum() == 0
    assert 0.02 < mask.mean() < 0.3


def test_sam_prompting_matches_the_official_chunking():
    metas = [_standing_person() for _ in range(9)]
    p = sam_prompts(metas)
    assert [(c, f) for c, f, _, _ in p] == [(0, 0), (0, 2), (0, 4), (0, 6), (0, 8)]
    assert p[0][2].dtype == np.int32 and p[0][2].shape == (8, 2)
    assert M.sam_chunks(5) == [(0, 5)] and M.sam_chunks(800) == [(0, 400), (400, 800)]
    assert M.sam_key_frames(4) == [0] and M.sam_key_frames(6) == [0, 1, 2, 3, 4, 5]

    class Predictor:       # the upstream API: init_state(video_path=...) and add_new_points_or_box
        def __init__(self):
            self.prompts = []
        def init_state(self, video_path):
            import os
            return {"n": len(os.listdir(video_path))}
        def reset_state(self, state):
            pass
        def add_new_points_or_box(self, inference_state, frame_idx, obj_id, points, labels):
            self.prompts.append(frame_idx)
        def propagate_in_video(self, state):
            for i in range(state["n"]):
                yield i, [1], [np.full((1, 48, 64), 1.0 if i % 2 else -1.0, np.float32)]

    frames = [np.zeros((48, 64, 3), np.uint8)] * 9
    pred = Predictor()
    masks = list(sam_masks(pred, frames, metas))
    assert pred.prompts == [0, 2, 4, 6, 8]
    assert [int(m.max()) for m in masks] == [0, 1, 0, 1, 0, 1, 0, 1, 0]


def test_size_by_area():
    assert size_by_area(1920, 1080, 1280 * 720) == (1280, 720)
    assert size_by_area(720, 405, 640 * 360) == (640, 352)
    assert size_by_area(333, 517, 832 * 480) == (496, 784)
    with pytest.raises(ValidationError):
        size_by_area(10000, 10, 64 * 64)


def test_letterbox_keeps_aspect():
    img = np.full((100, 300, 3), 200, np.uint8)
    out = letterbox(img, 300, 300)
    assert out.shape == (300, 300, 3)
    assert out[:100].max() == 0 and out[200:].max() == 0 and out[150, 150, 0] == 200


def test_normalise_reuses_the_previous_body_when_all_off_image():
    a = np.random.default_rng(0).uniform(10, 100, (2, 133, 3)).astype(np.float32)
    a[1, :23, 0] = -5
    metas = normalise_sequence(a, 200, 200)
    assert metas[1].body is metas[0].body
    assert not np.array_equal(metas[1].lhand, metas[0].lhand)
