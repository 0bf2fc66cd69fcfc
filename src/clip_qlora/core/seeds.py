"""Every random draw of training follows from integers alone, so that a resumed run, a CUDA graph replay and
a rerun draw exactly what an uninterrupted eager run would, with no RNG state to carry over."""


def mix(seed: int, k: int) -> int:
    """The seed of draw `k` of a run seeded `seed` (k: the step for sampling, augmentation and the step's global
    dropout seed; a block's offset for its own dropout generators)."""
    return (seed * 1_000_003 + k) % (2**63 - 1)
