"""Checks of core/lora_triton.py run under Triton's CPU interpreter: `python tests/lora_triton_cases.py NAME`
with TRITON_INTERPRET=1 (set before triton is imported, which decides at decoration time whether a kernel is
compiled or interpreted). tests/test_lora_triton.py runs each in a fresh process.

The interpreter is faithful for integers (the masks are compared bit for bit) but not for bf16 rounding (it
truncates where a GPU rounds to nearest), so the arithmetic is checked exactly on data whose every product
and sum is exact in bf16, and within bf16 rounding on random data. Bitwise equality with torch's own CUDA
masks is a GPU check (benchmarks/gpu_checks.py --checks adapter_kernel).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from clip_qlora.core import blocks, qkv  # noqa: E402
from clip_qlora.core import lora_triton as lt  # noqa: E402
from philox_oracle import torch_dropout_keep  # noqa: E402


def _unpack(bits: torch.Tensor, d: int) -> torch.Tensor:
    """The kernel's masks: bit q of byte g is element 4 g + q."""
    b = bits.numpy()
    return torch.from_numpy(((b[..., None] >> np.arange(4)) & 1).reshape(*b.shape[:-1], d).astype(bool))


def masks():
    """The forward kernel's masks are the oracle's, bit for bit: several rounds per thread and a partial last
    one, offsets after earlier draws, a seed above 2^32 (both key words), rows that do not fill a tile."""
    assert lt.interpreting()
    for n_rows, d, seed, first in ((45, 64, 5, 0), (70, 128, 2**40 + 12345, 36), (33, 256, 987654321, 8)):
        n = n_rows * d
        threads, inc = lt.layout(n, "cpu")
        assert n > 8 * threads, "the case should take more than one round"
        x = torch.randn(n_rows, d).to(torch.bfloat16)
        a = [torch.randn(2, d) for _ in range(3)]
        offsets = [first + j * inc for j in range(3)]
        _, bits = lt.forward(x, a, torch.tensor([seed]), offsets, 0.25, threads, 1.0)
        got = _unpack(bits, d)
        for j in range(3):
            want = torch.from_numpy(torch_dropout_keep(n, seed, offsets[j], 0.25, threads).reshape(n_rows, d))
            assert torch.equal(got[j], want), (n_rows, d, j)
            assert 0.70 < want.float().mean() < 0.80
        assert not torch.equal(got[0], got[1])


