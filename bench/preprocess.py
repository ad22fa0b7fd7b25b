"""Preprocessing throughput (frames/s), per stage, for both pose backends and both modes.

    python -m wanimate.bench.preprocess --out $OUT/preprocess.json     # defaults: the examples
    python -m wanimate.bench.preprocess --smoke                        # a few frames, CPU, quick
    python -m wanimate.bench.preprocess standins DIR                   # build the ONNX stand-ins (needs onnx)
    python -m wanimate.bench.preprocess pack-mediapipe SRC OUT.tar.xz  # trimmed mediapipe for a machine without it

Rows (backend x mode, on examples/drive.mp4 + examples/astronaut.jpg at the default 1280x720 area):
- `embedded`: MediaPipe Holistic (+ face detector, + pose segmentation in replace mode).
- `official-tiny`: the official backend's own pre/post-processing (detector resize, ViTPose crop,
  DARK heatmap decoding, selfie masks in replace mode) around networks that cost nothing: what
  the official backend costs besides its two networks.
- `official-vith`: the same around FLOP-matched stand-ins of the real networks (no real weights
  exist here): a plain conv stack with YOLOv10m's ~32 GMAC at 640x640, and a ViT-H/16 at
  256x192 (32 blocks, width 1280, MLP 5120, the classic 2-deconv heatmap head; ~630 M params,
  ~123 GMAC) with the official output [B, 133, 64, 48]. Random weights (timing depends only on
  shapes); the outputs are a fixed plausible skeleton plus a tiny network-dependent term, so
  the downstream steps see a person as with real models. ONNX Runtime picks its providers with
  the engine's `pick_providers` (CUDA EP when the installed build has it, else CPU with all cores).

Each staged row runs the real `preprocess()` (engine/preprocess/pipeline.py) with a stage timer
(its `timer` argument): load (building the backend), decode (waiting for the decoder child + the
replace-mode resize), pose (detector + pose network, or MediaPipe's graph; the reference image
included), face (face boxes and 512x512 crops), masks (segmentation, mask refinement,
backgrounds), draw (pose rendering), encode (H.264 through the engine's VideoWriter).
frames/s = frames / seconds without the load. An `e2e` row (by default for the embedded backend
only) runs the same call without the timer: the plain user-facing number.

The GPU: none of these paths uses it unless ONNX Runtime has the CUDA EP. MediaPipe's Python
solutions run their *_cpu.binarypb graphs (TFLite + XNNPACK on the CPU) on Linux; the JSON
records `gpu_used` per row from the providers that actually ran. Each row catches its own errors.
Prints a table, writes JSON (after every row) to --out or $OUT/preprocess.json.

On a machine without mediapipe or onnx (the lent GPU machine: Python 3.12, no internet), carry a
git-ignored folder .mp312/ holding `pack-mediapipe` of the cp312 manylinux wheel
(mediapipe-0.10.21-cp312-trim.tar.xz, ~20 MB: bindings stripped, the 8 .tflite files used),
standins.tar.xz (`standins` output: graphs only, the ~2.5 GB of ViT-H weights are generated
there) and a protobuf wheel used only if mediapipe fails to import with the machine's own:

    M=/tmp/mp312; mkdir -p $M/site $M/st $M/pb; python -c "import tarfile; [tarfile.open(a).extractall(b, filter='data') for a, b in (('.mp312/mediapipe-0.10.21-cp312-trim.tar.xz', '$M/site'), ('.mp312/standins.tar.xz', '$M/st'))]"
    export PYTHONPATH=$M/site:$PYTHONPATH
    python -m wanimate.bench.preprocess --standins $M/st --vith-frames 16 --budget-s 100
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("decode", "pose", "face", "masks", "draw", "encode")
BACKENDS = ("embedded", "official-tiny", "official-vith")
MODES = ("animate", "replace")

# The .tflite files the embedded backend loads (Holistic with model_complexity=1, the full-range
# face detector, selfie segmentation for the official backend's masks), found with strace on a
# run of EmbeddedBackend + _SelfieMasks. The graphs (.binarypb) are small and all kept.
MEDIAPIPE_MODELS = (
    "face_detection/face_detection_full_range_sparse.tflite",
    "face_detection/face_detection_short_range.tflite",
    "face_landmark/face_landmark.tflite",
    "hand_landmark/hand_landmark_full.tflite",
    "holistic_landmark/hand_recrop.tflite",
    "pose_detection/pose_detection.tflite",
    "pose_landmark/pose_landmark_full.tflite",
    "selfie_segmentation/selfie_segmentation.tflite",
)


# ----------------------------------------------------------------------------- stage timing

class Stages:
    """Seconds spent per stage: the `timer` of engine/preprocess.preprocess(), which enters
    `with st(stage):` around each stage's work (and around each wait for a decoded frame)."""

    def __init__(self) -> None:
        self.seconds = {s: 0.0 for s in ("load",) + STAGES}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t


