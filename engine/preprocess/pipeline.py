"""The preprocessing pipeline: a driving video and a reference image in, the folder that
generation consumes out (src_pose.mp4, src_face.mp4, src_ref.png; src_bg.mp4 and src_mask.mp4
in replace mode), interchangeable with what the official `preprocess_data.py` writes.

Flow (reference/preprocess/README.md §11 for the official one):
- the video is resampled to `fps` by nearest index (official rule, engine/video.frame_indices);
- pass 1 streams the frames (resized by area in replace mode) through the pose backend in
  batches and keeps only keypoints (and, for the embedded backend, person masks as PNGs in a
  scratch folder): memory does not grow with the video;
- between the passes: keypoints become PoseMetas, face boxes are computed and gaps filled
  (face.py), retargeting is set up from frame 0 and the reference (retarget.py);
- pass 2 streams the frames again and writes the outputs frame by frame through VideoWriter.
Everything is written into a scratch folder beside `out_dir` and renamed onto it at the end, so
`out_dir` is either absent/untouched or complete.

`render_*` and `run_pipeline_arrays` are the same steps on in-memory arrays; the fixture runner
uses them with the official model outputs stored in the fixtures.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from ..errors import CheckpointError, MediaError, ValidationError
from . import face as F
from . import masks as M
from .draw import draw_pose
from .keypoints import BodyTracker, PoseMeta, normalise_frame, normalise_sequence
from .official import FramePose
from .resize import letterbox, resize_by_area, size_by_area
from .retarget import Retargeter

SEGMENT_FRAMES = 77                 # one generation segment (NOTES §6)
DEFAULT_MAX_DURATION_S = 600.0


class PreprocessWarning(UserWarning):
    """Something in the inputs that preprocessing handled but the user should know."""


class NoPersonError(MediaError):
    """No person was found in the driving video (or in the reference image when it is needed)."""


@dataclass
class PreprocessResult:
    out_dir: Path
    files: dict[str, Path]              # "pose", "face", "ref", and "bg", "mask" in replace mode
    mode: str
    n_frames: int
    fps: float
    size: tuple[int, int]               # (width, height) of src_pose (and src_bg/src_mask)
    backend: str                        # "official" or "embedded"
    providers: list[str]                # ONNX Runtime providers (official) or ["mediapipe-cpu"]
    mask_source: str | None             # replace mode: "sam2", "mediapipe-segmentation", "pose-region"
    person_rate: float                  # fraction of frames in which a person was detected
    multi_person_frames: int            # frames with more than one person
    face_found: int                     # frames whose own face points gave the crop box
    face_interpolated: int              # frames whose box was interpolated between found ones
    face_held: int                      # frames whose box was held from the nearest found one
    face_from_head: bool                # no face anywhere: boxes from the head keypoints
    retargeted: bool
    pose_fps: float                     # pass-1 frames/s (decode + detection + pose)
    throughput_fps: float               # frames/s of the whole run (both passes, encoding)
    seconds: float
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ per-frame rendering steps

def face_boxes(metas: Sequence[PoseMeta]) -> F.FaceFill:
    boxes = [F.face_box(m.face[:, :2], m.width, m.height) for m in metas]
    heads = [F.head_box_from_body(m.body, m.width, m.height) for m in metas]
    return F.fill_face_boxes(boxes, heads)


class PoseRenderer:
    """src_pose frames. Animate: drawn on the driving-frame canvas and letterboxed to the
    reference size, or (retargeting) drawn on the reference canvas. Replace: frame canvas."""

    def __init__(self, out_w: int, out_h: int, retargeter: Retargeter | None = None) -> None:
        self.out_w, self.out_h = out_w, out_h
        self.retargeter = retargeter

    def __call__(self, meta: PoseMeta, index: int) -> np.ndarray:
        if self.retargeter is not None:
            pose = self.retargeter(meta, index).pixels
            return draw_pose(np.zeros((self.out_h, self.out_w, 3), np.uint8), pose)
        canvas = draw_pose(np.zeros((meta.height, meta.width, 3), np.uint8), meta.to_pixels())
        if (meta.width, meta.height) == (self.out_w, self.out_h):
            # letterbox to the same size is an INTER_LINEAR identity; skip the copy
            return canvas
        return letterbox(canvas, self.out_h, self.out_w)


def replace_frames(frame: np.ndarray, mask: np.ndarray, k: int, iterations: int, w_len: int,
                   h_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(src_bg frame, src_mask frame) from a resized frame and its 0/1 person mask."""
    aug = M.refine_mask(mask.copy(), k, iterations, w_len, h_len)
    return M.background(frame, aug), M.mask_frame(aug)


