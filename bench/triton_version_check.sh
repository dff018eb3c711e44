#!/usr/bin/env bash
# Check the kernels against another Triton release on a CPU-only machine (default 3.6.0, the
# release on the project's GPU machine): in a throw-away venv with torch 2.13 (CPU) and that triton,
# compile every kernel launch to sm_90 cubin (tests/test_kernels_compile.py) and run the
# interpreter tests (kernels against the reference, chained-gradient kernels).
#   bash bench/triton_version_check.sh [TRITON_VERSION] [VENV_DIR]
# triton 3.6's interpreter converts size-1 arrays with int(), which NumPy >= 2.3 refuses
# ("only 0-dimensional arrays can be converted to Python scalars"), so the venv pins numpy < 2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.6.0}
venv=${2:-/tmp/scatterattn-triton-$version}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==2.13.0" "triton==$version" "numpy<2.3" pytest pytest-benchmark
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/pip" install -q einops
"$venv/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
TRITON_CACHE_DIR="$venv/triton-cache" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_kernels_compile.py tests/test_kernels.py tests/test_lora.py -k "not lora or kernel"