def make_clip(video: Path, n: int, dest: Path) -> Path:
    """The first n frames of `video` as an H.264 file of the same size and rate (`video` itself
    when it has no more). Rows run on whole clips: a decoder asked for a prefix of a video
    stops mid-stream, which hung the decoder child now and then here (see the report)."""
    from wanimate.engine.video import VideoWriter, iter_frames, probe_video

    info = probe_video(video)
    if n >= info.n_frames:
        return Path(video)
    with iter_frames(video) as stream, VideoWriter(dest, info.fps, info.width, info.height) as w:
        for _, frame in zip(range(n), stream):
            w.write(frame)
    return Path(dest)


def _template_heatmaps() -> np.ndarray:
    """[1, 133, 64, 48] Gaussian peaks on a standing person's keypoints (heatmap cells)."""
    p = np.zeros((133, 2), np.float64)
    p[:23] = [(24, 10), (22, 9), (26, 9), (20, 10), (28, 10), (18, 16), (30, 16), (16, 24),
              (32, 24), (15, 31), (33, 31), (20, 34), (28, 34), (20, 45), (28, 45), (20, 55),
              (28, 55), (19, 58), (18, 58), (21, 57), (29, 58), (30, 58), (27, 57)]
    a = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    p[23:91] = np.stack([np.round(24 + 3 * np.cos(a)), np.round(10 + 4 * np.sin(a))], 1)
    for start, (wx, wy) in ((91, (15, 31)), (112, (33, 31))):
        k = np.arange(21)
        p[start:start + 21] = np.stack([wx + k % 3 - 1, wy + 1 + k // 7], 1)
    yy, xx = np.mgrid[0:64, 0:48]
    hm = 0.9 * np.exp(-((xx[None] - p[:, 0, None, None]) ** 2 + (yy[None] - p[:, 1, None, None]) ** 2) / 4.5)
    return hm[None].astype(np.float32)


PERSON_ROW = [200.0, 100.0, 440.0, 600.0, 0.9, 0.0]     # x1, y1, x2, y2, score, class (640 units)


class _Graph:
    """A small ONNX graph builder whose weights live in one external file, described by a
    manifest (name, shape, init scale) so the file can be generated where onnx is missing."""

    def __init__(self) -> None:
        from onnx import helper
        self.h = helper
        self.nodes, self.inits, self.weights = [], [], []
        self.offset = 0
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, arr: np.ndarray) -> str:
        from onnx import numpy_helper
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def weight(self, shape, scale: float, const: bool = False) -> str:
        """A float32 initialiser stored in weights.bin: uniform in [-scale, scale], or all equal
        to `scale` with const=True (LayerNorm gains and biases)."""
        from onnx import TensorProto
        n = self.name("w")
        t = TensorProto()
        t.name, t.data_type = n, TensorProto.FLOAT
        t.dims.extend(int(d) for d in shape)
        size = int(np.prod(shape)) * 4
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", self.offset), ("length", size)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self.inits.append(t)
        self.weights.append({"name": n, "shape": list(shape), "offset": self.offset, "scale": scale,
                             "const": const})
        self.offset += size
        return n

    def op(self, op: str, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(self.h.make_node(op, list(inputs), [out], **attrs))
        return out

    def save(self, folder: Path, fname: str, inp, inp_shape, out, out_shape, out_name: str) -> Path:
        from onnx import TensorProto
        self.nodes.append(self.h.make_node("Identity", [out], [out_name]))
        graph = self.h.make_graph(
            self.nodes, fname, [self.h.make_tensor_value_info(inp, TensorProto.FLOAT, inp_shape)],
            [self.h.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)], self.inits)
        model = self.h.make_model(graph, opset_imports=[self.h.make_opsetid("", 17)])
        model.ir_version = 8          # onnxruntime >= 1.14 reads it
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / fname
        path.write_bytes(model.SerializeToString())
        (folder / "weights.json").write_text(json.dumps({"bytes": self.offset, "tensors": self.weights}))
        return path


def _detector(folder: Path, stages) -> Path:
    """[1, 3, 640, 640] -> [1, 300, 6]: a conv stack (3x3 convs + SiLU; `stages` = (width,
    repeats) per stride-2 level) whose mean nudges fixed rows holding one person."""
    g = _Graph()
    x, c_in = "images", 3
    for width, repeats in stages:
        for r in range(repeats + 1):
            w = g.weight([width, c_in if r == 0 else width, 3, 3], (1.0 / (9 * (c_in if r == 0 else width))) ** 0.5)
            b = g.weight([width], 0.01)
            x = g.op("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                     strides=[2, 2] if r == 0 else [1, 1])
            x = g.op("Mul", [x, g.op("Sigmoid", [x])])
        c_in = width
    m = g.op("Tanh", [g.op("ReduceMean", [x], keepdims=0)])              # a scalar
    rows = np.zeros((1, 300, 6), np.float32)
    rows[0, 0] = PERSON_ROW
    nudge = np.zeros((1, 1, 6), np.float32)
    nudge[..., 4] = 1e-3                     # the score only: the class must stay exactly 0
    out = g.op("Add", [g.const(rows), g.op("Mul", [m, g.const(nudge)])])
    return g.save(folder, "yolov10m.onnx", "images", [1, 3, 640, 640], out, [1, 300, 6], "output0")


def _vitpose(folder: Path, dim: int, depth: int, heads: int, mlp: int, head_ch: int) -> Path:
    """[B, 3, 256, 192] -> [B, 133, 64, 48]: ViT (patch 16, pre-norm blocks, 16x12 tokens) +
    two stride-2 deconvs + 1x1 conv; its tanh, scaled down, is added to a template skeleton."""
    g = _Graph()
    tokens, hd = 16 * 12, dim // heads
    x = g.op("Conv", ["input", g.weight([dim, 3, 16, 16], (1 / 768) ** 0.5), g.weight([dim], 0.01)],
             kernel_shape=[16, 16], strides=[16, 16])                                  # [B, dim, 16, 12]
    x = g.op("Transpose", [g.op("Reshape", [x, g.const(np.array([0, dim, tokens], np.int64))])], perm=[0, 2, 1])
    x = g.op("Add", [x, g.weight([1, tokens, dim], 0.02)])                             # [B, 192, dim]

    def ln(v):
        return g.op("LayerNormalization", [v, g.weight([dim], 1.0, True), g.weight([dim], 0.0, True)], axis=-1, epsilon=1e-6)

    def linear(v, n_in, n_out):
        return g.op("Add", [g.op("MatMul", [v, g.weight([n_in, n_out], n_in ** -0.5)]), g.weight([n_out], 0.01)])

    for _ in range(depth):
        split = g.const(np.array([0, tokens, heads, hd], np.int64))
        y = ln(x)
        q, k, v = (g.op("Reshape", [linear(y, dim, dim), split]) for _ in range(3))   # [B, 192, h, hd]
        q = g.op("Transpose", [q], perm=[0, 2, 1, 3])                                  # [B, h, 192, hd]
        k = g.op("Transpose", [k], perm=[0, 2, 3, 1])                                  # [B, h, hd, 192]
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        att = g.op("Softmax", [g.op("Mul", [g.op("MatMul", [q, k]), g.const(np.array(hd ** -0.5, np.float32))])], axis=-1)
        o = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])          # [B, 192, h, hd]
        o = g.op("Reshape", [o, g.const(np.array([0, tokens, dim], np.int64))])
        x = g.op("Add", [x, linear(o, dim, dim)])
        y = linear(ln(x), dim, mlp)
        y = g.op("Mul", [g.op("Mul", [y, g.const(np.array(0.5, np.float32))]),        # exact GELU
                         g.op("Add", [g.const(np.array(1.0, np.float32)),
                                      g.op("Erf", [g.op("Mul", [y, g.const(np.array(0.5 ** 0.5, np.float32))])])])])
        x = g.op("Add", [x, linear(y, mlp, dim)])
    x = g.op("Transpose", [ln(x)], perm=[0, 2, 1])
    x = g.op("Reshape", [x, g.const(np.array([0, dim, 16, 12], np.int64))])            # [B, dim, 16, 12]
    c = dim
    for _ in range(2):                                                                 # -> 32x24 -> 64x48
        x = g.op("ConvTranspose", [x, g.weight([c, head_ch, 4, 4], (1 / (16 * c)) ** 0.5)],
                 kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])
        x = g.op("Relu", [x])
        c = head_ch
    x = g.op("Conv", [x, g.weight([133, c, 1, 1], c ** -0.5), g.weight([133], 0.01)], kernel_shape=[1, 1])
    out = g.op("Add", [g.const(_template_heatmaps()),
                       g.op("Mul", [g.op("Tanh", [x]), g.const(np.array(1e-3, np.float32))])])
    return g.save(folder, "vitpose_h_wholebody.onnx", "input", ["B", 3, 256, 192], out,
                  ["B", 133, 64, 48], "heatmaps")


