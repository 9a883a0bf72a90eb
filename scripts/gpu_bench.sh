#!/usr/bin/env bash
# The one prepared GPU benchmark (run through the device tool; see README "Benchmarks").
#
#   bash scripts/gpu_bench.sh DATA_DIR RESULTS_DIR [ITERATIONS]
#
# On a VOC folder with train.txt/test.txt (raccoon): selective search for every image,
# R-CNN warp-mode fine-tuning of the ImageNet mobilenet_v2 on the GPU, then for fine-tuned
# and frozen features: warp-mode extract -> train-svm -> detect -> evaluate (AP50 VOC07,
# all-point, COCO AP; with and without box regression), and the extract throughput bench.
# Most important first, so a run cut short still reports the main numbers. One JSON line per
# step goes to RESULTS_DIR/gpu_results.jsonl; the fine-tuned backbone is copied there too.
# Env: PY (python), DEV (cuda), CFG (an override config file), WORK (scratch folder),
# ONLY=extract: only the extract throughput bench (issue 4's GPU table; ~2 minutes).
set -uo pipefail
D=${1:?data dir}
R=${2:?results dir}
ITERS=${3:-2000}
W=${WORK:-/tmp/rcnn_gpu}
PY=${PY:-python3}
DEV=${DEV:-cuda}
mkdir -p "$R" "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
RC="$PY -m rcnn_cli"
C=(); [ -n "${CFG:-}" ] && C=(--config "$CFG")
J="$R/gpu_results.jsonl"
NP=$(nproc)
T0=$(date +%s)
step() {  # step NAME CMD...: time a command, log a JSON line
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@" > "$W/$name.out" 2> "$W/$name.err"; local rc=$?
  local dt; dt=$($PY -c "import time;print(round(time.time()-$t0,1))")
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"elapsed\": $(( $(date +%s) - T0 ))}" | tee -a "$J"
  [ $rc -eq 0 ] || tail -5 "$W/$name.err"
  return $rc
}
score() {  # score DET_DIR NAME: evaluate and log AP
  $RC evaluate --annotations "$D" --split "$D/test.txt" --detections "$1" -q >/dev/null 2>&1
  $PY - "$1/metrics.json" "$2" <<'EOF' | tee -a "$J"
import json, sys
m = json.load(open(sys.argv[1]))
print(json.dumps({"eval": sys.argv[2], "ap50_voc07": round(m["mAP_voc07"], 4),
                  "ap50_allpoint": round(m["mAP_voc"], 4), "coco_ap": round(m["coco"]["AP"], 4)}))
EOF
}
chain() {  # chain TAG [extract options...]: extract -> train-svm -> detect -> evaluate
  local tag=$1; shift
  step "extract_$tag" $RC extract "${C[@]}" "$D/images" --split "$D/train.txt" \
    --proposals "$W/props" --annotations "$D" -o "$W/feats_$tag" --mode warp --device "$DEV" \
    "$@" -q || return
  step "train_svm_$tag" timeout 240 $RC train-svm "${C[@]}" --features "$W/feats_$tag" \
    -o "$W/model_$tag" -v || return
  grep -h "rcnn_cli.svm" "$W/train_svm_$tag.err" | tail -3
  step "detect_$tag" $RC detect "${C[@]}" "$D/images" --split "$D/test.txt" \
    --model "$W/model_$tag" -o "$W/det_$tag" --device "$DEV" || return
  tail -1 "$W/detect_$tag.err"
  score "$W/det_$tag" "$tag"
  step "detect_${tag}_noreg" $RC detect "${C[@]}" "$D/images" --split "$D/test.txt" \
    --model "$W/model_$tag" -o "$W/det_${tag}_noreg" --device "$DEV" --no-bbox-regression &&
    score "$W/det_${tag}_noreg" "${tag}_noreg"
}
$PY - <<'EOF' | tee -a "$J"
import json, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__}))
EOF
if [ "${ONLY:-}" = extract ]; then
  step bench_extract $PY scripts/bench_extract.py --device "$DEV" --images 2
  cat "$W/bench_extract.out" >> "$J"
  exit 0
fi
step propose $RC propose "${C[@]}" "$D/images" -o "$W/props" --workers "$NP" -q
step finetune $RC finetune "${C[@]}" --annotations "$D" --split "$D/train.txt" \
  --proposals "$W/props" -o "$W/ft" --mode warp --device "$DEV" --iterations "$ITERS" -q
cp "$W/ft/finetune.json" "$R/" 2>/dev/null
cp "$W/ft/backbone.safetensors" "$R/backbone_warp_ft.safetensors" 2>/dev/null
chain finetuned --weights "$W/ft/backbone.safetensors"
cp "$W/det_finetuned/detections.csv" "$R/" 2>/dev/null
step bench_extract $PY scripts/bench_extract.py --device "$DEV" --images 2
cat "$W/bench_extract.out" >> "$J"
chain frozen
