"""A block's q/k/v adapter branch in two Triton kernels, with torch's own dropout masks (train.adapter_kernel).

Why: with q, k and v fused (qkv.py) a block's adapter branch was still ~20 kernels a step: three dropouts that
each write a copy of x and a byte mask, three rank-8 GEMMs reading those copies, three B products over the
whole output, and in the backward three more GEMM pairs, three dropout backwards and three adds into gx.
Here the forward kernel reads x once, draws the three masks, and writes [x | s h] with h = [dropout_q(x) Aq^T |
dropout_k(x) Ak^T | dropout_v(x) Av^T] (rank padded to 8) and the masks as bits (a quarter of the bytes of
torch's bool masks; no dropped copies of x are kept for the backward); one GEMM of [x | s h] with [W | Bblk]
then gives the block's q, k, v outputs with the adapters added (qkv._QKVTriton). The backward kernel reads x,
the bits and gy B once and writes gx and A's gradient. On the H200 (benchmarks/adapter_kernel.py, one ViT-B/16
block, image tokens at batch 32, CUDA-graphed) forward + backward took 266 us against 345 us for the cuBLAS
path; the forward kernel is bound by drawing the masks (three Philox streams: torch's own dropout takes 20 us
for one).

The masks are the ones torch's CUDA dropout would draw from the same generator state. For a contiguous bf16
tensor of n elements (n a multiple of 8, 16-byte aligned), torch's `native_dropout` runs 8 elements per
thread on `threads` = 256 x min(SMs x max_threads_per_SM / 256, ceil(n / 256)) threads: element e belongs to
thread t = (e // 8) % threads in round i = e // (8 threads), and is kept when the uniform float made from
Philox4x32-10 (key = the generator's seed, counter = offset / 4 + 2 i + (e % 8) // 4 in the low 64 bits and t
in the high 64) word (e % 4) is below 1 - p. A call advances the generator's offset by 4 ceil(n / (4
threads)). `layout` computes both; benchmarks/gpu_checks.py --checks adapter_kernel compares the masks with
torch's bit for bit on the GPU, and tests/test_lora_triton.py checks the kernels against a NumPy oracle on the
CPU through Triton's interpreter.

The arithmetic keeps the torch path's (qkv._QKV) roundings where they matter: dropped x rounded to bf16 before
the product, gh, gxd and each of gx's q, k, v updates rounded to bf16 in that order. What differs: the order
of the sums inside the products (tensor-core tiles, not cuBLAS's), s applied to h before its rounding rather
than in the GEMM's epilogue, and the adapter product summed inside the base GEMM; so this is a recipe choice.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from clip_qlora.core.qkv import HW  # h columns per matrix in [x | h] (rank padded: 16-byte aligned GEMM rows)

RP = 16      # the rank as the dot products see it (tl.dot's smallest tile); rows >= r load as zeros
MAX_RANK = HW
RP_C = tl.constexpr(RP)
HW_C = tl.constexpr(HW)
VEC = 8      # bf16 elements per thread and round in torch's vectorised dropout kernel (16 bytes)
_BLOCK = 256  # torch's dropout block size
_2POW32_INV = tl.constexpr(2.3283064365386963e-10)  # curand's uint32 -> (0, 1] float: x 2^-32 + 2^-33
_2POW32_INV_HALF = tl.constexpr(1.1641532182693481e-10)


@functools.lru_cache(maxsize=None)
def _device_shape(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.max_threads_per_multi_processor


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1 before import): the tests run the kernels there."""
    return type(_lora_qkv_forward).__name__ == "InterpretedFunction"  # decided when the kernels were decorated


INTERPRETER_DEVICE = (1, 256)  # (SMs, threads per SM) the layout assumes for tensors on the CPU: small, so
#                                that a test's few thousand elements take several rounds


