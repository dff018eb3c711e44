#!/usr/bin/env bash
# Check the kernels against another Triton (and torch) release on a CPU-only machine (default
# triton 3.6.0, the release on the project's GPU machine): in a throw-away venv with that triton,
# compile every kernel launch to sm_90 cubin (tests/test_kernels_compile.py) and run the
# interpreter tests (kernels against the reference, chained-gradient kernels).
#   bash bench/triton_version_check.sh [TRITON_VERSION] [VENV_DIR]
#   TORCH_VERSION=2.11.0 FULL=1 bash bench/triton_version_check.sh 3.6.0 /tmp/venv-gpu-versions
# TORCH_VERSION (default 2.13.0, the CPU build): 2.11.0 is the GPU machine's torch; pip has only its
# CUDA build (about 5 GB installed with its NVIDIA libraries), which runs on a CPU-only machine too.
# FULL=1 installs the test extra and runs the whole suite, integrations included.
# triton 3.6's interpreter converts size-1 arrays with int(), which NumPy >= 2.3 refuses
# ("only 0-dimensional arrays can be converted to Python scalars"), so the venv pins numpy < 2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.6.0}
venv=${2:-/tmp/scatterattn-triton-$version}
torch_version=${TORCH_VERSION:-2.13.0}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ "${FULL:-0}" = 1 ]; then
  "$venv/bin/pip" install -q "torch==$torch_version" "triton==$version" "numpy<2.3" -e ".[test]"
  tests=(tests)
  select=()
else
  "$venv/bin/pip" install -q "torch==$torch_version" "triton==$version" "numpy<2.3" pytest pytest-benchmark
  "$venv/bin/pip" install -q --no-deps -e .
  "$venv/bin/pip" install -q einops
  tests=(tests/test_kernels_compile.py tests/test_kernels.py tests/test_lora.py)
  select=(-k "not lora or kernel")
fi
"$venv/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
TRITON_CACHE_DIR="$venv/triton-cache" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" "${select[@]}"
