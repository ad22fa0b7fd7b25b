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

import contextlib
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


# ------------------------------------------------------------------------- backends and masks

def select_backend(backend: str, ckpt_dir: Path | None, *, segment: bool, batch_size: int = 8,
                   engine_dir: Path | None = None):
    """'official' (ONNX models of the checkpoint), 'embedded' (mediapipe) or 'auto' (official
    when ckpt_dir holds process_checkpoint/det and pose2d, else embedded)."""
    from . import official as O

    if backend not in ("auto", "official", "embedded"):
        raise ValidationError(f"backend must be 'auto', 'official' or 'embedded', got {backend!r}")
    if backend == "auto":
        have = ckpt_dir is not None and all(
            (Path(ckpt_dir) / rel).is_file() for rel in (O.DET_RELPATH, O.POSE_RELPATH))
        backend = "official" if have else "embedded"
    if backend == "official":
        if ckpt_dir is None:
            raise CheckpointError("--backend official needs --ckpt-dir (the Wan2.2-Animate-14B folder "
                                  "with process_checkpoint/); or use --backend embedded")
        return O.OfficialBackend(Path(ckpt_dir), batch_size=batch_size, engine_dir=engine_dir)
    from .embedded import EmbeddedBackend
    return EmbeddedBackend(segment=segment)


SAM2_RELPATH = Path("process_checkpoint/sam2/sam2_hiera_large.pt")


def load_sam2(ckpt_dir: Path | None):
    """The upstream SAM-2 video predictor when the `sam2` package and the checkpoint's
    process_checkpoint/sam2/sam2_hiera_large.pt are both there, else None."""
    import importlib.util

    if ckpt_dir is None or importlib.util.find_spec("sam2") is None:
        return None
    weights = Path(ckpt_dir) / SAM2_RELPATH
    if not weights.is_file():
        return None
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    errors = []
    for cfg in ("configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_l.yaml"):   # sam2 1.1 / 1.0 names
        try:
            return build_sam2_video_predictor(cfg, str(weights), device=device)
        except Exception as e:     # hydra raises its own types for a missing config
            errors.append(f"{cfg}: {e}")
    raise CheckpointError(f"cannot build SAM-2 from {weights}: {'; '.join(errors)}")


