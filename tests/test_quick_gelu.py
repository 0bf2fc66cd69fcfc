"""runtime.fused_activation (core/quick_gelu.py): QuickGELU in one Triton kernel each way, bitwise open_clip's.
The kernels run here under Triton's CPU interpreter (tests/quick_gelu_cases.py, a fresh process each: the
interpreter is chosen when triton is imported); bitwise equality with torch's CUDA kernels over every bf16 input
is benchmarks/gpu_checks.py --checks quick_gelu."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from open_clip.transformer import QuickGELU

from clip_qlora.core import quick_gelu as Q
from clip_qlora.core.base import make_base
from clip_qlora.core.step import fuse_quick_gelu
from proc_helpers import run_interpreted

HERE = Path(__file__).parent


@pytest.mark.parametrize("case", ["every_input", "module"])
def test_kernels_under_interpreter(case):
    run_interpreted(HERE / "quick_gelu_cases.py", case)


@pytest.mark.parametrize("quick_gelu,expected", [(True, 2 + 2), (False, 0)])  # clip-tiny: 2 blocks per tower
def test_fuse_replaces_only_quick_gelu(quick_gelu, expected):
    model, _ = make_base("clip-tiny", "none", "bf16", None, torch.float32, "cpu", quick_gelu)
    keys = list(model.state_dict())
    before = [type(b.mlp.gelu) for t in (model.visual, model) for b in t.transformer.resblocks]
    assert fuse_quick_gelu(model) == expected
    after = [type(b.mlp.gelu) for t in (model.visual, model) for b in t.transformer.resblocks]
    assert after == [Q.FusedQuickGELU if a is QuickGELU else a for a in before]
    assert list(model.state_dict()) == keys  # nothing for checkpoints or PEFT's paths to notice


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (3, 7)), (torch.bfloat16, (4, 6))])
def test_falls_back_to_open_clips_expression_where_the_kernels_do_not_run(dtype, shape):
    """On the CPU (no interpreter) and for fp32 the module is open_clip's expression: the same bits."""
    x = torch.randn(shape).to(dtype)
    if dtype == torch.bfloat16:
        x = x.t()  # not contiguous
    assert not Q.usable(x)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = Q.FusedQuickGELU()(a), QuickGELU()(b)
    g = torch.randn(ya.shape).to(dtype)
    ya.backward(g), yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
