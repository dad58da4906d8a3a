#!/usr/bin/env bash
# The paper's ISBI 2012 experiment at CPU size: train on slices 0-14 of the ISBI 2012 training
# volume (read through the TFDS builder from the challenge's own files), stop at a time budget,
# evaluate slices 15-19 and print the scores beside the paper's (which are for the full network
# on the challenge's test volume, scored by the challenge: not the same experiment).
#
#   ISBI_DIR=path/to/isbi2012 BUDGET_MIN=35 bash experiments/isbi2012_cpu.sh
set -euo pipefail
UNETCELL=${UNETCELL:-.venv/bin/unetcell}
PYTHON=${PYTHON:-.venv/bin/python}
ISBI_DIR=${ISBI_DIR:-../shared/data/isbi2012}
BUDGET_MIN=${BUDGET_MIN:-35}
OUT=${OUT:-runs/isbi2012_cpu}
export TFDS_DATA_DIR=${TFDS_DATA_DIR:-$OUT/tfds}
mkdir -p "$OUT"
start=$(date +%s)

# Training ends at the budget (timeout's 124); model.keras is the best epoch so far.
status=0
timeout "${BUDGET_MIN}m" $UNETCELL train 'tfds:isbi2012:train[:15]' --manual-dir "$ISBI_DIR" \
    --out "$OUT/run" --config experiments/isbi2012_cpu.toml --overwrite || status=$?
[ "$status" = 0 ] || [ "$status" = 124 ] || exit "$status"
[ -f "$OUT/run/model.keras" ] || { echo "no epoch finished within ${BUDGET_MIN} min"; exit 1; }
trained=$(( $(date +%s) - start ))

$UNETCELL evaluate 'tfds:isbi2012:train[15:20]' --manual-dir "$ISBI_DIR" --model "$OUT/run/model.keras" \
    --json "$OUT/metrics.json" --overlay "$OUT/evaluation" --overwrite

$PYTHON - "$OUT" "$trained" "$BUDGET_MIN" <<'PY'
import csv, json, sys
out, trained, budget = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = json.load(open(f"{out}/metrics.json"))
rows = list(csv.DictReader(open(f"{out}/run/history.csv")))
best = min(rows, key=lambda r: float(r["val_loss"]))
print(f"\nISBI 2012, slices 15-19 of the training volume; trained on slices 0-14 "
      f"for {trained // 60} min (budget {budget} min): {len(rows)} epochs of 40 steps, "
      f"best val_loss {float(best['val_loss']):.4f} at epoch {int(best['epoch']) + 1}")
print(f"{'':24}{'this run':>10}{'paper':>10}")
print(f"{'pixel error':24}{1 - m['pixel_accuracy']:>10.4f}{0.0611:>10.4f}")
print(f"{'adapted Rand error':24}{m['rand_error']:>10.4f}{0.0382:>10.4f}")
print(f"{'F1 at IoU 0.5':24}{m['f1_50']:>10.4f}{'-':>10}")
print(f"{'warping error':24}{'-':>10}{0.000353:>10.6f}")
print("paper: full U-Net (64 filters, depth 4), ISBI 2012 test volume, scored by the challenge")
PY