def layout(n: int, device: torch.device | str | None = None, sms: int | None = None,
           threads_per_sm: int | None = None) -> tuple[int, int]:
    """(threads, offset increment) of torch's CUDA dropout on n elements on `device` (or the given shape)."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if sms is None and dev.type == "cpu":
        sms, threads_per_sm = INTERPRETER_DEVICE
    if sms is None:
        sms, threads_per_sm = _device_shape(dev.index if dev.index is not None else torch.cuda.current_device())
    grid = min(sms * (threads_per_sm // _BLOCK), -(-n // _BLOCK))
    threads = grid * _BLOCK
    increment = ((n - 1) // (_BLOCK * grid * 4) + 1) * 4
    return threads, increment


def usable(x: torch.Tensor, r: int) -> bool:
    """Whether the kernels draw torch's masks for x: the layout above holds for 16-byte aligned contiguous
    bf16 with a multiple of 8 elements (torch picks smaller vectors otherwise)."""
    return (x.dtype == torch.bfloat16 and x.is_contiguous() and x.data_ptr() % 16 == 0 and x.numel() % VEC == 0
            and x.numel() < 2**31 and 0 < r <= MAX_RANK)


@triton.jit
def _dot(a, b, acc, F32_DOT: tl.constexpr):
    """a @ b + acc for bf16 a, b: tensor cores on a GPU; in fp32 under Triton's CPU interpreter, which keeps
    bf16 as raw 16-bit integers and cannot multiply them (the values are the same: products of bf16 are exact)."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _kept(word, p):
    """curand's uniform float of a Philox word (x 2^-32 + 2^-33) below the keep probability."""
    return word.to(tl.float32) * _2POW32_INV + _2POW32_INV_HALF < p


@triton.jit
def _dropped(x, keep, scale):
    """torch's dropout of bf16 x: x * scale rounded to bf16 where kept, else zero."""
    return tl.where(keep, (x.to(tl.float32) * scale).to(tl.bfloat16), 0.0).to(tl.bfloat16)


# The forward's tile is BM rows by 4 G columns, held as four [BM, G] quarters: quarter q has the columns 4 g + q,
# so group g's four elements are one Philox call's four words (one per quarter). A first version kept [BM, G,
# 4] tiles and reshaped them for the dot products: 7x slower on the H200 (the results note of 2026-12-04).


@triton.jit
def _fwd_quarter(x, keep, a_ptr, cols, D, scale, acc, R: tl.constexpr, F32_DOT: tl.constexpr):
    r = tl.arange(0, RP_C)
    at = tl.load(a_ptr + r[None, :] * D + cols[:, None], mask=(r[None, :] < R) & (cols[:, None] < D), other=0.0)
    return _dot(_dropped(x, keep, scale), at.to(tl.bfloat16), acc, F32_DOT)   # [BM, G] @ [G, RP]


