#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: GPU tests, kernel benchmark, chained-gradient benchmark,
# compiled-kernel tests, torch.compile timing, launch configurations, within one time budget (the
# device tool allows 600 s per call).
#   GPU_CHECK_COMMIT=<commit> bash bench/gpu_check.sh     (results under bench/results/; logs and
#                                                          results.tgz to $OUT when set)
#   GPU_CHECK_BUDGET=900 bash bench/gpu_check.sh          (seconds for the whole script; default 560)
#   GPU_CHECK_STAGES="kernel-tests configs" bash bench/gpu_check.sh   (only these stages, e.g. a second
#                                                          call for the stages a first one cut or skipped)
# With 15 minutes of device time: a first call with the default budget (timeout_s 600) runs host,
# tests, bench, lora and lora-more and starts kernel-tests; a second one, GPU_CHECK_BUDGET=200
# GPU_CHECK_STAGES="compiled configs" (or what the first skipped), if the time left allows.
# Stages (in order of importance): host tests bench lora lora-more kernel-tests compiled configs.
# Each is capped and cut to the time left, so a slow stage cannot starve the summary; every stage's
# log is written as it runs (a cut stage keeps its partial lines). GPU_CHECK_COMMIT names the commit
# in the reports where the tree has no .git (the device machine gets a copy of the working tree).
# Prints a short table last and saves it, with the provenance, in the archive.
# Needs torch with CUDA, triton, pytest; matplotlib for the plots.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out_dir=${OUT:-bench/results}
budget=${GPU_CHECK_BUDGET:-560}
stages=" ${GPU_CHECK_STAGES:-host tests bench lora lora-more kernel-tests compiled configs} "
mkdir -p "$out_dir" bench/results
# install without touching the environment's torch/triton; fall back to a link for scatterattn.kernels
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  [ -e scatterattn/kernels ] || ln -s ../kernels scatterattn/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo "${GPU_CHECK_COMMIT:-unknown}")
export GPU_CHECK_COMMIT=${GPU_CHECK_COMMIT:-$commit}  # for the reports' headers (bench/provenance.py)
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: $commit (stages:$stages budget ${budget}s)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  python3 -c "import torch, triton; b = torch.backends.cuda; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), '| SDPA backends enabled: cudnn', b.cudnn_sdp_enabled(), 'flash', b.flash_sdp_enabled(), 'mem_efficient', b.mem_efficient_sdp_enabled())"
} | tee bench/results/provenance.txt

stage() {  # stage KEY NAME CAP_SECONDS LOG COMMAND...: run with timeout min(CAP, time left - 15 s reserve)
  local key=$1 name=$2 cap=$3 log=$4
  shift 4
  [[ $stages == *" $key "* ]] || return 0
  local t=$((budget - SECONDS - 15))
  ((t > cap)) && t=$cap
  if ((t < 40 && t < cap)); then  # too little left to be worth starting: leave it to a second call
    echo "== $name [$key]: skipped, ${budget}s budget spent (${t}s left)" | tee "$log"
    return
  fi
  echo "== $name [$key] (up to ${t}s)"
  timeout -k 10 "$t" "$@" >"$log" 2>&1
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "   cut at ${t}s (partial log kept)"
  echo "   exit $rc, ${SECONDS}s elapsed"
}

# first, while nothing else runs on the CPU: host cost (launches stubbed; Triton's argument binding)
stage host "host cost on this machine's CPU" 30 bench/results/host_cost.log \
  bash -c "python3 bench/host_overhead.py --seq-lens 256 --out bench/results/host_overhead_gpu_host.md;
           TRITON_INTERPRET=0 python3 bench/launch_binding.py --out bench/results/launch_binding_gpu_host.md"
stage tests "GPU tests: bf16, 64k tokens, chained-gradient kernels, autocast" 140 "$out_dir/gpu_tests.log" \
  python3 -m pytest tests/test_kernels_gpu.py tests/test_lora.py tests/test_autocast.py -v -p no:cacheprovider -k "gpu or kernel or bf16 or 64k or memory"
stage bench "Scatterbrain kernel benchmark" 170 "$out_dir/bench_kernels.log" python3 bench/kernels.py --out bench/results --budget 110
stage lora "chained low-rank gradient benchmark" 60 "$out_dir/bench_lora.log" python3 bench/lora_backward.py --out bench/results
stage lora-more "chained gradient: m 128 at 64k (the 10x question), causal at 8k and 64k" 45 "$out_dir/bench_lora_more.log" \
  bash -c "python3 bench/lora_backward.py --out bench/results --features 128 --seq-lens 65536;
           python3 bench/lora_backward.py --out bench/results --causal --seq-lens 8192 65536"
stage kernel-tests "interpreter-shape kernel tests, compiled" 60 "$out_dir/gpu_kernel_tests.log" \
  python3 -m pytest tests/test_kernels.py -v -p no:cacheprovider
stage compiled "SB-LSH under torch.compile (reduce-overhead) at 4k and 1k" 80 "$out_dir/bench_compiled.log" \
  python3 bench/kernels.py --seq-lens 1024 4096 --methods sdpa sb-lsh sb-lsh-compiled --compiled \
    --no-profile --no-graphs --budget 45 --tag compiled --out bench/results
stage configs "launch configurations (N 16k)" 50 "$out_dir/kernel_configs.log" python3 bench/kernel_configs.py

summary() {
  echo "== summary (${SECONDS}s of ${budget}s; commit $commit)"
  for log in gpu_tests gpu_kernel_tests; do  # the pytest summary, or the counts so far of a cut run
    [ -f "$out_dir/$log.log" ] || continue
    line=$(grep -hE "^=+ .*(passed|failed|error|no tests ran).* in [0-9.]+s" "$out_dir/$log.log" | tail -1)
    [ -n "$line" ] || line="cut: $(grep -c " PASSED" "$out_dir/$log.log") passed, $(grep -c " FAILED\| ERROR" "$out_dir/$log.log") failed so far"
    printf '%-17s %s\n' "$log:" "$line"
  done
  grep -h " FAILED\| ERROR" "$out_dir/gpu_tests.log" "$out_dir/gpu_kernel_tests.log" 2>/dev/null | head -8
  sed -n '/^| N |/,/^$/p' "$out_dir/bench_kernels.log" 2>/dev/null
  grep -h " skipped: time budget\| failed: " "$out_dir/bench_kernels.log" 2>/dev/null | head -6
  grep -h "^| .* | sb-lsh-compiled |\|^N=.*sb-lsh-compiled\|^- \[.*torch.compile" "$out_dir/bench_compiled.log" 2>/dev/null
  grep -h "^- \[" "$out_dir/bench_kernels.log" "$out_dir/kernel_configs.log" 2>/dev/null
  for log in bench_lora bench_lora_more; do  # each chained-gradient run: its rows and targets, labelled
    [ -f "$out_dir/$log.log" ] || continue
    echo "-- $log"
    grep -h "^N=.* ms \|^N=.*failed\|^- \[" "$out_dir/$log.log"
  done
  grep -h "^| 256 | sb-lsh" bench/results/host_cost.log 2>/dev/null
}
summary | tee bench/results/summary.txt
# one archive: the device tool returns at most 8 files from $OUT (the logs above are 7; the host-cost
# log, the provenance and the summary go into the archive)
archive="$(cd "$out_dir" && pwd)/results.tgz"
(cd bench/results && tar czf "$archive" kernels-* lora-backward-* *_gpu_host.md host_cost.log provenance.txt \
  summary.txt 2>/dev/null) || true