# (width, repeats) per stride-2 level: ~31 GMAC at 640x640, as YOLOv10m's 63.4 GFLOPs (= 2 x MAC).
YOLO_M_STAGES = ((48, 0), (96, 3), (192, 4), (384, 4), (576, 3))
VIT_H = {"dim": 1280, "depth": 32, "heads": 16, "mlp": 5120, "head_ch": 256}
SMOKE_DET = ((8, 0), (8, 1), (8, 0), (8, 0), (8, 0))
SMOKE_VIT = {"dim": 64, "depth": 2, "heads": 4, "mlp": 128, "head_ch": 16}


def build_standins(root: Path, *, smoke: bool = False) -> dict[str, Path]:
    """Checkpoint-shaped folders for the official backend: {variant: ckpt_dir}. `tiny` uses
    one-conv networks (cost ~0), `vith` the FLOP-matched ones (or toy ones with smoke=True).
    Weight files are not written here (see ensure_weights). Needs the onnx package."""
    root = Path(root)
    out = {}
    for variant, det, vit in (("tiny", ((4, 0),), {"dim": 16, "depth": 0, "heads": 1, "mlp": 16, "head_ch": 4}),
                              ("vith", SMOKE_DET if smoke else YOLO_M_STAGES, SMOKE_VIT if smoke else VIT_H)):
        ck = root / variant
        _detector(ck / "process_checkpoint" / "det", det)
        _vitpose(ck / "process_checkpoint" / "pose2d", **vit)
        out[variant] = ck
    return out


