#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one call on a lent GPU: the GPU tests (bf16 against fp32, the whole
# loop in bf16) and the SD-1.5-sized benchmark at 256 and 512 px (random weights of the real SD VAE, CLIP
# ViT-L/14 text encoder and SD-1.5 UNet architectures: the same cost as the published weights).
# Diffusers is carried as wheels:  pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata
# `bash scripts/device_check.sh` runs it all; `... sweep` only the cached-training sweep.
# Results go to $OUT (default outputs/device): checks.txt and one .txt + .json per benchmark.
set -u
OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
mode=${1:-all}
[[ $mode == all ]] && {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, transformers, accelerate as a; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', a.__version__)"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4
} 2>&1 | tee "$OUT/checks.txt"

bench() {  # name resolution batch [overrides...]
  local name=$1 res=$2 bs=$3
  shift 3
  echo "== $name: $res px, batch $bs $* (t=${SECONDS}s)"
  python3 scripts/benchmark.py --config configs/sd15-512.yaml --stand-ins --out "/tmp/bench_$name" "$@" \
    data.dataset=shapes data.resolution="$res" data.shapes.num_images=512 train.batch_size="$bs" \
    data.num_workers=8 train.mixed_precision=bf16 >"$OUT/$name.txt" 2>&1
  local rc=$?
  cp "/tmp/bench_$name/report.json" "$OUT/$name.json" 2>/dev/null
  tail -7 "$OUT/$name.txt"
  return $rc
}
if [[ $mode == all ]]; then
  bench sd15_256 256 32
  bench sd15_512 512 16
else  # "sweep": training from the cache only, larger batches, channels-last, torch.compile
  bench sd15_256_b128 256 128 --cached-only
  bench sd15_512_b32_cl 512 32 --cached-only train.channels_last=true
  if ((SECONDS < 240)); then bench sd15_512_b32_cl_compile 512 32 --cached-only train.channels_last=true train.compile=true; fi
fi
echo "done in ${SECONDS}s"
