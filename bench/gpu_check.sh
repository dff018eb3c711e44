#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: build check, GPU tests, kernel benchmark.
#   bash bench/gpu_check.sh            (results under bench/results/, and $OUT when set)
# Prints a short table last. Needs torch with CUDA, triton, pytest, matplotlib (optional).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out_dir=${OUT:-bench/results}
mkdir -p "$out_dir" bench/results
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# install without touching the environment's torch/triton; fall back to a link for scatterattn.kernels
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  [ -e scatterattn/kernels ] || ln -s ../kernels scatterattn/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
echo "== GPU tests (kernels compiled; interpreter off)"
timeout 420 python3 -m pytest tests/test_kernels.py tests/test_kernels_gpu.py -q -x -p no:cacheprovider \
  2>&1 | tee "$out_dir/gpu_tests.log" | tail -25
echo "== kernel benchmark"
timeout 600 python3 bench/kernels.py --out bench/results 2>&1 | tee "$out_dir/bench.log" | tail -60
cp bench/results/kernels-* "$out_dir"/ 2>/dev/null || true
