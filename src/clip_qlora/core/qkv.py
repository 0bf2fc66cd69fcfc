"""A block's q, k and v projections with their LoRA adapters as one autograd function (training only).

Why: PEFT runs each adapted projection as its own module: base GEMM, dropout, x @ A^T, (.) @ B^T, scale, add.
At CLIP-LoRA's rank 2 the adapter GEMMs have 2-element (4-byte) rows, which cuBLAS can only serve with its
slowest alignment-1/2 kernels: on the H200 they took about 5 ms of a 15 ms ViT-B/16 step for 0.01 TFLOP of
work (benchmarks/results/2026-12-04-nvidia-h200-step.md). Here, per block:

- the three frozen base projections are one GEMM against the stacked [3d, d] weight (a bf16 base's q, k, v
  weights become views of that one tensor; an NF4 base's three 4-bit weights become views of one 4-bit tensor,
  dequantized in one call, the same values bitsandbytes would give each);
- each adapter computes at a rank padded to a multiple of 8 (zero rows of A, zero columns of B, built each
  call from the rank-r parameters): every product has 16-byte rows, and the padding adds exact zeros only;
- the B products add straight into the base output (GEMM epilogue, scale as alpha), no separate scale/add.

The mathematics is PEFT's LoRA: y_j = x W_j^T + b_j + s * B_j A_j dropout_j(x), one dropout mask per matrix,
drawn in PEFT's order (q, k, v) by the same kernel from the same generator, so every mask is today's. What
differs is the order of floating-point operations (GEMM kernels, one rounding fewer on the adapter branch):
the parameters are still PEFT's rank-r tensors, saved in PEFT's format. `train.fused_qkv` chooses it.

On a GPU, `train.adapter_kernel: triton` runs the adapter branch in two Triton kernels instead (lora_triton.py:
x read once, the three masks drawn there as torch draws them, kept as bits); `torch` keeps `_QKV` below.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

log = logging.getLogger(__name__)

ALIGN = 8  # bf16 elements per 16 bytes: cuBLAS's fast kernels want leading dimensions that are multiples
HW = ALIGN  # the Triton path's adapter columns per matrix in [x | h] and [W | Bblk] (lora_triton reads it)


def _padded(r: int) -> int:
    return -(-r // ALIGN) * ALIGN


class _QKV(torch.autograd.Function):
    """y = [x Wq^T + bq | x Wk^T + bk | x Wv^T + bv] + s * [dq(x) Aq^T Bq^T | ...], x: (N, d), y: (N, 3d)."""

    @staticmethod
    def forward(ctx, x, proj, *lora):
        a, b = lora[:3], lora[3:]
        w = proj.weight()
        n, d = x.shape
        r, rp = a[0].shape[0], _padded(a[0].shape[0])
        dt = w.dtype
        # padded copies in the compute dtype: rows of A / columns of B beyond r are zero
        a8 = F.pad(torch.stack(a), (0, 0, 0, rp - r)).to(dt)            # (3, rp, d)
        b8 = F.pad(torch.stack(b), (0, rp - r)).to(dt)                   # (3, d, rp)
        y = torch.addmm(proj.bias, x, w.t()) if proj.bias is not None else x @ w.t()
        dropped, masks, hs = [], [], []
        for j in range(3):  # q, k, v: PEFT's order, so the dropout generator hands out the same masks
            if proj.p > 0:
                xd, m = torch.native_dropout(x, proj.p, True)
            else:
                xd, m = x, None
            h = xd @ a8[j].t()                                           # (N, rp), columns >= r are zero
            y[:, j * d:(j + 1) * d].addmm_(h, b8[j].t(), alpha=proj.scale)
            dropped.append(xd), masks.append(m), hs.append(h)
        ctx.proj, ctx.r, ctx.dt = proj, r, a[0].dtype
        ctx.save_for_backward(a8, b8, *dropped, *hs, *[m for m in masks if m is not None])
        return y

    @staticmethod
    def backward(ctx, gy):
        proj, r = ctx.proj, ctx.r
        a8, b8, *rest = ctx.saved_tensors
        dropped, hs, masks = rest[:3], rest[3:6], rest[6:]
        d = a8.shape[-1]
        gy = gy.contiguous()
        gx = gy @ proj.weight()
        ga, gb = [], []
        for j in range(3):
            gyj = gy[:, j * d:(j + 1) * d]
            gb.append((gyj.t() @ hs[j])[:, :r].mul(proj.scale).to(ctx.dt))
            gh = (gyj @ b8[j]).mul_(proj.scale)                           # (N, rp)
            ga.append((gh.t() @ dropped[j])[:r].to(ctx.dt))
            gxd = gh @ a8[j]
            if masks:
                gxd = torch.ops.aten.native_dropout_backward(gxd, masks[j], 1.0 / (1.0 - proj.p))
            gx.add_(gxd)
        return (gx, None, *ga, *gb)


class _QKVTriton(torch.autograd.Function):
    """`_QKV` with the adapter branch in lora_triton's kernels: the same masks, products and rounding points
    but for the order of the sums.

    Forward: one kernel draws the masks and writes xa = [x | s h], h = [dq(x) Aq^T | dk(x) Ak^T | dv(x) Av^T]
    at rank padded to 8; one GEMM y = xa [W | Bblk]^T + b then gives the base and adapter outputs together
    (Bblk: the three B's on a block diagonal). Backward: one GEMM g = gy [W | Bblk] gives gx's base part and
    gy B; one kernel adds the masked s (gy B) A into gx and sums A's gradients; B's gradients are the diagonal
    blocks of gy^T (s h).
    """

    @staticmethod
    def forward(ctx, x, proj, seed, threads, offsets, *lora):
        from clip_qlora.core import lora_triton as lt

        a, b = lora[:3], lora[3:]
        wa = proj.augmented(b)
        xa, bits = lt.forward(x, a, seed, offsets, proj.p, threads, proj.scale)
        y = torch.addmm(proj.bias, xa, wa.t()) if proj.bias is not None else xa @ wa.t()
        ctx.proj, ctx.r = proj, a[0].shape[0]
        ctx.save_for_backward(xa, bits, *a, *b)
        return y

    @staticmethod
    def backward(ctx, gy):
        from clip_qlora.core import lora_triton as lt

        proj, r = ctx.proj, ctx.r
        xa, bits, *lora = ctx.saved_tensors
        a, b = lora[:3], lora[3:]
        d = xa.shape[1] - 3 * lt.HW
        gy = gy.contiguous()
        g = gy @ proj.augmented(b)                                       # (N, d + 3 HW): [gx | gy B]
        gbs = gy.t() @ xa[:, d:]                                         # (3d, 3 HW): B's gradients on the diagonal
        gb = [gbs[j * d:(j + 1) * d, j * lt.HW:j * lt.HW + r].to(a[0].dtype) for j in range(3)]
        ga = lt.backward(xa, bits, g, a, proj.p, proj.scale)
        return (g[:, :d], None, None, None, None, *ga, *gb)


class FusedQKV:
    """What `_QKV` needs of one SplitAttention whose q_proj, k_proj and v_proj are PEFT LoRA layers.

    A plain object, not a module: the parameters stay where PEFT put them (state dicts, saving, the optimizer
    see nothing new); this only holds references to them and the stacked frozen weight.
    """

    def __init__(self, attn: nn.Module, adapter: str = "default", kernel: str = "torch"):
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.adapter = adapter
        self.kernel = kernel  # train.adapter_kernel: triton where it can run (a GPU, or Triton's interpreter)
        self._mods = mods
        drop = mods[0].lora_dropout[adapter]
        self.p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        self.scale = float(mods[0].scaling[adapter])
        if any(float(m.scaling[adapter]) != self.scale or _drop_p(m, adapter) != self.p for m in mods):
            raise ValueError("train.fused_qkv needs the same adapter settings on q, k and v")
        bases = [m.get_base_layer() for m in mods]
        self.quantized = getattr(bases[0].weight, "quant_state", None) is not None  # bitsandbytes Params4bit
        biases = [l.bias for l in bases]
        self.bias = None if biases[0] is None else torch.cat([t.detach() for t in biases])
        if self.quantized:
            self._bases = bases
            self._packed = _stack_4bit(bases)
        else:  # the three weights become views of one stacked tensor: no second copy of the base
            stacked = torch.cat([l.weight.detach() for l in bases])
            d = bases[0].out_features
            for j, l in enumerate(bases):
                l.weight = nn.Parameter(stacked[j * d:(j + 1) * d], requires_grad=False)
            self._stacked = stacked
        if self.bias is not None:
            d = bases[0].out_features
            for j, l in enumerate(bases):
                l.bias = nn.Parameter(self.bias[j * d:(j + 1) * d], requires_grad=False)

    def weight(self) -> torch.Tensor:
        if not self.quantized:
            return self._stacked
        from bitsandbytes.functional import dequantize_4bit

        if self._packed is not None:  # the three weights as one 4-bit tensor: one dequantization
            return dequantize_4bit(*self._packed)
        first = self._bases[0]
        if first.weight.device.type != "cuda":  # bitsandbytes has no CPU kernel that writes into a buffer
            return torch.cat([dequantize_4bit(l.weight.data, l.weight.quant_state) for l in self._bases])
        d_out, d_in = first.out_features, first.in_features
        out = torch.empty(3 * d_out, d_in, dtype=first.weight.quant_state.dtype, device=first.weight.device)
        for j, l in enumerate(self._bases):  # what bitsandbytes' matmul dequantizes, into one buffer
            dequantize_4bit(l.weight.data, l.weight.quant_state, out=out[j * d_out:(j + 1) * d_out])
        return out

    def augmented(self, b: list[torch.Tensor]) -> torch.Tensor:
        """[W | Bblk] (3d, d_in + 3 HW) in the compute dtype: the stacked base weight, then B_q, B_k, B_v (cast
        as torch's path casts them) in columns j HW .. j HW + r of the last 3 HW, zero elsewhere.

        Built for each use, not kept: a kept one would hold 3 HW columns of zeros per block for good (2 MiB on
        ViT-B/16), counted in the frozen bytes the study compares between arms; the copy costs ~2 us."""
        w = self.weight()
        d, d_in = w.shape[0] // 3, w.shape[1]
        out = torch.empty(w.shape[0], d_in + 3 * HW, dtype=w.dtype, device=w.device)
        out[:, :d_in] = w
        out[:, d_in:] = 0
        for j in range(3):
            out[j * d:(j + 1) * d, d_in + j * HW:d_in + j * HW + b[j].shape[1]] = b[j]
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        w_dtype = self._bases[0].weight.quant_state.dtype if self.quantized else self._stacked.dtype
        lora = [m.lora_A[self.adapter].weight for m in self._mods] + [m.lora_B[self.adapter].weight
                                                                        for m in self._mods]
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit inside
            x2 = x2.to(w_dtype)
            triton_args = self._triton_args(x2, lora[0].shape[0])
            y = _QKVTriton.apply(x2, self, *triton_args, *lora) if triton_args else _QKV.apply(x2, self, *lora)
        return y.view(*shape[:-1], y.shape[-1])

    def _triton_args(self, x: torch.Tensor, r: int):
        """(seed, threads, offsets) for the Triton path, or None where `_QKV` runs: no dropout, no block
        generator drawing now, an input torch would draw for in another layout, or no GPU to run on."""
        if self.kernel != "triton" or self.p == 0:
            return None
        from clip_qlora.core import blocks
        try:
            from clip_qlora.core import lora_triton as lt
        except ImportError as e:  # a torch build without Triton: the same masks through the torch path
            log.warning("train.adapter_kernel triton: Triton cannot be imported (%s); running the torch kernels", e)
            self.kernel = "torch"
            return None

        draws = blocks.current()
        if draws is None or draws.seed is None or not lt.usable(x, r) or not (x.is_cuda or lt.interpreting()):
            return None
        threads, increment = lt.layout(x.numel(), x.device)
        return draws.seed, threads, [draws.take(increment) for _ in range(3)]  # q, k, v: torch's order


def _stack_4bit(bases: list) -> tuple | None:
    """q, k and v's 4-bit weights as one (packed data, QuantState) of the stacked [3d, d] weight, or None where
    they cannot be stacked exactly; the three Params4bit then hold views of it (no second copy).

    A 4-bit weight is its row-major values in blocks of `blocksize`, each with its absmax. When every weight
    has a whole number of blocks and plain fp32 absmax (no double quantization left: quant.expand_absmax), the
    concatenated packed bytes and absmax are exactly the stacked weight's: one dequantization launch gives the
    values the three did (from the H200 profile: 408 dequantization launches per qlora_gc step, 4.7 us each).
    """
    from bitsandbytes.functional import QuantState

    states = [l.weight.quant_state for l in bases]
    first = states[0]
    n = first.shape.numel()
    if any(s.nested or s.absmax.dtype != torch.float32 or s.shape != first.shape or s.blocksize != first.blocksize
           or s.quant_type != first.quant_type or s.dtype != first.dtype or not torch.equal(s.code, first.code)
           for s in states) or n % first.blocksize:
        return None
    data = torch.cat([l.weight.data for l in bases])
    absmax = torch.cat([s.absmax for s in states])
    per_data, per_absmax = data.shape[0] // 3, absmax.shape[0] // 3
    for j, (l, s) in enumerate(zip(bases, states)):  # views: the unfused paths read the same bytes
        l.weight.data = data[j * per_data:(j + 1) * per_data]
        s.absmax = absmax[j * per_absmax:(j + 1) * per_absmax]
    state = QuantState(absmax=absmax, shape=torch.Size([3 * first.shape[0], first.shape[1]]), code=first.code,
                       blocksize=first.blocksize, quant_type=first.quant_type, dtype=first.dtype)
    return data, state


def _drop_p(m, adapter) -> float:
    drop = m.lora_dropout[adapter]
    return drop.p if isinstance(drop, nn.Dropout) else 0.0


def fuse(clip: nn.Module, adapter: str = "default", kernel: str = "torch") -> int:
    """Give every SplitAttention whose q, k and v all carry the adapter the fused training path; the others
    (lora.targets or lora.layers leaving some out) keep PEFT's modules. Returns how many were fused.

    kernel (train.adapter_kernel): "triton" only where q, k and v are the only adapters drawing dropout masks
    (the kernels do not advance torch's generator, so a later draw in the block would get other masks)."""
    from clip_qlora.core.model import SplitAttention

    if kernel == "triton" and any(isinstance(m, LoraLayer) and _drop_p(m, adapter) > 0
                                  and not any(name.endswith(t) for t in ("q_proj", "k_proj", "v_proj"))
                                  for name, m in clip.named_modules() if isinstance(m, LoraLayer)):
        kernel = "torch"
    n = 0
    for m in clip.modules():
        if isinstance(m, SplitAttention) and all(isinstance(p, LoraLayer) and adapter in p.lora_A
                                                 for p in (m.q_proj, m.k_proj, m.v_proj)):
            m.fused_qkv = FusedQKV(m, adapter, kernel)
            n += 1
    return n
