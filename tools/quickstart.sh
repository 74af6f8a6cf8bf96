#!/usr/bin/env bash
# Set up idap-onnx in .venv (with everything the tests need) and run the main job on a
# bundled, offline, real model: PP-OCRv4's text detector, shipped inside the PyPI package
# rapidocr-onnxruntime. Outputs go to out/.
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

MODEL=$(.venv/bin/python -c "import rapidocr_onnxruntime, pathlib; \
print(next(pathlib.Path(rapidocr_onnxruntime.__file__).parent.glob('models/*det*.onnx')))")
mkdir -p out
echo "== idap-onnx inspect (PP-OCRv4 detector, $(basename "$MODEL"))"
.venv/bin/idap-onnx inspect "$MODEL" --input-shape x:1x3x320x320 --json out/inspect.json | tail -n 25
echo "== idap-onnx prune: 30 % of the units by L1 norm, widths rounded to 8"
.venv/bin/idap-onnx prune "$MODEL" -o out/det_pruned.onnx --ratio 0.3 --score l1 --round-to 8 \
  --input-shape x:1x3x320x320 --json out/prune.json
echo "== written: out/det_pruned.onnx, out/prune.json, out/inspect.json"