class _MaskStore:
    """Per-frame 0/1 masks kept on disk as PNGs (a few kB each), so pass 1 can hand masks to
    pass 2 without holding them in memory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, t: int, mask: np.ndarray) -> None:
        ok, buf = cv2.imencode(".png", mask)
        if not ok:
            raise MediaError("cannot encode a mask frame")
        (self.folder / f"{t:06d}.png").write_bytes(buf.tobytes())

    def get(self, t: int) -> np.ndarray | None:
        p = self.folder / f"{t:06d}.png"
        if not p.is_file():
            return None
        return cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)


class _SelfieMasks:
    """MediaPipe selfie segmentation restricted to the chosen person's box (official backend
    without SAM-2)."""

    def __init__(self) -> None:
        from mediapipe.python.solutions import selfie_segmentation
        self._seg = selfie_segmentation.SelfieSegmentation(model_selection=0)

    def __call__(self, frame: np.ndarray, bbox: np.ndarray | None) -> np.ndarray:
        h, w = frame.shape[:2]
        m = (self._seg.process(np.ascontiguousarray(frame)).segmentation_mask > 0.5).astype(np.uint8)
        if bbox is not None and bbox[-1] > 0:
            x1, y1, x2, y2 = bbox[:4]
            mx, my = 0.15 * (x2 - x1), 0.15 * (y2 - y1)
            keep = np.zeros_like(m)
            keep[max(int(y1 - my), 0):min(int(y2 + my), h), max(int(x1 - mx), 0):min(int(x2 + mx), w)] = 1
            m &= keep
        return m

    def close(self) -> None:
        self._seg.close()


# ------------------------------------------------------------------------------ the pipeline

def _batches(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _warn(msgs: list[str], msg: str) -> None:
    msgs.append(msg)
    warnings.warn(msg, PreprocessWarning, stacklevel=3)


def _check_args(mode, retarget, fps, resolution_area, max_duration_s, mask_kernel, mask_iterations,
                mask_grid, batch_size) -> None:
    if mode not in ("animate", "replace"):
        raise ValidationError(f"mode must be 'animate' or 'replace', got {mode!r}")
    if retarget and mode != "animate":
        raise ValidationError("retargeting applies to animate mode only (replace mode keeps the "
                              "driving person's proportions); drop --retarget or use --mode animate")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (fps == -1 or 0 < fps <= 120):
        raise ValidationError(f"fps must be in (0, 120] or -1 (keep the video's), got {fps!r}")
    try:
        aw, ah = (int(v) for v in resolution_area)
    except (TypeError, ValueError):
        raise ValidationError(f"resolution_area must be (width, height), got {resolution_area!r}") from None
    if aw < 16 or ah < 16 or aw * ah > 3840 * 2160:
        raise ValidationError(f"resolution_area {aw}x{ah} is outside 16x16 .. 3840x2160")
    if not (isinstance(max_duration_s, (int, float)) and math.isfinite(max_duration_s) and max_duration_s > 0):
        raise ValidationError(f"max_duration_s must be a positive number, got {max_duration_s!r}")
    if not (isinstance(mask_kernel, int) and mask_kernel >= 1 and isinstance(mask_iterations, int)
            and mask_iterations >= 0):
        raise ValidationError("mask kernel must be an int >= 1 and iterations an int >= 0")
    if len(mask_grid) != 2 or min(int(v) for v in mask_grid) < 1:
        raise ValidationError(f"mask_grid must be two ints >= 1 (w_len, h_len), got {mask_grid!r}")
    if not (isinstance(batch_size, int) and 1 <= batch_size <= 256):
        raise ValidationError(f"batch_size must be an int in [1, 256], got {batch_size!r}")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValidationError(f"{out_dir} exists and is not a folder; choose another -o")
        if any(out_dir.iterdir()) and not overwrite:
            raise ValidationError(f"{out_dir} is not empty; choose an empty or new folder, or pass "
                                  "overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def _commit(scratch: Path, out_dir: Path) -> None:
    """Move the finished scratch folder onto out_dir (replacing an old one) atomically enough:
    out_dir is never seen half-written."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(scratch, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def preprocess(image_path, video_path, out_dir, *, mode: str = "animate", retarget: bool = False,
               backend: str = "auto", ckpt_dir=None, fps: float = 30,
               resolution_area: tuple[int, int] = (1280, 720),
               max_duration_s: float = DEFAULT_MAX_DURATION_S, progress: bool = True,
               limits=None, mask_kernel: int = M.DEFAULT_K,
               mask_iterations: int = M.DEFAULT_ITERATIONS, mask_grid: tuple[int, int] = M.DEFAULT_GRID,
               batch_size: int = 8, overwrite: bool = False, engine_dir=None,
               timer: Callable[[str], contextlib.AbstractContextManager] | None = None) -> PreprocessResult:
    """Turn a driving video and a reference image into generation's input folder.

    Writes src_pose.mp4, src_face.mp4 (512x512), src_ref.png (a byte copy of the image, as the
    official code writes it) and, with mode='replace', src_bg.mp4 and src_mask.mp4, all at `fps`,
    plus preprocess.json (what was done). See the module docstring for the flow.
    `timer(stage)` (bench/preprocess.py) is entered around each stage's work: "load", "decode"
    (waiting for a frame), "pose", "face", "masks", "draw", "encode"."""
    from tqdm import tqdm

    from ..video import MediaLimits, iter_frames, load_image, probe_video, frame_indices

    t_start = time.perf_counter()
    timer = timer or _untimed
    _check_args(mode, retarget, fps, resolution_area, max_duration_s, mask_kernel, mask_iterations,
                mask_grid, batch_size)
    limits = limits or MediaLimits()
    image_path, video_path, out_dir = Path(image_path), Path(video_path), Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    _prepare_out_dir(out_dir, overwrite)
    area = int(resolution_area[0]) * int(resolution_area[1])
    msgs: list[str] = []

    ref = load_image(image_path, limits)
    info = probe_video(video_path, limits)
    out_fps = info.fps if fps == -1 else float(fps)
    indices = frame_indices(info.n_frames, info.fps, out_fps, info.duration_s, clamp=True)
    if not indices:
        raise MediaError(f"{video_path}: no frame left after resampling {info.n_frames} frames at "
                         f"{info.fps:.3f} fps to {out_fps} fps; use a longer video")
    cap = max(int(max_duration_s * out_fps), 1)
    if len(indices) > cap:
        _warn(msgs, f"the video gives {len(indices)} frames at {out_fps:g} fps; only the first "
                    f"{cap} ({max_duration_s:g} s, max_duration_s) are preprocessed")
        indices = indices[:cap]
    if mode == "replace":
        work_w, work_h = size_by_area(info.width, info.height, area)
    else:
        work_w, work_h = info.width, info.height

    def frames_stream() -> Iterator[np.ndarray]:
        with iter_frames(video_path, limits, indices=indices) as stream:
            for f in _timed(timer, "decode", stream):
                yield resize_by_area(f, area) if mode == "replace" else f

    with timer("load"):
        est = select_backend(backend, ckpt_dir, segment=(mode == "replace"), batch_size=batch_size,
                             engine_dir=engine_dir)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    selfie = None
    try:
        # ---- pass 1: poses (and masks where the backend segments)
        mask_source = None
        store = _MaskStore(scratch / ".masks") if mode == "replace" else None
        sam = None
        if mode == "replace":
            if est.name == "official":
                sam = load_sam2(ckpt_dir)
                if sam is not None:
                    mask_source = "sam2"
                else:
                    from .embedded import available
                    if available():
                        selfie, mask_source = _SelfieMasks(), "mediapipe-selfie-segmentation"
                    else:
                        mask_source = "pose-region"
            else:
                mask_source = "mediapipe-pose-segmentation"
        kps, person, people = [], [], []
        t1 = time.perf_counter()
        bar = tqdm(total=len(indices), desc="pose", unit="frame", disable=not progress, leave=False)
        for batch in _batches(frames_stream(), batch_size):
            with timer("pose"):
                found = est(batch)
            for f, fp in zip(batch, found):
                t = len(kps)
                kps.append(fp.keypoints)
                person.append(fp.person)
                people.append(fp.n_people)
                if store is not None:
                    with timer("masks"):
                        if fp.mask is not None:
                            store.put(t, fp.mask)
                        elif selfie is not None:
                            store.put(t, selfie(f, fp.bbox))
            bar.update(len(batch))
        bar.close()
        n = len(kps)
        pose_fps = n / max(time.perf_counter() - t1, 1e-9)
        if n == 0:
            raise MediaError(f"{video_path}: no frame could be decoded")
        person_rate = float(np.mean(person))
        if person_rate == 0:
            raise NoPersonError(f"no person was found in any of the {n} frames of {video_path}; "
                                "the driving video must show the performer")
        if person_rate < 0.9:
            _warn(msgs, f"a person was found in only {person_rate:.0%} of the frames; in the others "
                        "the last body pose is held (embedded backend) or the whole frame is searched")
        multi = int(sum(p > 1 for p in people))
        if multi:
            _warn(msgs, f"several people in {multi} of {n} frames; the "
                        + ("largest person (official rule) is followed" if est.name == "official"
                           else "most salient person (MediaPipe's choice, not always the largest) is followed")
                        + "; use a single-person video for reliable results")
        if n < SEGMENT_FRAMES:
            _warn(msgs, f"only {n} frames, shorter than one {SEGMENT_FRAMES}-frame generation segment; "
                        "generation will pad it by reflection (ping-pong)")

        with timer("face"):
            metas = normalise_sequence(kps, work_w, work_h)
            del kps
            fill = face_boxes(metas)
        if fill.from_head:
            _warn(msgs, "no face was found in any frame; face crops are placed from the head keypoints")
        elif fill.interpolated or fill.held:
            _warn(msgs, f"the face was lost in {fill.interpolated + fill.held} of {n} frames: "
                        f"{fill.interpolated} interpolated between neighbours, {fill.held} held "
                        "from the nearest frame with a face")

        # ---- reference and pose canvas
        retargeter = None
        if mode == "animate":
            ref_r = resize_by_area(ref, area)
            out_h, out_w = ref_r.shape[:2]
            with timer("pose"):
                ref_fp = est.image(ref_r)
            if not ref_fp.person:
                if retarget:
                    raise NoPersonError(f"no person was found in the reference image {image_path}; "
                                        "retargeting needs one (drop --retarget or use another image)")
                _warn(msgs, f"no person was found in the reference image {image_path}")
            if retarget:
                ref_meta = normalise_frame(ref_fp.keypoints, out_w, out_h)
                retargeter = Retargeter(metas[0].copy(), ref_meta)
        else:
            out_w, out_h = work_w, work_h
        render = PoseRenderer(out_w, out_h, retargeter)

        # ---- SAM-2 masks (official backend in replace mode): its own pass, chunk by chunk
        if sam is not None:
            with timer("masks"):
                for t, m in enumerate(sam_masks(sam, _ListLike(frames_stream, n), metas, scratch)):
                    store.put(t, m)

        # ---- pass 2: render and encode
        from ..video import VideoWriter

        files = {"pose": scratch / "src_pose.mp4", "face": scratch / "src_face.mp4"}
        if mode == "replace":
            files.update(bg=scratch / "src_bg.mp4", mask=scratch / "src_mask.mp4")
        with timer("encode"):
            writers = {"pose": VideoWriter(files["pose"], out_fps, out_w, out_h),
                       "face": VideoWriter(files["face"], out_fps, F.FACE_SIZE, F.FACE_SIZE)}
            if mode == "replace":
                writers["bg"] = VideoWriter(files["bg"], out_fps, work_w, work_h)
                writers["mask"] = VideoWriter(files["mask"], out_fps, work_w, work_h)
        try:
            bar = tqdm(total=n, desc="render", unit="frame", disable=not progress, leave=False)
            t = 0
            for frame in frames_stream():
                if t >= n:
                    break
                with timer("draw"):
                    pose = render(metas[t], t)
                with timer("face"):
                    face = F.crop_face(frame, tuple(int(v) for v in fill.boxes[t]))
                with timer("encode"):
                    writers["pose"].write(pose)
                    writers["face"].write(face)
                if mode == "replace":
                    with timer("masks"):
                        mask = store.get(t)
                        if mask is None:
                            mask = M.pose_region_mask(metas[t], work_h, work_w)
                        bg, mk = replace_frames(frame, mask, mask_kernel, mask_iterations, *mask_grid)
                    with timer("encode"):
                        writers["bg"].write(bg)
                        writers["mask"].write(mk)
                t += 1
                bar.update(1)
            bar.close()
            if t < n:
                raise MediaError(f"{video_path}: the second read gave {t} frames, the first {n}; "
                                 "the file changed or decodes inconsistently")
            with timer("encode"):
                for w in writers.values():
                    w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        shutil.copyfile(image_path, scratch / "src_ref.png")
        files["ref"] = scratch / "src_ref.png"
        if store is not None:
            shutil.rmtree(store.folder, ignore_errors=True)

        seconds = time.perf_counter() - t_start
        result = PreprocessResult(
            out_dir=out_dir, files={k: out_dir / p.name for k, p in files.items()}, mode=mode,
            n_frames=n, fps=out_fps, size=(out_w, out_h), backend=est.name,
            providers=list(est.providers), mask_source=mask_source, person_rate=person_rate,
            multi_person_frames=multi, face_found=int(fill.found.sum()),
            face_interpolated=fill.interpolated, face_held=fill.held, face_from_head=fill.from_head,
            retargeted=retargeter is not None, pose_fps=pose_fps, throughput_fps=n / seconds,
            seconds=seconds, warnings=msgs)
        from ..video import write_json_atomic
        write_json_atomic(scratch / "preprocess.json", {
            k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()
            if k not in ("files", "out_dir")} | {"files": {k: p.name for k, p in files.items()},
                                                 "image": str(image_path), "video": str(video_path),
                                                 "resolution_area": list(resolution_area)})
        _commit(scratch, out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        if selfie is not None:
            selfie.close()
        est.close()
    if progress:
        print(f"preprocess: {n} frames in {seconds:.1f} s = {result.throughput_fps:.2f} frames/s "
              f"(pose pass {pose_fps:.2f} frames/s, backend {est.name})")
    return result


def _untimed(stage: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _timed(timer, stage: str, items: Iterable) -> Iterator:
    """The items of `items`, with the wait for each one inside timer(stage)."""
    it = iter(items)
    while True:
        with timer(stage):
            try:
                x = next(it)
            except StopIteration:
                return
        yield x


class _ListLike:
    """Sequential chunk access for sam_masks over one decode of the video: chunk after chunk,
    each chunk's frames held only while SAM-2 runs on it."""

    def __init__(self, stream_fn: Callable[[], Iterator[np.ndarray]], n: int) -> None:
        self._it, self._n, self._pos = stream_fn(), n, 0

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, sl: slice) -> list[np.ndarray]:
        if sl.start != self._pos:
            raise ValueError("chunks must be read in order")
        out = [f for _, f in zip(range(sl.stop - sl.start), self._it)]
        self._pos += len(out)
        return out