def ensure_weights(ckpt_dir: Path, seed: int = 0) -> float:
    """Write each model's weights.bin from its manifest when missing or the wrong size (a few
    GB for ViT-H: generated on the spot instead of carried). Returns seconds spent."""
    t = time.perf_counter()
    for man in sorted(Path(ckpt_dir).rglob("weights.json")):
        spec = json.loads(man.read_text())
        path = man.parent / "weights.bin"
        if path.is_file() and path.stat().st_size == spec["bytes"]:
            continue
        rng = np.random.default_rng(seed)
        with open(path, "wb") as f:
            for w in spec["tensors"]:
                n = int(np.prod(w["shape"]))
                if w["const"]:
                    arr = np.full(n, w["scale"], np.float32)
                else:
                    arr = (rng.random(n, dtype=np.float32) * 2 - 1) * np.float32(w["scale"])
                f.seek(w["offset"])
                f.write(arr.tobytes())
    return time.perf_counter() - t


# ------------------------------------------------------------------------ MediaPipe packing

def pack_mediapipe(src: Path, out: Path, *, strip: bool = True, preset: int = 6) -> dict:
    """A .tar.xz of what the embedded backend needs from mediapipe 0.10.21: its Python files
    (tests left out), native libraries (the bindings stripped of their symbol table when
    `strip` is found), graphs and the MEDIAPIPE_MODELS .tflite files. `src` is a wheel or a
    site-packages folder holding mediapipe/. Extract into a folder and put it on PYTHONPATH."""
    import zipfile

    src, out = Path(src), Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if src.suffix == ".whl":
            with zipfile.ZipFile(src) as z:
                z.extractall(tmp / "site")
            site = tmp / "site"
        else:
            site = src
        keep_models = {f"mediapipe/modules/{m}" for m in MEDIAPIPE_MODELS}
        members = []
        for top in ("mediapipe", "mediapipe.libs"):
            for p in sorted((site / top).rglob("*")):
                if not p.is_file() or "__pycache__" in p.parts:
                    continue
                rel = p.relative_to(site).as_posix()
                if p.suffix == ".py" and (p.name.endswith("_test.py") or "/test/" in rel or "/testdata/" in rel):
                    continue
                if p.suffix == ".tflite" and rel not in keep_models:
                    continue
                members.append((p, rel))
        missing = keep_models - {rel for _, rel in members}
        if missing:
            raise FileNotFoundError(f"{src} lacks {sorted(missing)}: not mediapipe 0.10.21?")
        strip_bin = shutil.which("strip") if strip else None
        stripped = []
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz", preset=preset) as tar:
            for p, rel in members:
                if strip_bin and "_framework_bindings" in p.name:
                    copy = tmp / p.name
                    shutil.copyfile(p, copy)
                    import subprocess
                    subprocess.run([strip_bin, "--strip-unneeded", str(copy)], check=True)
                    stripped.append(rel)
                    p = copy
                tar.add(p, arcname=rel)
        raw = sum(p.stat().st_size for p, _ in members)
    return {"files": len(members), "raw_bytes": raw, "packed_bytes": out.stat().st_size,
            "stripped": stripped, "out": str(out)}


