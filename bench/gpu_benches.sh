#!/usr/bin/env bash
# The GPU checks of issues 10 and 11 (before = the previous release unpacked in .base/, after = this tree). Prepare on the CPU machine first:
#   mkdir -p .whl && pip download --no-deps -d .whl open_clip_torch==3.3.0 ftfy wcwidth fastcore==1.14.5 faiss-cpu==1.15.1
#     (the GPU image lacks open_clip; `training` needs fastcore's @patch; the search index of the scale bench needs faiss)
#   mkdir -p .base && git archive <old commit> fashion_json_encoder | tar -x -C .base     # the "before" package
# and run it there with .whl and .base carried; results land in $OUT (all.log and the benches' JSON).
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-bench-out}; mkdir -p "$OUT"
SITE=/tmp/site; [ -d "$SITE/open_clip" ] || pip install -q --no-deps --no-index --target "$SITE" .whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$SITE:${PYTHONPATH:-}"
NEW="$PWD:$PYTHONPATH"; OLD="$PWD/.base:$PYTHONPATH"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))" | tee -a "$OUT/all.log"; timeout "$limit" "$@" 2>&1 | tee -a "$OUT/all.log"; echo "=== $name exit ${PIPESTATUS[0]} ($(date +%T))" | tee -a "$OUT/all.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/all.log"
python3 -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT/all.log"
# fail in seconds, not after a machine start and a long step, when a carried wheel is missing
PYTHONPATH="$NEW" python3 -c "import faiss, fastcore, fashion_json_encoder.system" || { echo "missing a package: see the .whl line above" | tee -a "$OUT/all.log"; exit 3; }

# PART=first (default, about 9 min: what decides issues 10 and 11 and fits one device call with room for a rerun):
#   the CUDA tests, one training step before/after (bench_step: same run), the cache build (bench_decode), the full-size run.
# PART=more: the zip index rate at 30k labels, the previous release at scale 0.1 (the "before" trainer rate), the GPU evaluation at 180k, graphs vs eager.
PART=${PART:-first}
if [ "$PART" = first ]; then
  step tests ${LIMIT:-120} env PYTHONPATH="$NEW" python3 -m pytest -q -p no:cacheprovider -rs tests/test_training.py tests/test_evaluation.py \
      tests/test_decode.py tests/test_image_encoder.py tests/test_resident.py tests/test_search_index.py tests/test_search.py -k "cuda or gpu or graph or resident or resume or subset or host_memory or mapped or gallery_bias"
  # issue 11: one training step, per-field (previous encoder path) vs packed ids vs 16 whole steps per CUDA graph
  step step_kernels 60 env PYTHONPATH="$NEW" python3 bench/bench_step.py --device cuda --rows 1450000 --steps 2000
fi
# issue 10: the cache build's input pipeline (its rates feed the projections below)
if [ "$PART" = first ]; then
  # GPU decode alone and with 25 % / 40 % of the photos decoded by the CPU workers alongside (decode_cpu_share)
  step decode 150 env PYTHONPATH="$NEW" python3 bench/bench_decode.py --photos ${PHOTOS:-3000} --device cuda --num-workers 12 --batch-size 256 --cpu-shares 0.25,0.4 --out-json "$OUT/decode.json"
fi
# PART=more: the index build of the release zips at a size where the pool's start-up does not dominate (the projection's index term)
if [ "$PART" = more ]; then
  step index_zips 90 env PYTHONPATH="$NEW" python3 bench/bench_index.py --n 30000 --workers 16 --layout zips --dir /tmp/kf_index --json "$OUT/index.json"
fi
# rates for the projections: this call's measurements, else CACHE_RATE / INDEX_RATE from the environment (PART=more runs in a
# new call with an empty $OUT: pass PART=first's cache rate as CACHE_RATE=...)
CACHE_RATE=${CACHE_RATE:-$(python3 -c "import json; b = json.load(open('$OUT/decode.json'))['builds']; print(max(v['crops_per_s'] for v in b.values()))" 2>/dev/null)}
INDEX_RATE=${INDEX_RATE:-$(python3 -c "import json; print(json.load(open('$OUT/index.json'))['labels_per_s'])" 2>/dev/null || \
                           python3 -c "import json; print(json.load(open('$OUT/decode.json'))['index_labels_per_s']['zips'])" 2>/dev/null)}
echo "measured: cache build ${CACHE_RATE:-?} crops/s, index ${INDEX_RATE:-?} labels/s (used in the projections)" | tee -a "$OUT/all.log"
RATES="${CACHE_RATE:+--cache-rate $CACHE_RATE} ${INDEX_RATE:+--index-rate $INDEX_RATE}"
# issue 11: training and evaluation at K-Fashion's size
if [ "$PART" = first ]; then
  step scale_after_full 200 env PYTHONPATH="$NEW" python3 bench/bench_kfashion_scale.py --scale 1 --epochs 2 --standalone 1 --bare 0 $RATES --json "$OUT/scale_after_full.json"
  exit 0
fi
step scale_before_0.1 120 env PYTHONPATH="$OLD" python3 bench/bench_kfashion_scale.py --scale 0.1 --epochs 1 --standalone 1 --bare 0 $RATES --json "$OUT/scale_before.json"
step eval_gpu_180k 45 env PYTHONPATH="$NEW" python3 bench/bench_scale.py --n 180000 --queries 50 --device cuda
step scale_after_0.1 60 env PYTHONPATH="$NEW" python3 bench/bench_kfashion_scale.py --scale 0.1 --epochs 2 --standalone 1 $RATES --json "$OUT/scale_after.json"
echo '{"cuda_graphs": false}' > /tmp/eager.json
step scale_after_0.1_eager 60 env PYTHONPATH="$NEW" python3 bench/bench_kfashion_scale.py --scale 0.1 --epochs 2 --standalone 0 --bare 0 --config /tmp/eager.json $RATES --json "$OUT/scale_eager.json"
