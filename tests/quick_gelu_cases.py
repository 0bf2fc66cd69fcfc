"""Checks of core/quick_gelu.py under Triton's CPU interpreter: `python tests/quick_gelu_cases.py NAME` with
TRITON_INTERPRET=1 (set before triton is imported). tests/test_quick_gelu.py runs each in a fresh process.

Two interpreter limits shape them: it has no libdevice, so the kernels take NumPy's exp there (the GPU's expf is
benchmarks/gpu_checks.py --checks quick_gelu's business, over every finite bf16 input); and it converts bf16
subnormals (|v| < 2^-126) to and from fp32 wrongly, so subnormal inputs are left out and subnormal outputs
(y near zero, or where the sigmoid underflows) are not compared with the kernels' here.
"""
from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from open_clip.transformer import QuickGELU  # noqa: E402

from clip_qlora.core import quick_gelu as Q  # noqa: E402


def _every_normal_bf16() -> torch.Tensor:
    """Every finite bf16 value except the subnormals: zeros, both signs, 65,024 values."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    f = x.float()
    return x[torch.isfinite(f) & ((f.abs() >= 2.0 ** -126) | (f == 0))].contiguous()


def _rne(v: np.ndarray) -> np.ndarray:
    """fp32 -> nearest bf16 (ties to even), as fp32."""
    b = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def _reference(x: np.ndarray, gy: np.ndarray):
    """The roundings quick_gelu.py's docstring states, in NumPy fp32."""
    one, c = np.float32(1), np.float32(1.702)
    with np.errstate(over="ignore"):
        s = _rne(one / (one + np.exp(-_rne(x * c))))
    y = _rne(x * s)
    gt = _rne(_rne(_rne(gy * x) * _rne(one - s)) * s)  # torch's CUDA sigmoid backward: bf16 operations
    gx = _rne(_rne(gy * s) + _rne(gt * c))
    return y, gx


def _bitwise(a: torch.Tensor, b) -> bool:
    """a equals b bit for bit where b is zero or a normal number (see the module docstring)."""
    b = np.asarray(b, dtype=np.float32)
    normal = (np.abs(b) >= 2.0 ** -126) | (b == 0)
    assert normal.mean() > 0.99
    return np.array_equal(a.float().numpy().view(np.uint32)[normal], b.view(np.uint32)[normal])


def every_input():
    """Forward and backward on every normal bf16 input (and a second pass with other gradients): bit for bit the
    stated roundings; the forward also bit for bit torch's open_clip QuickGELU here. The backward's reference is
    torch's CUDA arithmetic, which rounds inside the sigmoid's backward where torch's CPU kernel does not: on
    the CPU torch's gradient is the reference's in most elements and within a bf16 step in all."""
    assert Q.interpreting()
    x = _every_normal_bf16()
    for gen_seed in (0, 1):
        gy = (torch.randn(x.shape, generator=torch.Generator().manual_seed(gen_seed)) * 4).to(torch.bfloat16)
        y, gx = Q.forward(x), Q.backward(x, gy)
        ry, rgx = _reference(x.float().numpy(), gy.float().numpy())
        xt = x.clone().requires_grad_(True)
        yt = QuickGELU()(xt)
        yt.backward(gy)
        assert _bitwise(yt.detach(), ry) and _bitwise(y, ry)
        assert _bitwise(gx, rgx)
        cpu = xt.grad.float().numpy()
        print("torch CPU gradient bits equal in", (cpu == rgx).mean())
        assert (cpu == rgx).mean() > 0.99


def module():
    """FusedQuickGELU as autograd sees it, between two layers: open_clip's outputs, the kernels' gradient handed
    to the layer below (and open_clip's within bf16 rounding), and only its input kept for the backward (open_clip's
    keeps the sigmoid too)."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 64).to(torch.bfloat16)
    x = torch.randn(8, 5, 16).to(torch.bfloat16)
    out = {}
    for name, act in (("fused", Q.FusedQuickGELU()), ("open_clip", QuickGELU())):
        kept = []
        h = fc(x).detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            y = act(h)
        gy = torch.arange(y.numel()).view(y.shape).float().cos().to(torch.bfloat16)
        y.backward(gy)
        out[name] = (h.detach(), y.detach(), gy, h.grad, {t.data_ptr(): t.numel() for t in kept})
    (h, y, gy, gh, kept), (_, y_ref, _, gh_ref, kept_ref) = out["fused"], out["open_clip"]
    assert torch.equal(y.view(torch.int16), y_ref.view(torch.int16))
    assert torch.equal(gh.view(torch.int16), Q.backward(h, gy).view(torch.int16))
    assert (gh.float() - gh_ref.float()).abs().max() <= 2 ** -6 * gh_ref.float().abs().max()
    assert list(kept.values()) == [8 * 5 * 64]                     # h
    assert sorted(kept_ref.values()) == [8 * 5 * 64] * 2           # h and sigmoid(1.702 h)


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    print("ok", sys.argv[1])
