"""Preprocessing: driving video + reference image -> the folder that generation consumes.

    from wanimate.engine.preprocess import preprocess
    result = preprocess("ref.png", "drive.mp4", "out/", mode="animate", retarget=False)

Backends: 'official' (the checkpoint's YOLOv10m + ViTPose-H ONNX models, official.py) and
'embedded' (MediaPipe models shipped in the mediapipe 0.10.21 wheel, embedded.py); 'auto' picks
the official one when --ckpt-dir holds process_checkpoint/. Drawing, face crops, resizing,
retargeting and masks are shared and match the official code bit for bit (draw.py, face.py,
resize.py, retarget.py, masks.py; checked by engine/verify/preprocess.py on the fixtures).
FLUX-based retargeting (the official --use_flux) is not run: retargeting measures proportions
on the reference and the first driving frame directly.
"""
from .face import FaceNotFoundError
from .pipeline import NoPersonError, PreprocessResult, PreprocessWarning, preprocess, select_backend

__all__ = ["preprocess", "PreprocessResult", "PreprocessWarning", "NoPersonError",
           "FaceNotFoundError", "select_backend"]