def _exact_case(n_rows=50, d=128, r=2, seed=77):
    """Values in {-1, 0, 1}, p = 0.5 (scale 2) and s = 0.5: every product and partial sum is a small integer or
    half-integer, exact in bf16. g = gy [W | B]: gx's base part, then each matrix's gy B in its 8 columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (n_rows, d), generator=g).to(torch.bfloat16)
    a = [torch.randint(-1, 2, (r, d), generator=g).float() for _ in range(3)]
    grad = torch.zeros(n_rows, d + 3 * lt.HW, dtype=torch.bfloat16)
    grad[:, :d] = torch.randint(-2, 3, (n_rows, d), generator=g).to(torch.bfloat16)
    for j in range(3):
        grad[:, d + j * lt.HW:d + j * lt.HW + r] = torch.randint(-2, 3, (n_rows, r), generator=g).to(torch.bfloat16)
    return x, a, grad


def exact():
    """[x | s h], gx and A's gradients equal the plain formulas on exact data, with the oracle's masks."""
    p, s, seed = 0.5, 0.5, 2**33 + 5
    x, a, grad = _exact_case()
    n_rows, d = x.shape
    threads, inc = lt.layout(x.numel(), "cpu")
    offsets = [0, inc, 2 * inc]
    xa, bits = lt.forward(x, a, torch.tensor([seed]), offsets, p, threads, s)
    assert torch.equal(xa[:, :d], x)
    gx_ref = grad[:, :d].float().clone()
    ga = lt.backward(xa, bits, grad, a, p, s)
    for j in range(3):
        keep = torch.from_numpy(torch_dropout_keep(x.numel(), seed, offsets[j], p, threads).reshape(n_rows, d))
        xd = x.float() * keep * 2
        h = xa[:, d + j * lt.HW:d + (j + 1) * lt.HW].float()
        assert torch.equal(h[:, :2], s * (xd @ a[j].t()))
        assert not h[:, 2:].any()  # the padded columns are exact zeros
        gh = s * grad[:, d + j * lt.HW:d + j * lt.HW + 2].float()
        assert torch.equal(ga[j], gh.t() @ xd)
        gx_ref += (gh @ a[j]) * keep * 2
    assert torch.equal(grad[:, :d].float(), gx_ref)


def _attention(d=64, r=2, p=0.25, seed=0):
    """A SplitAttention with PEFT LoRA on q, k, v in bf16, B non-zero (it starts at zero)."""
    from peft import LoraConfig, get_peft_model

    from clip_qlora.core.model import SplitAttention

    torch.manual_seed(seed)
    holder = nn.Module()
    holder.attn = SplitAttention(nn.MultiheadAttention(d, 4, batch_first=True), causal=False)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=1, lora_dropout=p, use_rslora=True,
                                              target_modules=r"attn\.(q|k|v)_proj"))
    for name, prm in model.named_parameters():
        prm.data = prm.data.float() if "lora_" in name else prm.data.to(torch.bfloat16)
        if "lora_B" in name:
            prm.data.normal_(std=0.5)
    return model.base_model.model.attn


def against_torch_path():
    """FusedQKV on the Triton path against `_QKV` (the cuBLAS path) fed the oracle's masks through
    torch.native_dropout: the same y and gradients within bf16 rounding; two calls in one step (gradient
    accumulation) take the next offsets, as torch's generator would hand them out."""
    attn = _attention()
    triton_path, torch_path = qkv.FusedQKV(attn, kernel="triton"), qkv.FusedQKV(attn, kernel="torch")
    seed = 2**35 + 99
    x = torch.randn(2, 33, 64).to(torch.bfloat16)
    draws = blocks.Draws(torch.Generator(), torch.tensor([seed]))
    threads, inc = lt.layout(x.numel(), "cpu")
    oracle = iter(torch.from_numpy(torch_dropout_keep(x.numel(), seed, k * inc, 0.25, threads).reshape(66, 64))
                  for k in range(6))

    def oracle_dropout(t, prob, train):  # what torch's CUDA kernel returns for this generator state
        keep = next(oracle)
        return (t.float() * keep / (1 - prob)).to(t.dtype), keep

    params = [prm for prm in attn.parameters() if prm.requires_grad]
    results = {}
    for name, fused in (("triton", triton_path), ("torch", torch_path)):
        draws.offset = 0
        outs = []
        for call in range(2):
            xi = x.clone().requires_grad_(True)
            original = torch.native_dropout
            torch.native_dropout = oracle_dropout if name == "torch" else original
            try:
                with blocks.drawing_from(draws):
                    y = fused(xi)
            finally:
                torch.native_dropout = original
            grads = torch.autograd.grad(y.float().square().sum(), [xi, *params])
            outs.append((y.detach(), *grads))
        results[name] = outs
        # three draws per call, as from torch's generator; the cuBLAS path draws from the generator itself
        assert draws.offset == (6 * inc if name == "triton" else 0)
    for call in range(2):
        for got, want in zip(results["triton"][call], results["torch"][call]):
            assert got.shape == want.shape and got.dtype == want.dtype
            scale = want.float().abs().max()
            assert scale > 0
            assert (got.float() - want.float()).abs().max() <= 2 ** -5 * scale, (call, got.shape)
    # the second call's masks are not the first's: its outputs differ from the first call's
    assert not torch.equal(results["triton"][0][0], results["triton"][1][0])


def checkpoint_replays_masks():
    """A whole tiny-model step on the Triton path (bf16, both towers, q/k/v adapters): lora_gc's loss and every
    adapter gradient equal lora's bit for bit (the recomputation draws the same masks from the twin generator),
    and every block's kernel drew its masks (its offset moved)."""
    import tempfile

    from clip_qlora import config
    from clip_qlora.core.base import make_base, save_base
    from clip_qlora.core.step import build_run, groups_of, loss_on

    root = Path(tempfile.mkdtemp())
    model, meta = make_base("clip-tiny", "none", "bf16", None, torch.bfloat16, "cpu")
    save_base(model, meta, root / "bf16")
    params = config.load_with({"datasets": ["shapes"], "model.arch": "clip-tiny", "model.pretrained": "none"})
    prompts = [f"a photo of a {c} shape." for c in ("red", "green", "blue", "yellow")]
    results = {}
    for method in ("lora", "lora_gc"):
        run = build_run(root / "bf16", method, prompts, "cpu", 10, seed=3, **groups_of(params))
        assert getattr(run.clip.visual.transformer.resblocks[0].attn, "fused_qkv").kernel == "triton"
        with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
            g = torch.Generator().manual_seed(11)
            for n, prm in sorted(run.model.named_parameters()):
                if "lora_B" in n:
                    prm.normal_(std=0.1, generator=g)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, run.size, run.size, generator=g)
        y = torch.randint(0, len(prompts), (4,), generator=g)
        run.blocks.seed(7)
        loss = loss_on(run, x, y)
        loss.backward()
        assert all(s.forward.offset > 0 for s in run.blocks.streams)  # every block's kernel drew its masks
        results[method] = (float(loss.detach()), {n: prm.grad.clone() for n, prm in run.model.named_parameters()
                                                  if prm.requires_grad})
    (l0, g0), (l1, g1) = results["lora"], results["lora_gc"]
    assert l0 == l1 and g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert any(bool(v.abs().sum() > 0) for n, v in g0.items() if "lora_A" in n)  # the masks reached a gradient


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    print("ok", sys.argv[1])
