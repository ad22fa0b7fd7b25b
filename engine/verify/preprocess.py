"""Runner for the preprocessing parity fixtures (reference/preprocess/README.md).

A fixture is `<case>.json` (group, function, the official call sequence, scalar args, array
shapes/dtypes/sha256, tolerance) + `<case>.npz` (in_* inputs, mid_* official intermediates,
out_* official outputs). Dispatch is on meta["group"] and meta["function"]; nothing depends on
the case name, so fixtures of other seeds and sizes run the same way. Every out_* array must
be produced and compared; mid_* arrays are compared where the engine computes the same value.

Tolerances come from the JSON: "exact" unless a bound applies. Bounds are written like
"exact on the same OpenCV build, else <= 1e-4" or "exact with numpy<2 ...; |dx| <= 1e-3 px
otherwise": the exact form is required when this environment matches the fixture's (same
OpenCV major.minor / NumPy major), the stated bound otherwise.
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
from pathlib import Path

import cv2
import numpy as np

from ..errors import FixtureError
from ..preprocess import draw as D
from ..preprocess import face as F
from ..preprocess import keypoints as K
from ..preprocess import masks as M
from ..preprocess import official as O
from ..preprocess import resize as R
from ..preprocess import retarget as RT
from . import Check, compare


# ------------------------------------------------------------------------------- tolerances

def _env_matches(meta: dict, what: str) -> bool:
    env = meta.get("env", {})
    if what == "opencv":
        want = str(env.get("opencv", ""))
        return want.split(".")[:2] == cv2.__version__.split(".")[:2]
    if what == "numpy":
        want = str(env.get("numpy", ""))
        return want.split(".")[:1] == np.__version__.split(".")[:1]
    return False


def tolerance_for(meta: dict, name: str) -> tuple[float | None, str]:
    """(abs_tol or None for exact, why) for array `name` from the fixture's tolerance dict."""
    tol = meta.get("tolerance", {}) or {}
    text = None
    for key, value in tol.items():
        if key != "default" and (key == name or fnmatch.fnmatch(name, key)):
            text = str(value)
            break
    if text is None:
        text = str(tol.get("default", "exact"))
    bounds = re.findall(r"(?:<=|/)\s*([0-9.]+(?:e-?[0-9]+)?)\s*(px|normalised)?", text)
    if not bounds:
        return None, "exact"
    conditional = "otherwise" in text or "else" in text
    if conditional and "exact" in text:
        needs = "opencv" if "opencv" in text.lower() else "numpy"
        if needs == "numpy" and "opencv 4" in text.lower():
            same = _env_matches(meta, "numpy") and _env_matches(meta, "opencv")
        else:
            same = _env_matches(meta, needs)
        if same:
            return None, "exact (same environment)"
    value, unit = bounds[0]
    normalised = [b for b in bounds if b[1] == "normalised"]
    if normalised and "meta" in name:
        value, unit = normalised[0]
    return float(value), f"<= {value}{' ' + unit if unit else ''} ({text[:60]})"


# ------------------------------------------------------------------------------- helpers

def _load(path: Path, meta: dict) -> dict[str, np.ndarray]:
    npz = np.load(path.with_suffix(".npz"), allow_pickle=False)
    arrays = {k: npz[k] for k in npz.files}
    for name, spec in meta.get("arrays", {}).items():
        if name not in arrays:
            raise FixtureError(f"{path.stem}: array {name} listed in the JSON is missing from the npz")
        if name.startswith("in_") and "sha256" in spec:
            digest = hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest()
            if digest != spec["sha256"]:
                raise FixtureError(f"{path.stem}: {name} does not match its sha256 (corrupt fixture)")
    return arrays


def _meta_arrays(metas: list[K.PoseMeta], prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}keypoints_body": np.stack([m.body for m in metas]),
        f"{prefix}keypoints_left_hand": np.stack([m.lhand for m in metas]),
        f"{prefix}keypoints_right_hand": np.stack([m.rhand for m in metas]),
        f"{prefix}keypoints_face": np.stack([m.face for m in metas]),
        f"{prefix}wh": np.array([[m.width, m.height] for m in metas], dtype=np.int64),
    }


def _pixel_arrays(poses: list[K.PixelPose], prefix: str, face: bool = True) -> dict[str, np.ndarray]:
    out = {
        f"{prefix}kps_body": np.stack([p.body for p in poses]),
        f"{prefix}kps_body_p": np.stack([p.body_p for p in poses]),
        f"{prefix}kps_lhand": np.stack([p.lhand for p in poses]),
        f"{prefix}kps_lhand_p": np.stack([p.lhand_p for p in poses]),
        f"{prefix}kps_rhand": np.stack([p.rhand for p in poses]),
        f"{prefix}kps_rhand_p": np.stack([p.rhand_p for p in poses]),
        f"{prefix}wh": np.array([[p.width, p.height] for p in poses], dtype=np.int64),
    }
    if face:
        out[f"{prefix}kps_face"] = np.stack([p.face for p in poses])
        out[f"{prefix}kps_face_p"] = np.stack([p.face_p for p in poses])
    return out


