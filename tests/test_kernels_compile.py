"""Compile every kernel launch for an H100/H200 (sm_90) on the CPU, through Triton's real compiler
(TTIR -> TTGIR -> LLVM -> PTX -> cubin), with the exact arguments the launchers pass.

The interpreter accepts code the compiler rejects (non-constexpr globals, dot shapes under 16,
type mismatches in loops); this catches that without a GPU, and checks that each kernel's shared
memory fits the 227 KiB an sm_90 block may use. The launchers run with a recording stand-in for
each kernel, so no kernel executes here. With a GPU the real launches in test_kernels*.py cover this.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests compile for real")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "tf32": torch.float32}
CASES = ["lsh", "lsh-2-rounds", "local", "lsh-only", "lsh-mha"]  # lsh, lsh-mha: the full-tile kernels


def compile_case(case: str, dtype_name: str) -> list[dict]:
    """Run one case's launchers with recording kernels and compile what they launched (subprocess)."""
    from scatterattn.kernels import offline_compile as oc

    dtype = DTYPES[dtype_name]
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"  # fp32 inputs on TF32 tensor cores
    if case == "chained":  # every launch config: D 64, 128 and 256; fp32 operands with TF32 and IEEE
        recorders = oc.record_chained(dtype)
        extras = [oc.record_chained(dtype, dim=dim, tf32=tf32) for dim in (64, 128, 256) for tf32 in (False, True)]
        for extra in extras:
            for name, rec in extra.items():
                recorders[name].launches += rec.launches
    elif case == "lsh-hash":
        recorders = oc.record_lsh_hash(dtype)
    else:
        recorders = oc.record_scatterbrain(dtype, oc.SCATTERBRAIN_CASES[case])
        if case in ("lsh", "lsh-mha"):  # padding: atomics; none: dk, dv written once
            (launch,) = recorders["full_tile_bwd_dkdv_kernel"].launches
            assert launch[1]["ACCUMULATE"] == (case == "lsh"), launch[1]
    return oc.compile_all(recorders)


PARAMS = [(case, dtype) for case in [*CASES, "chained", "lsh-hash"] for dtype in ("bf16", "fp32")]
PARAMS += [("lsh", "fp16"), ("local", "fp16"), ("lsh", "tf32"), ("lsh-2-rounds", "tf32")]  # own launches, fp16 branches


@pytest.mark.parametrize("case,dtype_name", PARAMS)
def test_kernels_compile_for_sm90(case, dtype_name):
    from scatterattn.kernels.offline_compile import SCATTERBRAIN_CASES, SM90_SHARED_LIMIT

    env = dict(os.environ, TRITON_INTERPRET="0")
    code = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); " \
           f"import test_kernels_compile as t; print(json.dumps(t.compile_case({case!r}, {dtype_name!r})))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in report}
    if case in ("chained", "lsh-hash"):
        expected = 2  # chained: Gram and rows; lsh-hash: norms and XBOX+ hashes
    else:
        # with features: key state, merge, forward, row statistics, query state, dq, dk/dv, and the
        # per-key low-rank backward except on the full-tile path (its dk/dv kernel adds that term)
        expected = 4 if SCATTERBRAIN_CASES[case]["num_features"] == 0 else 7 if case in ("lsh", "lsh-mha") else 8
    assert len(kernels) == expected, report
    for launch in report:  # (the key-state merge and the XBOX+ hashes have no dot or reduction: no shared memory)
        assert 0 <= launch["shared"] <= SM90_SHARED_LIMIT, launch
        assert launch["shared"] > 0 or launch["kernel"] in ("combine_key_state_kernel", "xbox_hash_kernel"), launch


def test_resource_readout_and_warpgroup_mma():
    """The cubin readout that bench/kernel_resources.py reports (registers, spill stack, SASS matrix
    instructions), on the bf16 LSH launches: the Scatterbrain forward's and backward's dots must compile to Hopper's
    warpgroup MMA (HGMMA), not only to the older warp-level HMMA."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = ("import json, torch; from scatterattn.kernels import offline_compile as oc; "
            "recs = oc.record_scatterbrain(torch.bfloat16, oc.SCATTERBRAIN_CASES['lsh'], n=256); "
            "print(json.dumps(oc.compile_all(recs, usage=True)))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = {r["kernel"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    for r in report.values():
        assert 0 < r["registers"] <= 255 and r["spill_stack"] >= 0 and r["local"] >= 0, r
    attention = [name for name in report if name.endswith(("fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel"))]
    assert sorted(attention) == ["full_tile_bwd_dkdv_kernel", "full_tile_bwd_dq_kernel", "full_tile_fwd_kernel"]
    for name in attention:
        assert report[name]["hgmma"] > 0, report[name]
    assert report["key_state_kernel"]["hgmma"] > 0 and report["key_state_kernel"]["hmma"] == 0
    assert report["row_delta_kernel"]["hgmma"] == report["row_delta_kernel"]["hmma"] == 0  # no dot there
