#!/bin/bash
# The measured Mask R-CNN row of the README (issue 21): both DSB 2018 nuclei splits, trained
# for BUDGET seconds each in a separate environment (tf-models-official pins TensorFlow 2.20,
# tf-keras and tensorflow-text; unetcell runs TensorFlow 2.21 and Keras 3), scored by
# `unetcell evaluate` on the same test images as benchmarks/architectures.py.
#   benchmarks/maskrcnn/run.sh [DATA=../shared/data] [WORK=runs/maskrcnn] [BUDGET=1080]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/benchmarks/maskrcnn"
DATA=$(cd "${DATA:-$ROOT/../shared/data}" && pwd)
WORK=${WORK:-$ROOT/runs/maskrcnn}
BUDGET=${BUDGET:-1080}
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
    python3.11 -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q "tensorflow==2.20.*" "tf-models-official==2.20.0" tifffile
fi
"$ROOT/.venv/bin/python" - "$DATA" "$WORK" "$ROOT/benchmarks" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from accuracy import lay_out  # the test folders of benchmarks/accuracy.py and architectures.py
lay_out(Path(sys.argv[1]), Path(sys.argv[2]))
PY
PY="$WORK/venv/bin/python"
# split a: train 1d4a5e72, test 212b858a; split b: the reverse (benchmarks/accuracy.py's nuclei-a, nuclei-b)
for split in "a 1d4a5e72 212b858a 1" "b 212b858a 1d4a5e72 2"; do
    set -- $split
    "$PY" "$HERE/prepare.py" "$DATA" "$2" "$WORK/train-$1.tfrecord" 200 "$4"
    "$PY" "$HERE/train.py" "$DATA" "$WORK/train-$1.tfrecord" "$3" "$WORK/pred-$1" "$BUDGET" | tee "$WORK/train-$1.log"
    "$ROOT/.venv/bin/unetcell" evaluate "$WORK/data/$3" --predictions "$WORK/pred-$1" | tee "$WORK/eval-$1.txt"
done