# ------------------------------------------------------------------------------- groups

def _draw(a: dict, args: dict, meta: dict) -> dict:
    W, H = int(args["W"]), int(args["H"])
    metas = K.normalise_sequence(a["in_kp2ds"], W, H)
    poses = [m.to_pixels() for m in metas]
    thr = float(args.get("threshold", 0.5))
    canvases = np.stack([D.draw_pose(np.zeros((H, W, 3), np.uint8), p, thr,
                                     draw_hands=args.get("draw_hand", True),
                                     draw_head=args.get("draw_head", True)) for p in poses])
    out = {"out_canvas": canvases, **_meta_arrays(metas, "mid_meta_"), **_pixel_arrays(poses, "mid_aapose_")}
    if "ref_H" in args:
        out["out_letterboxed"] = R.letterbox(canvases[0], int(args["ref_H"]), int(args["ref_W"]))
    return out


def _keypoints(a: dict, args: dict, meta: dict) -> dict:
    fn = meta["function"]
    if fn.endswith("split_kp2ds_for_aa"):
        W, H = int(args["W"]), int(args["H"])
        kps = a["in_kp2ds"].copy()
        kps[:, 0] /= W
        kps[:, 1] /= H
        body, lhand, rhand, face = K.split_wholebody(kps)
        return {"mid_kp_norm": kps, "out_body": body, "out_lhand": lhand, "out_rhand": rhand,
                "out_face": face}
    W, H = int(args["width"]), int(args["height"])
    metas = K.normalise_sequence(a["in_kp2ds"], W, H)
    return {**_meta_arrays(metas, "out_meta_"), **_pixel_arrays([m.to_pixels() for m in metas], "out_aapose_")}


def _face(a: dict, args: dict, meta: dict) -> dict:
    H, W = (int(v) for v in args["image_shape"])
    m = K.normalise_frame(a["in_kp2ds"], W, H)
    box = F.face_box(m.face[:, :2], W, H, float(args.get("scale", F.FACE_SCALE)))
    if box is None:
        raise FixtureError("the engine finds no usable face box where the official code made one")
    size = tuple(int(v) for v in args.get("dsize", (F.FACE_SIZE, F.FACE_SIZE)))
    return {"mid_keypoints_face": m.face, "out_box": np.array(box, dtype=np.int64),
            "out_face": cv2.resize(a["in_frame"][box[2]:box[3], box[0]:box[1]], size)}


def _resize(a: dict, args: dict, meta: dict) -> dict:
    if meta["function"].endswith("resize_by_area"):
        return {"out_image": R.resize_by_area(a["in_image"], int(args["target_area"]),
                                              int(args.get("divisor", 16)))}
    interp = cv2.INTER_AREA if "AREA" in str(args.get("interpolation", "")) else cv2.INTER_LINEAR
    return {"out_image": R.letterbox(a["in_image"], int(args["height"]), int(args["width"]),
                                     tuple(args.get("padding_color", (0, 0, 0))), interp)}


def _frames(a: dict, args: dict, meta: dict) -> dict:
    from ..video import frame_indices

    out, offsets, targets = [], [0], []
    for i in range(len(a["in_frame_num"])):
        idx = frame_indices(int(a["in_frame_num"][i]), float(a["in_video_fps"][i]),
                            float(a["in_fps"][i]), duration_s=float(a["in_last_ts"][i][1]))
        out.extend(idx)
        offsets.append(len(out))
        targets.append(len(idx))
    return {"out_indices": np.array(out, dtype=np.int64), "out_offsets": np.array(offsets, dtype=np.int64),
            "mid_target_num": np.array(targets, dtype=np.int64)}


def _retarget(a: dict, args: dict, meta: dict) -> dict:
    dW, dH, rW, rH = (int(args[k]) for k in ("drv_W", "drv_H", "ref_W", "ref_H"))
    drv = K.normalise_sequence(a["in_drv_kp2ds"], dW, dH)
    ref = K.normalise_sequence(a["in_ref_kp2ds"], rW, rH)[0]
    edits = {}
    if "in_tpl_edit_kp2ds" in a and "in_ref_edit_kp2ds" in a:
        edits = dict(src_edit=K.normalise_sequence(a["in_tpl_edit_kp2ds"], dW, dH)[0],
                     ref_edit=K.normalise_sequence(a["in_ref_edit_kp2ds"], rW, rH)[0])
    src0 = K.normalise_sequence(a["in_drv_kp2ds"][:1], dW, dH)[0]
    rt = RT.Retargeter(src0, ref, **edits)
    poses = [rt(m, t).pixels for t, m in enumerate(drv)]
    return {**_meta_arrays(drv, "mid_tpl_meta_"), **_meta_arrays([ref], "mid_ref_meta_"),
            **_pixel_arrays(poses, "out_", face=False),
            "out_canvas": np.stack([D.draw_pose(np.zeros((rH, rW, 3), np.uint8), p) for p in poses])}


