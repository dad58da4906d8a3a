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
# Touching cells coming apart: the same probabilities as the paper's connected components
# and as the default watershed, each scored against the true cells.
$UNETCELL predict $OUT/run/model.keras $OUT/test/images/*.tif -o $OUT/components --output labels \
    --instances components --overlay --overwrite > /dev/null
$UNETCELL evaluate $OUT/test --predictions $OUT/components --json $OUT/components.json --overwrite > /dev/null
echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  last epoch:       $(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) name[i] = $i }
    END { for (i = 2; i <= NF; i++) printf "%s %.4f  ", name[i], $i }' $OUT/run/history.csv)"
echo "  training history: $OUT/run/history.csv"
echo "  overlays:         $OUT/predicted/ and $OUT/evaluation/"
echo "  metrics:          $OUT/metrics.json"
for run in metrics components; do
  $(dirname "$UNETCELL")/python -c "import json, sys; m = json.load(open(sys.argv[1]))
print(f'  {sys.argv[2]:17s} F1@0.5 {m[\"f1_50\"]:.3f}, mean AP {m[\"mean_ap\"]:.3f}, '
      f'{m[\"predicted_cells\"]} cells predicted of {m[\"true_cells\"]}')" $OUT/$run.json \
      "$([ $run = metrics ] && echo 'watershed:' || echo 'components:')"
done
echo "  (touching cells that components merge: compare $OUT/components/overlays/ with $OUT/evaluation/)"
