#!/usr/bin/env bash
# Set up idap-onnx in .venv (with everything the tests need) and run the main job, offline,
# on bundled real data: `idap-onnx optimize` on a CNN trained on scikit-learn's handwritten
# digits, ending with a deployable INT8 artifact; then inspect a real third-party graph
# (PP-OCRv4's detector from rapidocr). Outputs go to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torchvision only imports beside this torch build (see shared FIELD_NOTES); both lie on disk.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[dev]"

# 1) The main job: optimize a CNN trained here on real handwritten digits (scikit-learn's
#    bundled 8x8 digits) under a 1-point top-1 budget, targeting half of its FLOPs, with
#    widths the runtime runs fast (the default --round-to auto: multiples of ONNX Runtime's
#    NCHWc block on this CPU, 16 with AVX-512, 8 with AVX2), and export it to INT8 for ONNX
#    Runtime's CPU (--precision int8: the budget is judged on the INT8 model, the int8 form
#    is chosen by measurement, and fp32 is kept if no int8 form runs faster). Timed at batch 8:
#    this CNN is so small (0.04 ms at batch 1) that at batch 1 int8 does not pay here.
#    The report times the original, the pruned fp32 and the INT8 artifact side by side.
DIGITS=$(.venv/bin/python tools/digits.py --print-dir)
mkdir -p out
echo "== idap-onnx optimize (digits CNN, real data, budget: top-1 drop <= 1 point)"
.venv/bin/idap-onnx optimize "$DIGITS/digits.onnx" --calib "$DIGITS/x_train.npz" \
  --labels "$DIGITS/labels_train.npy" --val-fraction 0.3 --max-drop 1 --target-flops 0.5 \
  --precision int8 --latency-batch 8 -o out/digits.opt.onnx

# 2) A real third-party graph: PP-OCRv4's text detector shipped in rapidocr-onnxruntime.
MODEL=$(.venv/bin/python -c "import rapidocr_onnxruntime, pathlib; \
print(next(pathlib.Path(rapidocr_onnxruntime.__file__).parent.glob('models/*det*.onnx')))")
echo "== idap-onnx inspect (PP-OCRv4 detector, $(basename "$MODEL"))"
.venv/bin/idap-onnx inspect "$MODEL" --input-shape x:1x3x320x320 --json out/inspect.json | tail -n 12
echo "== written: out/digits.opt.onnx, its INT8 artifact out/digits.opt.int8.onnx (when int8"
echo "   paid here; the report says), the report (out/digits.opt.report.md), out/inspect.json"