# ------------------------------------------------------------------------------ the rows

def _env() -> dict:
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
           "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "machine": platform.machine(), "numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "cv2", "mediapipe", "av", "google.protobuf"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            env[mod] = getattr(m, "__version__", "?")
            if mod == "mediapipe":      # the installed wheel or a carried trimmed copy
                env["mediapipe_dir"] = str(Path(m.__file__).parent)
        except Exception as e:      # a missing or broken package is a finding, not a failure
            env[mod] = f"unavailable ({type(e).__name__}: {e})"
    try:
        import onnxruntime as ort
        env["ort_available_providers"] = ort.get_available_providers()
        env["ort_cuda_ep"] = "CUDAExecutionProvider" in env["ort_available_providers"]
    except Exception:
        env["ort_available_providers"], env["ort_cuda_ep"] = [], False
    try:
        import torch
        env["cuda"] = torch.cuda.is_available()
        env["gpu"] = torch.cuda.get_device_name(0) if env["cuda"] else None
    except Exception:
        env["cuda"], env["gpu"] = False, None
    return env


def _gpu_used(providers: list[str]) -> bool:
    return any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers)


def run_row(backend: str, mode: str, args, ckpts: dict, e2e: bool) -> dict:
    """One preprocess() run on the examples: "staged" with a timer per stage (throughput over the
    run without the model load), "e2e" without timers (the plain call, as a user makes it)."""
    from wanimate.engine.preprocess import preprocess
    from wanimate.engine.video import MediaLimits

    # a stuck decoder fails its row after this long instead of eating the whole GPU slot
    limits = MediaLimits(timeout_s=args.decode_timeout_s)
    row = {"backend": backend, "mode": mode, "what": "e2e" if e2e else "staged"}
    st = None if e2e else Stages()
    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = preprocess(args.image, args.video, Path(tmp) / "out", mode=mode, backend=backend.split("-")[0],
                         ckpt_dir=ckpts.get(backend.split("-", 1)[-1]), fps=30.0, progress=False,
                         batch_size=args.batch_size, limits=limits, timer=st)
    row.update(frames=res.n_frames, seconds=res.seconds, fps=res.throughput_fps, pose_pass_fps=res.pose_fps,
               providers=res.providers, mask_source=res.mask_source, person_rate=res.person_rate,
               gpu_used=_gpu_used(res.providers), warnings=[str(w.message) for w in caught][:5])
    if st is not None:
        stages = dict(st.seconds)
        row["load_s"] = stages.pop("load")
        run_s = res.seconds - row["load_s"]
        row.update(stages=stages, fps=res.n_frames / run_s, other_s=run_s - sum(stages.values()),
                   stage_fps={k: (res.n_frames / v if v > 0 else None) for k, v in stages.items()})
    return row