def sam_prompts(metas: Sequence[PoseMeta]) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(chunk, frame in chunk, points [8, 2] int32, labels [8] int32) for every SAM-2 prompt."""
    out = []
    for c, (s, e) in enumerate(M.sam_chunks(len(metas))):
        chunk = metas[s:e]
        for f in M.sam_key_frames(len(chunk)):
            pts = M.sam_prompt_points(chunk[f], chunk[0].width, chunk[0].height)
            out.append((c, f, pts, np.ones(len(pts), np.int32)))
    return out


def sam_masks(predictor, frames: Sequence[np.ndarray], metas: Sequence[PoseMeta],
              scratch: Path | None = None) -> Iterator[np.ndarray]:
    """Per-frame 0/1 masks from a SAM-2 video predictor, chunked and prompted as officially.

    `predictor` is an upstream `sam2` SAM2VideoPredictor (frames are handed over as JPEGs in
    `scratch`) or the official pipeline's custom one (`init_state_v2(frames=...)`)."""
    prompts = sam_prompts(metas)
    for c, (s, e) in enumerate(M.sam_chunks(len(metas))):
        chunk = list(frames[s:e])
        if hasattr(predictor, "init_state_v2"):
            state = predictor.init_state_v2(frames=chunk)
        else:
            folder = Path(tempfile.mkdtemp(dir=scratch, prefix="sam2-"))
            for i, fr in enumerate(chunk):
                cv2.imwrite(str(folder / f"{i:05d}.jpg"), fr[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            state = predictor.init_state(video_path=str(folder))
        predictor.reset_state(state)
        add = getattr(predictor, "add_new_points_or_box", None) or predictor.add_new_points
        for cc, f, pts, labels in prompts:
            if cc == c:
                add(inference_state=state, frame_idx=f, obj_id=1, points=pts, labels=labels)
        got = {}
        for idx, _ids, logits in predictor.propagate_in_video(state):
            got[idx] = (np.asarray(logits[0].cpu() if hasattr(logits[0], "cpu") else logits[0]) > 0.0)
        for i in range(len(chunk)):
            m = got.get(i)
            yield np.zeros(chunk[i].shape[:2], np.uint8) if m is None else m.reshape(chunk[i].shape[:2]).astype(np.uint8)


def run_pipeline_arrays(a: dict, args: dict) -> dict:
    """The official ProcessPipeline on in-memory arrays with stored model outputs (fixtures):
    in_video_frames, in_last_ts, in_ref_image, in_vitpose_calls (ViTPose outputs in call order),
    in_sam_masks (replace). Returns out_src_* (and mid_*) arrays."""
    from ..video import frame_indices

    fps = float(args["fps"])
    video_fps = float(args["video_fps"])
    n_src = int(args.get("n_src_frames", len(a["in_video_frames"])))
    area = int(args["resolution_area"][0]) * int(args["resolution_area"][1])
    idx = frame_indices(n_src, video_fps, fps, duration_s=float(a["in_last_ts"][-1]))
    frames = [a["in_video_frames"][i] for i in idx]
    calls = list(a["in_vitpose_calls"])
    ref = a["in_ref_image"]
    out: dict = {"mid_frame_indices": np.array(idx, dtype=np.int64)}
    k, it = int(args.get("k", 7)), int(args.get("iterations", 3))
    wl, hl = int(args.get("w_len", 1)), int(args.get("h_len", 1))
    if args.get("replace_flag"):
        frames = [resize_by_area(f, area) for f in frames]
        H, W = frames[0].shape[:2]
        metas = normalise_sequence(calls[:len(frames)], W, H)
        fill = face_boxes(metas)
        canvas_h, canvas_w = letterbox(ref, H, W).shape[:2]
        render = PoseRenderer(canvas_w, canvas_h)
        pose = [render(m, t) for t, m in enumerate(metas)]

        class StandIn:      # SAM-2 stand-in: serves the stored masks, records the prompts
            def __init__(self):
                self.calls = []
            def init_state_v2(self, frames):
                return {"n": len(frames)}
            def reset_state(self, state):
                pass
            def add_new_points(self, inference_state, frame_idx, obj_id, points, labels):
                self.calls.append((frame_idx, points, labels))
            def propagate_in_video(self, state):
                for i in range(state["n"]):
                    yield i, [1], [a["in_sam_masks"][self.offset + i][None].astype(np.float32) * 2 - 1]
                self.offset += state["n"]
        sam = StandIn()
        sam.offset = 0
        masks = list(sam_masks(sam, frames, metas))
        prompts = sam_prompts(metas)
        bg, mk = zip(*(replace_frames(f, m, k, it, wl, hl) for f, m in zip(frames, masks)))
        out.update(out_src_pose=np.stack(pose), out_src_bg=np.stack(bg), out_src_mask=np.stack(mk),
                   mid_sam_prompt_frames=np.array([[c, f] for c, f, _, _ in prompts], dtype=np.int64),
                   mid_sam_prompt_points=np.stack([p for _, _, p, _ in prompts]),
                   mid_sam_prompt_labels=np.stack([l for _, _, _, l in prompts]))
    else:
        ref_r = resize_by_area(ref, area)
        rh, rw = ref_r.shape[:2]
        H, W = frames[0].shape[:2]
        ref_meta = normalise_frame(calls[0], rw, rh)
        meta0 = normalise_frame(calls[1], W, H)
        metas = normalise_sequence(calls[2:2 + len(frames)], W, H)
        fill = face_boxes(metas)
        rt = Retargeter(meta0, ref_meta) if args.get("retarget_flag") else None
        render = PoseRenderer(rw, rh, rt)
        out["out_src_pose"] = np.stack([render(m, t) for t, m in enumerate(metas)])
    out["out_src_face"] = np.stack([F.crop_face(f, tuple(b)) for f, b in zip(frames, fill.boxes)])
    return out
