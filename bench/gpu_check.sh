#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: GPU tests, kernel benchmark, chained-gradient benchmark,
# launch-configuration timings, within one time budget (the device tool allows 600 s per call).
#   bash bench/gpu_check.sh                        (results under bench/results/; logs and results.tgz to $OUT when set)
#   GPU_CHECK_BUDGET=900 bash bench/gpu_check.sh   (seconds for the whole script; default 520)
# Stages run in order of importance, each capped and cut to the time left, so a slow stage cannot
# starve the summary; every stage's log is written as it runs (a cut stage keeps its partial lines).
# Prints a short table last. Needs torch with CUDA, triton, pytest; matplotlib for the plots.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out_dir=${OUT:-bench/results}
budget=${GPU_CHECK_BUDGET:-520}
mkdir -p "$out_dir" bench/results
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# install without touching the environment's torch/triton; fall back to a link for scatterattn.kernels
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  [ -e scatterattn/kernels ] || ln -s ../kernels scatterattn/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

stage() {  # stage NAME CAP_SECONDS LOG COMMAND...: run with timeout min(CAP, time left - 15 s reserve)
  local name=$1 cap=$2 log=$3
  shift 3
  local t=$((budget - SECONDS - 15))
  ((t > cap)) && t=$cap
  if ((t < 20)); then
    echo "== $name: skipped, ${budget}s budget spent" | tee "$log"
    return
  fi
  echo "== $name (up to ${t}s)"
  timeout -k 10 "$t" "$@" >"$log" 2>&1
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "   cut at ${t}s (partial log kept)"
  echo "   exit $rc, ${SECONDS}s elapsed"
}

stage "GPU tests: bf16, 64k tokens, chained-gradient kernels" 150 "$out_dir/gpu_tests.log" \
  python3 -m pytest tests/test_kernels_gpu.py tests/test_lora.py -v -p no:cacheprovider -k "gpu or kernel or bf16 or 64k or memory"
tail -3 "$out_dir/gpu_tests.log"
stage "Scatterbrain kernel benchmark" 170 "$out_dir/bench_kernels.log" python3 bench/kernels.py --out bench/results --budget 120
stage "chained low-rank gradient benchmark" 70 "$out_dir/bench_lora.log" python3 bench/lora_backward.py --out bench/results
stage "launch configurations (N 16k)" 70 "$out_dir/kernel_configs.log" python3 bench/kernel_configs.py
stage "interpreter-shape kernel tests, compiled" 60 "$out_dir/gpu_kernel_tests.log" \
  python3 -m pytest tests/test_kernels.py -v -p no:cacheprovider
stage "chained gradient: m 128 at 64k (the 10x question), causal at 8k and 64k" 60 "$out_dir/bench_lora_more.log" \
  bash -c "python3 bench/lora_backward.py --out bench/results --features 128 --seq-lens 65536;
           python3 bench/lora_backward.py --out bench/results --causal --seq-lens 8192 65536"
stage "SB-LSH under torch.compile (reduce-overhead) at 1k and 4k" 60 "$out_dir/bench_compiled.log" \
  python3 bench/kernels.py --seq-lens 1024 4096 --methods sdpa sb-lsh sb-lsh-compiled --compiled \
    --no-profile --no-graphs --out /tmp/scatterattn-compiled
stage "host cost on this machine's CPU (launches stubbed; Triton's argument binding)" 40 bench/results/host_cost.log \
  bash -c "python3 bench/host_overhead.py --seq-lens 256 --out bench/results/host_overhead_gpu_host.md;
           TRITON_INTERPRET=0 python3 bench/launch_binding.py --out bench/results/launch_binding_gpu_host.md"
# one archive: the device tool returns at most 8 files from $OUT (the logs above are 7; the host-cost
# log goes into the archive)
archive="$(cd "$out_dir" && pwd)/results.tgz"
(cd bench/results && tar czf "$archive" kernels-* lora-backward-* *_gpu_host.md host_cost.log 2>/dev/null) || true

echo "== summary (${SECONDS}s of ${budget}s)"
for log in gpu_tests gpu_kernel_tests; do  # the pytest summary, or the counts so far of a cut run
  line=$(grep -h "passed\|failed\|skipped, " "$out_dir/$log.log" | tail -1)
  [ -n "$line" ] || line="cut: $(grep -c " PASSED" "$out_dir/$log.log") passed, $(grep -c " FAILED" "$out_dir/$log.log") failed so far"
  printf '%-17s %s\n' "$log:" "$line"
done
grep -h " FAILED" "$out_dir/gpu_tests.log" "$out_dir/gpu_kernel_tests.log" 2>/dev/null | head -8
sed -n '/^| N |/,/^$/p' "$out_dir/bench_kernels.log"
grep -h "^| .* | sb-lsh-compiled |\|^- \[.*torch.compile" "$out_dir/bench_compiled.log" 2>/dev/null
grep -h "^- \[" "$out_dir/bench_kernels.log" "$out_dir/bench_lora.log" "$out_dir/kernel_configs.log" 2>/dev/null
grep -h " ms " "$out_dir/bench_lora.log" "$out_dir/bench_lora_more.log" 2>/dev/null | grep -v "^|" | tail -14
grep -h "^| 256 | sb-lsh" bench/results/host_cost.log 2>/dev/null