@triton.jit
def _fwd_matrix(x0, x1, x2, x3, a_ptr, bits_ptr, seed, counter, thread, rows, row_ok, cols, g_cols, D, p, scale,
                acc, R: tl.constexpr, F32_DOT: tl.constexpr):
    """One matrix's mask for the tile (stored as a nibble per group) and its x_d A^T added to acc."""
    zero = counter * 0
    c0, c1, c2, c3 = tl.philox(seed, counter, zero, thread, zero)
    k0, k1, k2, k3 = _kept(c0, p), _kept(c1, p), _kept(c2, p), _kept(c3, p)
    acc = _fwd_quarter(x0, k0, a_ptr, cols, D, scale, acc, R, F32_DOT)
    acc = _fwd_quarter(x1, k1, a_ptr, cols + 1, D, scale, acc, R, F32_DOT)
    acc = _fwd_quarter(x2, k2, a_ptr, cols + 2, D, scale, acc, R, F32_DOT)
    acc = _fwd_quarter(x3, k3, a_ptr, cols + 3, D, scale, acc, R, F32_DOT)
    nibble = k0.to(tl.uint8) | (k1.to(tl.uint8) << 1) | (k2.to(tl.uint8) << 2) | (k3.to(tl.uint8) << 3)
    tl.store(bits_ptr + rows[:, None] * (D // 4) + g_cols[None, :], nibble,
             mask=row_ok[:, None] & (g_cols[None, :] < D // 4))
    return acc


@triton.jit
def _lora_qkv_forward(x_ptr, aq_ptr, ak_ptr, av_ptr, xa_ptr, bits_ptr, seed_ptr, N, D, LDA, threads, base_q,
                    base_k, base_v, p, scale, lora_scale, R: tl.constexpr, BM: tl.constexpr, G: tl.constexpr,
                    F32_DOT: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < N
    seed = tl.load(seed_ptr)
    acc_q = tl.zeros([BM, RP_C], dtype=tl.float32)
    acc_k = tl.zeros([BM, RP_C], dtype=tl.float32)
    acc_v = tl.zeros([BM, RP_C], dtype=tl.float32)
    plane = N * (D // 4)
    for k0 in range(0, D, 4 * G):
        g_cols = k0 // 4 + tl.arange(0, G)            # group index within the row
        cols = g_cols * 4                              # each group's first column
        ok = row_ok[:, None] & (cols[None, :] < D)
        base = x_ptr + rows[:, None] * D + cols[None, :]
        x0 = tl.load(base, mask=ok, other=0.0)
        x1 = tl.load(base + 1, mask=ok, other=0.0)
        x2 = tl.load(base + 2, mask=ok, other=0.0)
        x3 = tl.load(base + 3, mask=ok, other=0.0)
        copy = xa_ptr + rows[:, None] * LDA + cols[None, :]   # x into the augmented input [x | h]
        tl.store(copy, x0, mask=ok)
        tl.store(copy + 1, x1, mask=ok)
        tl.store(copy + 2, x2, mask=ok)
        tl.store(copy + 3, x3, mask=ok)
        first = rows[:, None] * D + cols[None, :]      # flat index of each group's first element
        vec = first // 8
        rel = (vec // threads) * 2 + (first % 8) // 4  # its Philox counter after the draw's own offset
        thread = (vec % threads).to(tl.uint32)
        acc_q = _fwd_matrix(x0, x1, x2, x3, aq_ptr, bits_ptr, seed, (base_q + rel).to(tl.uint32), thread, rows,
                            row_ok, cols, g_cols, D, p, scale, acc_q, R, F32_DOT)
        acc_k = _fwd_matrix(x0, x1, x2, x3, ak_ptr, bits_ptr + plane, seed, (base_k + rel).to(tl.uint32), thread,
                            rows, row_ok, cols, g_cols, D, p, scale, acc_k, R, F32_DOT)
        acc_v = _fwd_matrix(x0, x1, x2, x3, av_ptr, bits_ptr + 2 * plane, seed, (base_v + rel).to(tl.uint32),
                            thread, rows, row_ok, cols, g_cols, D, p, scale, acc_v, R, F32_DOT)
    c = tl.arange(0, RP_C)
    out = xa_ptr + rows[:, None] * LDA + D + c[None, :]
    ok = row_ok[:, None] & (c[None, :] < HW_C)   # columns r..7 are exact zeros (A's padded rows)
    tl.store(out, (acc_q * lora_scale).to(tl.bfloat16), mask=ok)
    tl.store(out + HW_C, (acc_k * lora_scale).to(tl.bfloat16), mask=ok)
    tl.store(out + 2 * HW_C, (acc_v * lora_scale).to(tl.bfloat16), mask=ok)


@triton.jit
def _backward_one(x, gx, a_ptr, bits_ptr, g_ptr, ga_ptr, rows, cols, col0, row_ok, col_ok, D, LDG, scale,
                  lora_scale, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, F32_DOT: tl.constexpr):
    """One matrix's share of a [BM, BK] tile: gx + dropout_backward(bf16(gh A)) in bf16, and gh^T x_d into the
    partial sums of A's gradient, with gh = bf16(s bf16(gy B)) as torch's path rounds it."""
    byte = tl.load(bits_ptr + rows[:, None] * (D // 4) + (col0 // 4 + tl.arange(0, BK // 4))[None, :],
                   mask=row_ok[:, None], other=0)
    keep = tl.reshape((byte[:, :, None].to(tl.int32) >> tl.arange(0, 4)[None, None, :]) & 1, [BM, BK]) != 0
    r = tl.arange(0, RP_C)
    gh = tl.load(g_ptr + rows[:, None] * LDG + r[None, :], mask=row_ok[:, None] & (r[None, :] < R), other=0.0)
    gh = (gh.to(tl.float32) * lora_scale).to(tl.bfloat16)                            # [BM, RP]
    part = _dot(tl.trans(gh), _dropped(x, keep, scale), tl.zeros([RP_C, BK], dtype=tl.float32), F32_DOT)
    tl.store(ga_ptr + r[:, None] * D + cols[None, :], part, mask=(r[:, None] < R) & col_ok[None, :])
    a = tl.load(a_ptr + r[:, None] * D + cols[None, :], mask=(r[:, None] < R) & col_ok[None, :], other=0.0)
    gxd = _dot(gh, a.to(tl.bfloat16), tl.zeros([BM, BK], dtype=tl.float32), F32_DOT)
    gxd = gxd.to(tl.bfloat16).to(tl.float32)                                        # torch: a bf16 GEMM output
    gxd = tl.where(keep, (gxd * scale).to(tl.bfloat16), 0.0).to(tl.float32)        # native_dropout_backward
    return (gx + gxd).to(tl.bfloat16).to(tl.float32)                                 # gx.add_(gxd) in bf16


@triton.jit
def _lora_qkv_backward(x_ptr, g_ptr, aq_ptr, ak_ptr, av_ptr, bits_ptr, ga_ptr, N, D, LDX, LDG, scale, lora_scale,
                     R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, F32_DOT: tl.constexpr):
    """g = gy [W | B] (N, D + 3 HW): gx in its first D columns (updated in place), gy B after them."""
    pm = tl.program_id(0)
    rows = pm * BM + tl.arange(0, BM)
    col0 = tl.program_id(1) * BK
    cols = col0 + tl.arange(0, BK)
    row_ok = rows < N
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * LDX + cols[None, :], mask=ok, other=0.0)
    gx = tl.load(g_ptr + rows[:, None] * LDG + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    plane = N * (D // 4)
    part = ga_ptr + pm * (3 * R * D)     # this row tile's partial sums of the three A gradients
    gx = _backward_one(x, gx, aq_ptr, bits_ptr, g_ptr + D, part, rows, cols, col0, row_ok, col_ok, D, LDG, scale,
                       lora_scale, R, BM, BK, F32_DOT)
    gx = _backward_one(x, gx, ak_ptr, bits_ptr + plane, g_ptr + D + HW_C, part + R * D, rows, cols, col0, row_ok,
                       col_ok, D, LDG, scale, lora_scale, R, BM, BK, F32_DOT)
    gx = _backward_one(x, gx, av_ptr, bits_ptr + 2 * plane, g_ptr + D + 2 * HW_C, part + 2 * R * D, rows, cols,
                       col0, row_ok, col_ok, D, LDG, scale, lora_scale, R, BM, BK, F32_DOT)
    tl.store(g_ptr + rows[:, None] * LDG + cols[None, :], gx.to(tl.bfloat16), mask=ok)


# tile sizes from benchmarks/adapter_kernel.py on the H200: forward (rows, groups of 4 columns, warps), backward
# (rows, columns, warps)
FWD_TILES = (16, 16, 2)
BWD_TILES = (64, 64, 4)


def forward(x: torch.Tensor, a: list[torch.Tensor], seed: torch.Tensor, offsets: list[int], p: float,
            threads: int, lora_scale: float, tiles: tuple[int, int, int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented input xa = [x | h] (N, D + 3 HW) bf16, h[:, j HW:j HW + r] = s dropout_j(x) A_j^T rounded
    once, and the masks as bits (3, N, D / 4): bit q of byte g is element 4 g + q. `xa @ [W | B]^T` is then
    the block's q, k, v output with the adapters added, in one GEMM.

    x: (N, D) bf16; a: the three (r, D) fp32 parameters; seed: a one-element int64 device tensor (the block
    generator's seed); offsets: each matrix's generator offset (torch's, in Philox values); threads: `layout`."""
    n, d = x.shape
    r = a[0].shape[0]
    xa = torch.empty(n, d + 3 * HW, dtype=torch.bfloat16, device=x.device)
    bits = torch.empty(3, n, d // 4, dtype=torch.uint8, device=x.device)
    keep = 1.0 - p
    bm, g, warps = tiles or FWD_TILES
    _lora_qkv_forward[(triton.cdiv(n, bm),)](
        x, *a, xa, bits, seed, n, d, d + 3 * HW, threads, *(o // 4 for o in offsets), keep, 1.0 / keep, lora_scale,
        R=r, BM=bm, G=g, F32_DOT=interpreting(), num_warps=warps)
    return xa, bits


def backward(xa: torch.Tensor, bits: torch.Tensor, g: torch.Tensor, a: list[torch.Tensor], p: float,
             lora_scale: float, tiles: tuple[int, int, int] | None = None) -> list[torch.Tensor]:
    """g = gy [W | B] (N, D + 3 HW): its first D columns become gx (the three dropout_j-masked gh_j A_j added,
    q, k, v in turn, in place), with gh = s g[:, D:]. Returns A's three gradients (r, D), fp32 holding the
    bf16 values torch's bf16 GEMM would give. xa: forward's augmented input (its first D columns are x)."""
    n, width = xa.shape
    d = width - 3 * HW
    r = a[0].shape[0]
    bm, bk, warps = tiles or BWD_TILES
    row_tiles = triton.cdiv(n, bm)
    partial = torch.empty(row_tiles, 3, r, d, dtype=torch.float32, device=xa.device)
    _lora_qkv_backward[(row_tiles, triton.cdiv(d, bk))](
        xa, g, *a, bits, partial, n, d, xa.stride(0), g.stride(0), 1.0 / (1.0 - p), lora_scale, R=r, BM=bm, BK=bk,
        F32_DOT=interpreting(), num_warps=warps)
    ga = partial.sum(0).to(torch.bfloat16).to(torch.float32)
    return list(ga.unbind(0))
