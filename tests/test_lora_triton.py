"""train.adapter_kernel triton (core/lora_triton.py): the kernels draw torch's CUDA dropout masks themselves and
compute the fused q/k/v adapter branch. Here without a GPU: the NumPy oracle against Philox's published
answers, the layout against torch's launch formula, and the kernels under Triton's CPU interpreter
(tests/lora_triton_cases.py, one fresh process each: the interpreter is chosen when triton is imported)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip_qlora.core import lora_triton as lt
from philox_oracle import philox4x32_10, torch_dropout_keep
from proc_helpers import run_interpreted

HERE = Path(__file__).parent


@pytest.mark.parametrize("counter,key,out", [
    # Random123's known-answer vectors for philox4x32-10 (kat_vectors), the generator curand implements
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_oracle_is_philox4x32_10(counter, key, out):
    got = philox4x32_10([np.array([c], dtype=np.uint32) for c in counter], key)
    assert tuple(int(w[0]) for w in got) == out


def test_oracle_keeps_one_minus_p_and_depends_on_every_input():
    n, threads = 40_000, 1024
    base = torch_dropout_keep(n, 5, 0, 0.25, threads)
    assert abs(base.mean() - 0.75) < 0.01
    for other in (torch_dropout_keep(n, 6, 0, 0.25, threads), torch_dropout_keep(n, 5, 400, 0.25, threads),
                  torch_dropout_keep(n, 5 + 2**32, 0, 0.25, threads)):
        assert 0.3 < (base != other).mean() < 0.5  # independent draws disagree on ~2 p (1 - p) = 37.5 %
    # more threads: the first round's elements keep their thread and counter, the later ones do not
    wider = torch_dropout_keep(n, 5, 0, 0.25, 2 * threads)
    assert np.array_equal(wider[:8 * threads], base[:8 * threads])
    assert 0.3 < (wider[16 * threads:] != base[16 * threads:]).mean() < 0.5
    # offsets count Philox values, 4 per counter step, and a round of 8 elements per thread takes 2 steps: a
    # draw at offset 8 gives each element the value the element one round (8 x threads) later got at offset 0
    rounds_on = torch_dropout_keep(n, 5, 8, 0.25, threads)
    assert np.array_equal(rounds_on[:n - 8 * threads], base[8 * threads:])
    # and one counter step moves an element's value to the element 4 places before it (the second half of a
    # thread's 8 uses the counter after the first half's)
    step_on = torch_dropout_keep(n, 5, 4, 0.25, threads).reshape(-1, 8)
    assert np.array_equal(step_on[:, :4], base.reshape(-1, 8)[:, 4:])


@pytest.mark.parametrize("n,threads,increment", [
    (6304 * 768, 270_336, 20),   # ViT-B/16 image tokens at batch 32 on 132 SMs x 2048 threads: 3 rounds
    (1100 * 512, 270_336, 4),    # 100 prompts x 11 tokens, text width 512: one round
    (1000, 1024, 4),             # fewer elements than one thread per 256: ceil(1000 / 256) blocks
])
def test_layout_is_torchs_launch(n, threads, increment):
    """grid = min(SMs x max threads per SM / 256, ceil(n / 256)) blocks of 256; offset += 4 ceil(n / (threads x 4))."""
    assert lt.layout(n, sms=132, threads_per_sm=2048) == (threads, increment)


@pytest.mark.parametrize("case", ["masks", "exact", "against_torch_path", "checkpoint_replays_masks"])
def test_kernels_under_interpreter(case):
    run_interpreted(HERE / "lora_triton_cases.py", case)
