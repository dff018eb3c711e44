#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: GPU tests, kernel benchmark, chained-gradient benchmark.
#   bash bench/gpu_check.sh            (results under bench/results/, copied to $OUT when set)
# Prints a short table last. Needs torch with CUDA, triton, pytest; matplotlib for the plots.
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
echo "== GPU tests (kernels compiled for this GPU; interpreter off)"
timeout 300 python3 -m pytest tests/test_kernels.py tests/test_kernels_gpu.py tests/test_lora.py -q -p no:cacheprovider \
  2>&1 | tee "$out_dir/gpu_tests.log" | tail -25
echo "== Scatterbrain kernel benchmark"
timeout 360 python3 bench/kernels.py --out bench/results > "$out_dir/bench_kernels.log" 2>&1
tail -3 "$out_dir/bench_kernels.log"
echo "== chained low-rank gradient benchmark"
timeout 240 python3 bench/lora_backward.py --out bench/results > "$out_dir/bench_lora.log" 2>&1
tail -3 "$out_dir/bench_lora.log"
echo "== launch configurations (N 16k): candidates from bench/kernel_resources.py"
timeout 150 python3 bench/kernel_configs.py > "$out_dir/kernel_configs.log" 2>&1
tail -4 "$out_dir/kernel_configs.log"
cp bench/results/kernels-* bench/results/lora-backward-* "$out_dir"/ 2>/dev/null || true
echo "== summary"
grep -h "passed\|failed" "$out_dir/gpu_tests.log" | tail -1
sed -n '/^| N |/,/^$/p' "$out_dir/bench_kernels.log"
grep -h "^- \[" "$out_dir/bench_kernels.log" "$out_dir/bench_lora.log" "$out_dir/kernel_configs.log" 2>/dev/null