def _torch_networks(det_stages, vit: dict):
    """The official-vith stand-ins as torch modules (same shapes and FLOPs): (detector, pose)."""
    import torch
    from torch import nn

    layers, c_in = [], 3
    for width, repeats in det_stages:
        for r in range(repeats + 1):
            layers += [nn.Conv2d(c_in if r == 0 else width, width, 3, 2 if r == 0 else 1, 1), nn.SiLU()]
        c_in = width
    det = nn.Sequential(*layers)

    class ViTPose(nn.Module):
        def __init__(self, dim, depth, heads, mlp, head_ch):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 16, 16)
            self.pos = nn.Parameter(torch.randn(1, 192, dim) * 0.02)
            block = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Sequential(nn.ConvTranspose2d(dim, head_ch, 4, 2, 1), nn.ReLU(),
                                      nn.ConvTranspose2d(head_ch, head_ch, 4, 2, 1), nn.ReLU(),
                                      nn.Conv2d(head_ch, 133, 1))

        def forward(self, x):                                        # [B, 3, 256, 192]
            x = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # [B, 192, dim]
            x = self.norm(self.blocks(x))
            x = x.transpose(1, 2).reshape(x.shape[0], -1, 16, 12)    # [B, dim, 16, 12]
            return self.head(x)                                      # [B, 133, 64, 48]

    return det, ViTPose(**vit)


