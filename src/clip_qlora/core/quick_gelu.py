"""QuickGELU, x * sigmoid(1.702 x) (OpenAI CLIP's activation), as one Triton kernel each way (training, GPU).

Why: open_clip's QuickGELU is three elementwise kernels forward (1.702 x, the sigmoid, the product) and five
backward, each a full pass over the MLP's [tokens, 4 d] hidden tensor, and autograd keeps the sigmoid for the
backward. On the H200 at batch 32 the study's ViT-B/16 step took 12.6 ms and peaked at 2.26 GiB for lora with
QuickGELU, against 11.1 ms and 1.73 GiB with exact GELU (one kernel each way, nothing extra kept;
benchmarks/results/2026-12-04-nvidia-h200-activation-*.json). Here the forward reads x and writes y once, the
backward reads x and gy and writes gx once, and only x is kept: the backward recomputes the sigmoid.

The arithmetic is torch's CUDA arithmetic for those eight kernels, rounding for rounding: each kernel computes
in fp32 from bf16 operands and rounds its result to bf16 (to nearest, ties to even), except torch's CUDA
sigmoid backward, which for bf16 is written in bf16 operations and so rounds after each of them:

    forward   t = bf16(1.702 x)   s = bf16(1 / (1 + exp(-t)))   y = bf16(x s)
    backward  gs = bf16(gy x)   gt = bf16(bf16(gs bf16(1 - s)) s)   gx = bf16(bf16(gy s) + bf16(1.702 gt))

with exp the CUDA math library's expf (libdevice) and the division correctly rounded (torch is built without
fast math). (torch's CPU sigmoid backward rounds once, in fp32: the same inputs can give other gradient bits on
a CPU; the kernels follow the GPU, where they run.) benchmarks/gpu_checks.py --checks quick_gelu compares both
kernels with open_clip's module on the GPU for every finite bf16 input; tests/test_quick_gelu.py checks them on
the CPU under Triton's interpreter against NumPy. The rounding to bf16 is written out in integer arithmetic:
the interpreter's own cast truncates.
`runtime.fused_activation` chooses it (bitwise the same numbers: a runtime knob, not a recipe change).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 2048  # elements per program: 16-byte loads and stores per thread at 4 warps (bandwidth-bound kernels)
WARPS = 4
# fp32 multiply-add contraction off: torch's kernels round every product they write, and no add of ours may
# absorb an unrounded product (exp's last multiply into 1 + exp(-t) included)
FP_FUSION = False


@triton.jit
def _bf16(v):
    """v rounded to the nearest bf16 (ties to even), as fp32; NaN stays NaN (torch's float -> bf16 cast)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))


@triton.jit
def _sigmoid_scaled(x, LIBDEVICE: tl.constexpr):
    """bf16(sigmoid(bf16(1.702 x))) for fp32 x holding bf16 values: torch's mul by a scalar, then sigmoid.
    LIBDEVICE: the CUDA math library's expf, as torch's kernel calls it (tl.exp is a faster approximation);
    the CPU interpreter has no libdevice and takes NumPy's exp instead."""
    t = _bf16(x * 1.702)
    e = libdevice.exp(-t) if LIBDEVICE else tl.exp(-t)
    return _bf16(tl.math.div_rn(tl.full(t.shape, 1.0, tl.float32), 1.0 + e))


@triton.jit
def _quick_gelu_forward(x_ptr, y_ptr, n, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = _bf16(x * _sigmoid_scaled(x, LIBDEVICE))
    tl.store(y_ptr + offs, y.to(tl.bfloat16), mask=ok)


@triton.jit
def _quick_gelu_backward(x_ptr, gy_ptr, gx_ptr, n, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = _sigmoid_scaled(x, LIBDEVICE)
    direct = _bf16(gy * s)                        # d(x s)/dx
    gs = _bf16(gy * x)                            # d(x s)/ds
    gt = _bf16(_bf16(gs * _bf16(1.0 - s)) * s)     # sigmoid's backward, from its output, in bf16 operations
    gx = _bf16(direct + _bf16(gt * 1.702))        # autograd sums x's two gradients in bf16
    tl.store(gx_ptr + offs, gx.to(tl.bfloat16), mask=ok)


def _launch(kernel, *tensors: torch.Tensor) -> None:
    n = tensors[0].numel()
    if interpreting():  # the interpreter takes no compiler options
        kernel[(triton.cdiv(n, BLOCK),)](*tensors, n, BLOCK=BLOCK, LIBDEVICE=False)
    else:
        kernel[(triton.cdiv(n, BLOCK),)](*tensors, n, BLOCK=BLOCK, LIBDEVICE=True, num_warps=WARPS,
                                         enable_fp_fusion=FP_FUSION)


def forward(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _launch(_quick_gelu_forward, x, y)
    return y


def backward(x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    gx = torch.empty_like(x)
    _launch(_quick_gelu_backward, x, gy.contiguous(), gx)
    return gx


class _QuickGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)  # only x: the backward recomputes the sigmoid (open_clip's keeps it too)
        return forward(x)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        return backward(x, gy)


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1 before import): the tests run the kernels there."""
    return type(_quick_gelu_forward).__name__ == "InterpretedFunction"


def usable(x: torch.Tensor) -> bool:
    """Where the kernels give torch's numbers: contiguous bf16 (their roundings are bf16's), on a GPU."""
    return x.dtype == torch.bfloat16 and x.is_contiguous() and (x.is_cuda or interpreting())


class FusedQuickGELU(nn.Module):
    """Drop-in for open_clip's QuickGELU: the kernels where `usable`, open_clip's expression elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if usable(x):
            return _QuickGELU.apply(x)
        return x * torch.sigmoid(1.702 * x)


def fuse(clip: nn.Module) -> int:
    """Replace every block's open_clip QuickGELU in both towers by FusedQuickGELU (training). Exact GELU models
    keep theirs (torch's GELU is one kernel each way already). Returns how many were replaced."""
    from open_clip.transformer import QuickGELU

    n = 0
    for tower in (clip.visual, clip):
        for block in tower.transformer.resblocks:
            if type(block.mlp.gelu) is QuickGELU:
                block.mlp.gelu = FusedQuickGELU()
                n += 1
    return n