def _mask(a: dict, args: dict, meta: dict) -> dict:
    k, it = int(args["k"]), int(args["iterations"])
    out = {}
    if it > 0:
        out["mid_dilated"] = cv2.dilate(a["in_mask"], np.ones((k, k), np.uint8), iterations=it)
    aug = M.refine_mask(a["in_mask"].copy(), k, it, int(args["w_len"]), int(args["h_len"]))
    out.update(out_aug_mask=aug, out_bg=M.background(a["in_frame"], aug), out_mask3=M.mask_frame(aug))
    return out


def _pose(a: dict, args: dict, meta: dict) -> dict:
    fn = meta["function"]
    if fn.endswith("Yolo.preprocess"):
        x = O.detector_input(a["in_frame_rgb"])
        u8 = a.get("out_input_u8")
        # The fixture stores the tensor as uint8 u with tensor = float32(u / 255): compare tensors.
        return {"out_input_u8": (x, (u8 / 255.0).astype(np.float32) if u8 is not None else None),
                "out_shape": np.array(a["in_frame_rgb"].shape[:2], dtype=np.int64)}
    if "Yolo.forward" in fn:
        H, W = (int(v) for v in args["shape_raw_HW"])
        dets = O.detections(a["in_raw"][0], H, W)
        bbox, _ = O.choose_person(dets, H, W)
        return {"mid_post": dets, "out_bbox": bbox}
    if fn.endswith("ViTPose.preprocess"):
        res = [O.pose_input(a["in_frame_rgb"], b) for b in a["in_bbox"]]
        return {"out_input": np.stack([r[0] for r in res]), "out_center": np.stack([r[1] for r in res]),
                "out_scale": np.stack([r[2] for r in res])}
    if "keypoints_from_heatmaps" in fn:
        return {"out_kp": O.decode_heatmaps(a["in_heatmaps"], a["in_center"], a["in_scale"])}
    if fn.endswith("Pose2d.__call__"):
        frames = list(a["in_frames_rgb"])
        seen = {}
        def run_det(x):
            seen["det"] = x
            return a["in_det_raw"]
        def run_pose(x):
            seen["vit"] = x
            return a["in_heatmaps"]
        fp = O.estimate_poses(frames, run_det, run_pose)
        H, W = frames[0].shape[:2]
        metas = K.normalise_sequence([p.keypoints for p in fp], W, H)
        det_u8 = a.get("mid_det_input_u8")
        return {**_meta_arrays(metas, "out_meta_"), "mid_vit_input": seen["vit"],
                "mid_det_input_u8": (seen["det"], (det_u8 / 255.0).astype(np.float32)
                                     if det_u8 is not None else None)}
    raise FixtureError(f"unknown pose function {fn}")


def _pipeline(a: dict, args: dict, meta: dict) -> dict:
    from ..preprocess.pipeline import run_pipeline_arrays

    return run_pipeline_arrays(a, args)


GROUPS = {"draw": _draw, "keypoints": _keypoints, "face": _face, "resize": _resize,
          "frames": _frames, "retarget": _retarget, "mask": _mask, "pose": _pose,
          "pipeline": _pipeline}


def run(path: Path, meta: dict, **options) -> list[Check]:
    path = Path(path)
    name = path.stem
    group = meta.get("group")
    if group not in GROUPS:
        raise FixtureError(f"{name}: unknown preprocess group {group!r} (function {meta.get('function')})")
    arrays = _load(path, meta)
    got = GROUPS[group](arrays, meta.get("args", {}), meta)
    checks = []
    wanted = [k for k in arrays if k.startswith("out_")]
    for k in wanted:
        if k not in got:
            checks.append(Check(name, k, float("nan"), float("nan"), "-", False,
                                "output not produced by the engine"))
    for k, value in got.items():
        if k not in arrays:
            continue
        ref = arrays[k]
        if isinstance(value, tuple):            # (engine tensor, reference rebuilt as a tensor)
            value, ref = value
        tol, why = tolerance_for(meta, k)
        value = np.asarray(value)
        ref = np.asarray(ref)
        if tol is None and value.dtype != ref.dtype:
            checks.append(Check(name, k, float("nan"), float("nan"), "exact", False,
                                f"dtype {value.dtype} != reference {ref.dtype}"))
            continue
        note = "" if tol is None else why
        if value.dtype.kind == "f" or ref.dtype.kind == "f":
            # NaN marks "no point" (a None in the official object arrays): equal where both are NaN.
            both = np.isnan(value.astype(np.float64)) & np.isnan(ref.astype(np.float64)) \
                if value.shape == ref.shape else None
            if both is not None and both.any():
                value = np.where(both, 0, value)
                ref = np.where(both, 0, ref)
        checks.append(compare(name, k, value, ref, abs_tol=tol, note=note))
    return checks