def torch_networks_row(smoke: bool, batch: int = 8, repeats: int = 10) -> dict:
    """What the official backend's two networks would cost on the GPU (torch, CUDA events,
    batch `batch`, fp32 and fp16), for comparison with the ONNX Runtime CPU rows. Not part of
    the pipeline: ONNX Runtime needs its CUDA or TensorRT EP for that."""
    import torch
    from wanimate.bench.timing import time_calls

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    det, pose = _torch_networks(SMOKE_DET if smoke else YOLO_M_STAGES, SMOKE_VIT if smoke else VIT_H)
    row = {"backend": "torch-networks", "mode": "-", "what": "networks", "device": str(device),
           "batch": batch, "pose_params_m": sum(p.numel() for p in pose.parameters()) / 1e6,
           "det_params_m": sum(p.numel() for p in det.parameters()) / 1e6}
    g = torch.Generator(device="cpu").manual_seed(0)
    x_det = torch.rand(batch, 3, 640, 640, generator=g).to(device)
    x_pose = torch.rand(batch, 3, 256, 192, generator=g).to(device)
    for dtype in (torch.float32, torch.float16) if device.type == "cuda" else (torch.float32,):
        name = str(dtype).split(".")[-1]
        d, p_ = det.to(device, dtype).eval(), pose.to(device, dtype).eval()
        with torch.inference_mode():
            for key, net, x in (("det", d, x_det.to(dtype)), ("pose", p_, x_pose.to(dtype))):
                for _ in range(2):
                    out = net(x)
                times = time_calls(lambda: net(x), device, 2 if smoke else repeats)
                row[f"{key}_{name}_ms_per_frame"] = 1e3 * sorted(times)[len(times) // 2] / batch
                if key == "pose":
                    row["pose_out_shape"] = list(out.shape)
        row[f"networks_{name}_fps"] = 1e3 / (row[f"det_{name}_ms_per_frame"] + row[f"pose_{name}_ms_per_frame"])
    row["gpu_used"] = device.type == "cuda"
    del det, pose
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict]) -> None:
    head = f"{'backend':<14} {'mode':<8} {'what':<7} {'frames':>6} {'fps':>7} " + \
           " ".join(f"{s + ' ms':>10}" for s in STAGES) + "  gpu  providers / note"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<14} {r['mode']:<8} {r['what']:<7} ERROR {r['error']}")
            continue
        if r["what"] == "networks":
            print(f"{r['backend']:<14} {r['mode']:<8} {r['what']:<8} on {r['device']}, batch {r['batch']}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith(("_ms_per_frame", "_fps"))))
            continue
        n = max(r.get("frames", 0), 1)
        st = r.get("stages") or {}
        cells = " ".join(f"{(1e3 * st[s] / n if s in st else float('nan')):>10.2f}" for s in STAGES)
        print(f"{r['backend']:<14} {r['mode']:<8} {r['what']:<7} {r['frames']:>6} {r['fps']:>7.2f} {cells}"
              f"  {'yes' if r['gpu_used'] else 'no ':<4} {','.join(r['providers'])}"
              + (f" masks={r['mask_source']}" if r.get("mask_source") else ""))
    print("(stage columns: milliseconds per frame; fps = frames / whole run incl. both passes)")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["standins"]:
        p = argparse.ArgumentParser(prog="bench.preprocess standins")
        p.add_argument("dir", type=Path)
        p.add_argument("--smoke", action="store_true")
        a = p.parse_args(argv[1:])
        return {k: str(v) for k, v in build_standins(a.dir, smoke=a.smoke).items()}
    if argv[:1] == ["pack-mediapipe"]:
        p = argparse.ArgumentParser(prog="bench.preprocess pack-mediapipe")
        p.add_argument("src", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--no-strip", action="store_true")
        a = p.parse_args(argv[1:])
        info = pack_mediapipe(a.src, a.out, strip=not a.no_strip)
        print(json.dumps(info, indent=1))
        return info

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, default=REPO / "examples" / "astronaut.jpg")
    p.add_argument("--video", type=Path, default=REPO / "examples" / "drive.mp4")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--frames", type=int, default=None, help="frames per row (default: the whole "
                   "video, 106 for the example; --vith-frames for official-vith)")
    p.add_argument("--vith-frames", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--standins", type=Path, default=None,
                   help="folder from `standins` (built in a temporary folder when not given; needs onnx)")
    p.add_argument("--torch-networks", choices=("auto", "yes", "no"), default="auto",
                   help="time the vith stand-ins in torch too (auto: on CUDA, or with --smoke)")
    p.add_argument("--decode-timeout-s", type=float, default=120.0)
    p.add_argument("--e2e-backends", default="embedded",
                   help="backends that also get a preprocess() row ('' for none; official-vith is slow)")
    p.add_argument("--budget-s", type=float, default=130.0, help="rows that would start later are skipped")
    p.add_argument("--smoke", action="store_true", help="toy stand-ins, 6 frames")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    out = a.out or Path(os.environ.get("OUT", ".")) / "preprocess.json"
    t_start = time.perf_counter()
    env = _env()
    print("wanimate preprocessing bench: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    result = {"env": env, "rows": [], "notes": [
        "MediaPipe (embedded backend, selfie masks) runs its CPU graphs (TFLite/XNNPACK): no GPU",
        "official-* rows use stand-in networks (no real weights here); official-vith is FLOP-matched "
        "to YOLOv10m + ViTPose-H, official-tiny measures everything but the networks"]}
    if not env["ort_cuda_ep"]:
        result["notes"].append("onnxruntime has no CUDAExecutionProvider here: the official backend "
                               "ran on the CPU EP")
    backends = [b for b in a.backends.split(",") if b]
    modes = [m for m in a.modes.split(",") if m]
    ckpts: dict = {}
    tmp_root = None
    if any(b.startswith("official") for b in backends):
        try:
            root = a.standins
            if root is None or not (root / "vith").is_dir():
                tmp_root = tempfile.mkdtemp(prefix="prep-standins-")
                root = Path(tmp_root)
                build_standins(root, smoke=a.smoke)
            ckpts = {"tiny": root / "tiny", "vith": root / "vith"}
            gen = {k: ensure_weights(v) for k, v in ckpts.items()}
            result["weights_generated_s"] = gen
            print(f"stand-in weights ready ({', '.join(f'{k} {v:.1f} s' for k, v in gen.items())})", flush=True)
        except Exception as e:      # e.g. no onnx to build them: the embedded rows still run
            result["rows"].append({"backend": "official", "mode": "-", "what": "setup",
                                   "error": f"{type(e).__name__}: {e}"})
            backends = [b for b in backends if not b.startswith("official")]
    # most telling rows first, so that a tight --budget-s drops the least useful ones
    order = {"embedded": 0, "official-vith": 1, "official-tiny": 2}
    backends.sort(key=lambda b: order.get(b, 3))
    plan = [(b, m, False) for b in backends for m in modes]
    plan += [(b, m, True) for b in backends for m in modes if b in a.e2e_backends.split(",")]
    if a.torch_networks == "yes" or (a.torch_networks == "auto" and (env["cuda"] or a.smoke)):
        plan.insert(len([x for x in plan if x[0] in ("embedded", "official-vith") and not x[2]]),
                    ("torch-networks", "-", False))
    clips: dict[int, Path] = {}
    clip_dir = Path(tempfile.mkdtemp(prefix="prep-clips-"))
    for b, m, e2e in plan:
        row_args = argparse.Namespace(**vars(a))
        n = 6 if a.smoke else (a.frames or (a.vith_frames if b == "official-vith" else 10 ** 9))
        if time.perf_counter() - t_start > a.budget_s:
            result["rows"].append({"backend": b, "mode": m, "what": "e2e" if e2e else "staged",
                                   "error": f"skipped: past --budget-s {a.budget_s}"})
            continue
        try:
            if b != "torch-networks" and n not in clips:
                clips[n] = make_clip(a.video, n, clip_dir / f"clip{n}.mp4")
            row_args.video = clips.get(n)
            row = torch_networks_row(a.smoke) if b == "torch-networks" else run_row(b, m, row_args, ckpts, e2e)
        except Exception as e:      # one broken row must not stop the others
            row = {"backend": b, "mode": m, "what": "e2e" if e2e else "staged",
                   "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        result["rows"].append(row)
        print(f"  {b} {m} {row['what']}: " + (f"{row['fps']:.2f} frames/s ({row['frames']} frames)"
                                             if "fps" in row else row.get("error", "done")), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
    result["total_s"] = time.perf_counter() - t_start
    if tmp_root:
        shutil.rmtree(tmp_root, ignore_errors=True)
    shutil.rmtree(clip_dir, ignore_errors=True)
    print()
    print_table(result["rows"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} ({result['total_s']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
