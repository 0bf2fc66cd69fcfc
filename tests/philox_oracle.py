"""A NumPy oracle for the dropout masks torch's CUDA kernel draws (the layout core/lora_triton.py reproduces),
written from curand's and torch's definitions independently of that file: Philox4x32-10 and the element ->
(thread, round, word) mapping of torch's vectorised dropout (8 bf16 elements per thread and round)."""
from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)   # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85                          # Weyl key increments


def philox4x32_10(counter, key):
    """Philox4x32 with 10 rounds: counter = 4 uint32 arrays (word 0 lowest), key = 2 uint32."""
    c0, c1, c2, c3 = (np.asarray(v, dtype=np.uint32) for v in counter)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = _M0 * c0.astype(np.uint64), _M1 * c2.astype(np.uint64)
        hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint32(k0), lo1, hi0 ^ c3 ^ np.uint32(k1), lo0
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def torch_dropout_keep(n: int, seed: int, offset: int, p: float, threads: int) -> np.ndarray:
    """Keep mask (bool, n) of torch's CUDA native_dropout(x, p) on n contiguous bf16 elements whose generator
    stands at (seed, offset), run on `threads` threads: curand_init(seed, thread, offset), two
    curand_uniform4 per round of 8 elements, kept when the float is below 1 - p."""
    e = np.arange(n, dtype=np.int64)
    vec = e // 8
    thread, rnd = vec % threads, vec // threads
    counter = offset // 4 + 2 * rnd + (e % 8) // 4        # curand: offset / 4 Philox blocks skipped, then one per call
    words = philox4x32_10([counter.astype(np.uint32), (counter >> 32).astype(np.uint32),
                           thread.astype(np.uint32), (thread >> 32).astype(np.uint32)],
                          [seed & 0xFFFFFFFF, seed >> 32])
    word = np.choose(e % 4, words)
    u = word.astype(np.float32) * np.float32(2.0 ** -32) + np.float32(2.0 ** -33)
    return u < np.float32(1.0 - p)
