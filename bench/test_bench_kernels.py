"""pytest-benchmark entry for the kernels (GPU only):  pytest bench/test_bench_kernels.py --benchmark-enable
bench/kernels.py is the full sweep (table, plot, targets); this runs the same calls under pytest-benchmark."""

import pytest
import torch

import scatterattn as sa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")


def _inputs(n, backward):
    shape = (1, 16, n, 64)
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(3)]


def _run(fn, q, k, v, backward):
    out = fn(q, k, v)
    if backward:
        out.sum().backward()
    torch.cuda.synchronize()


@pytest.mark.parametrize("n", [1024, 4096, 16384, 65536])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", ["sb-lsh", "sdpa"])
def test_attention_speed(benchmark, method, n, backward):
    q, k, v = _inputs(n, backward)
    if method == "sdpa":
        fn = torch.nn.functional.scaled_dot_product_attention
    else:
        fn = sa.ScatterbrainAttention(64, num_features=256, bucket_size=128, seed=0, backend="triton").cuda()
    _run(fn, q, k, v, backward)  # compile
    benchmark(_run, fn, q, k, v, backward)
