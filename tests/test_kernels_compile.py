"""The project's Triton kernels compile for the GPU the study runs on (sm_90: H100/H200), with the constants and
tile sizes the code launches them with, on a machine without a GPU.

Why: CI has no GPU, and Triton's CPU interpreter (tests/lora_triton_cases.py, tests/quick_gelu_cases.py) runs
the kernels' Python, not their compilation; what only a GPU build takes (quick_gelu's libdevice branch, tensor
core dot layouts, register allocation) would otherwise first fail on a GPU. Triton compiles for a named target
with the ptxas its wheel ships, so every stage down to the cubin runs here. The resource usage
(registers, spill stack, static SASS instruction count) is printed for the record, not asserted: whether a spill costs time is measured on
the GPU (benchmarks/adapter_kernel.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from clip_qlora.core import lora_triton as lt
from clip_qlora.core import quick_gelu as qg

TARGET = GPUTarget("cuda", 90, 32)  # Hopper: the study's H200
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

# argument types as the wrappers pass them (tensors by dtype; Python ints that fit 32 bits and floats)
_ADAPTER_IN = dict(x_ptr="*bf16", aq_ptr="*fp32", ak_ptr="*fp32", av_ptr="*fp32", xa_ptr="*bf16", bits_ptr="*u8",
                   seed_ptr="*i64", N="i32", D="i32", LDA="i32")


def _cases():
    bm, g, warps = lt.FWD_TILES
    yield ("lora_triton forward", lt._lora_qkv_forward,
           {**_ADAPTER_IN, "threads": "i32", "base_q": "i32", "base_k": "i32", "base_v": "i32", "p": "fp32",
            "scale": "fp32", "lora_scale": "fp32"},
           dict(R=2, BM=bm, G=g, F32_DOT=False), {"num_warps": warps})
    bm, bk, warps = lt.BWD_TILES
    yield ("lora_triton backward", lt._lora_qkv_backward,
           dict(x_ptr="*bf16", g_ptr="*bf16", aq_ptr="*fp32", ak_ptr="*fp32", av_ptr="*fp32", bits_ptr="*u8",
                ga_ptr="*fp32", N="i32", D="i32", LDX="i32", LDG="i32", scale="fp32", lora_scale="fp32"),
           dict(R=2, BM=bm, BK=bk, F32_DOT=False), {"num_warps": warps})
    options = {"num_warps": qg.WARPS, "enable_fp_fusion": qg.FP_FUSION}
    yield ("quick_gelu forward", qg._quick_gelu_forward, dict(x_ptr="*bf16", y_ptr="*bf16", n="i64"),
           dict(BLOCK=qg.BLOCK, LIBDEVICE=True), options)
    yield ("quick_gelu backward", qg._quick_gelu_backward, dict(x_ptr="*bf16", gy_ptr="*bf16", gx_ptr="*bf16", n="i64"),
           dict(BLOCK=qg.BLOCK, LIBDEVICE=True), options)


@pytest.mark.parametrize("name,kernel,signature,constants,options",
                         [pytest.param(*case, id=case[0].replace(" ", "-")) for case in _cases()])
def test_compiles_for_sm90(name, kernel, signature, constants, options):
    assert not lt.interpreting() and not qg.interpreting(), "compiled kernels are wanted here, not interpreted"
    source = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constants}},
                       constexprs=constants)
    compiled = triton.compile(source, target=TARGET, options=options)
    cubin = compiled.asm["cubin"]
    assert cubin[:4] == b"\x7fELF"  # a device binary, not just PTX
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    assert compiled.metadata.target.arch == 90 and f"Function {kernel.__name__}:" in usage and "REG:" in usage
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))  # static count, one program
    assert instructions > 0
    print(name, usage.strip().splitlines()[-1].split("CONSTANT")[0].strip(), f"SASS:{instructions}")
