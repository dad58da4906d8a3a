#!/usr/bin/env bash
# The CPU demo: synthetic cells -> train -> predict with an overlay -> evaluate.
set -euo pipefail
UNETCELL=${UNETCELL:-.venv/bin/unetcell}
OUT=runs/demo
start=$(date +%s)
$UNETCELL synth $OUT/data --count 8 --shape 256 256 --seed 1 --overwrite
$UNETCELL synth $OUT/test --count 2 --shape 384 512 --seed 99 --overwrite
$UNETCELL train $OUT/data --out $OUT/run --config experiments/cpu_demo.toml --overwrite
$UNETCELL predict $OUT/run/model.keras $OUT/test/images/cell_000.tif -o $OUT/predicted/cell_000.tif \
    --output both --overlay --overwrite
$UNETCELL evaluate $OUT/test --model $OUT/run/model.keras --json $OUT/metrics.json \
    --overlay $OUT/evaluation --overwrite
echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  last epoch:       $(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) name[i] = $i }
    END { for (i = 2; i <= NF; i++) printf "%s %.4f  ", name[i], $i }' $OUT/run/history.csv)"
echo "  training history: $OUT/run/history.csv"
echo "  overlays:         $OUT/predicted/ and $OUT/evaluation/"
echo "  metrics:          $OUT/metrics.json"
