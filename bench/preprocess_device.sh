#!/usr/bin/env bash
# bench/preprocess.py on the lent GPU machine, which has no mediapipe: unpack the trimmed cp312
# MediaPipe and the ONNX stand-in graphs carried in .mp312/ (python -m wanimate.bench.preprocess
# pack-mediapipe / standins build them), fall back to the carried protobuf if the image's does not
# suit MediaPipe, then run the benchmark. Results go to ${SECTION_OUT:-$OUT}.
set -u
OUTDIR=${SECTION_OUT:-${OUT:-/tmp/out}}
M=/tmp/mp312; rm -rf $M; mkdir -p $M/site $M/st $M/pb
python -c "import tarfile; [tarfile.open(a).extractall(b, filter='data') for a, b in (('.mp312/mediapipe-0.10.21-cp312-trim.tar.xz', '$M/site'), ('.mp312/standins.tar.xz', '$M/st'))]" || exit 1
export PYTHONPATH=$M/site:${PYTHONPATH:-}
if ! python -c "import av" 2>/dev/null && ls .mp312/av-*.whl >/dev/null 2>&1; then
  # PyAV for video I/O, installed into the interpreter itself: the decoder child runs `python -I`
  # (isolated: no PYTHONPATH), so a --target folder would not reach it.
  python -m pip install -q --no-index --no-deps --no-compile .mp312/av-*.whl
fi
# MediaPipe 0.10.21's descriptors break at run time (not at import) under protobuf 7 (the image's:
# "'FieldDescriptor' object has no attribute 'label'"), so the carried protobuf 6 always goes first.
if ls .mp312/protobuf-*.whl >/dev/null 2>&1; then
  python -m zipfile -e .mp312/protobuf-*.whl $M/pb && export PYTHONPATH=$M/pb:$PYTHONPATH
fi
python -c "from mediapipe.python.solutions import holistic" > $OUTDIR/mp_import.log 2>&1 || { echo "MEDIAPIPE UNAVAILABLE:"; tail -3 $OUTDIR/mp_import.log; }
python -c "import mediapipe, google.protobuf as p; print('mediapipe', mediapipe.__version__, mediapipe.__file__, 'protobuf', p.__version__)" 2>&1 | tail -1
python -c "import av; print('av', av.__version__)" 2>&1 | tail -1
timeout ${PREP_TIMEOUT:-160} python -m wanimate.bench.preprocess --standins $M/st --vith-frames 16 --budget-s ${PREP_BUDGET:-100} \
  --out $OUTDIR/preprocess.json 2>&1 | grep -v "inference_feedback_manager\|GetPrototype\|Created TensorFlow Lite\|absl::InitializeLog\|^W0000 "
