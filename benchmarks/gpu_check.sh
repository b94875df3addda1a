#!/usr/bin/env bash
# One prepared run on a lent GPU machine, about 8 minutes on an H200: the feature-cache comparison
# at 224 px, the decoder step compiled, extraction with BatchNorm folded, the feature-space
# crops' fidelity, the attention decoder's step beside the LSTM's with train() on the coco path, and
# a self-critical step at COCO sizes (model against reward time), and every stage of the COCO-scale
# rehearsal at 1% of COCO with ResNet-152 at 224 px. Each part has its own time limit, so
# a slow one cannot eat the others; their outputs go to $OUT (or ./gpu-out).
#   bash benchmarks/gpu_check.sh
# Packages the machine lacks (nltk, pycocotools) can come as wheels in .whl/ (see the device notes).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - t)) s"
    grep -v "^saved \|^training on\|features: \|^building\|^resized\|^epoch \|^frozen\|UserWarning\|check_worker" "$out/$name.txt" | tail -25
}

part train_speed ${SPEED_LIMIT:-210} python3 benchmarks/train_speed.py --size ${SIZE:-224} --images ${IMAGES:-2000} --methods chapter views:2+2 views:2 maps \
    --seeds 0 1 2 --workers 8
part decoder_compile 120 python3 benchmarks/decoder_compile.py
part extract_speed 30 python3 benchmarks/extract_speed.py --size 224 --batch 256 --repeats 10
part feature_crops 45 python3 benchmarks/feature_crops.py --images 64 --runs random152:224:256
part attention_speed 90 python3 benchmarks/attention_speed.py --sizes coco --train
part scst_step 60 python3 benchmarks/scst_step.py --sizes coco --device cuda --repeats 10
part coco_scale 120 python3 benchmarks/coco_scale.py --scale 0.01 --gpu --json "$out/coco_scale_gpu.json"
