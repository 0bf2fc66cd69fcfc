"""k-shot sampling: CLIP-LoRA's exact draw (the default) or an order-independent keyed draw.

`clip_lora` reproduces, per seed, the training shots CLIP-LoRA's code trains on, so per-seed results can be set
beside its own: Python's `random` seeded with the seed, then the validation shots drawn (min(k, 4) per class;
never used, but they consume the generator), then the training shots, each per label in order of first
appearance in the split file's list, `sample` without replacement or `choices` with it for a class with fewer
than k. It depends on the split file's order, as theirs does; Python keeps `random`'s seeding and these two
functions stable across versions.

`keyed` sorts by SHA-256 of (seed, path): a pseudo-random permutation fixed by the seed and the path alone, so
the draw cannot depend on file-listing order, dict order, or library versions, and adding one image to a
class does not reshuffle the others. It can also draw around unreadable files, which the exact draw cannot.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from typing import Callable, Iterable

from clip_qlora.config import SPLIT_DRAWS as DRAWS  # the draws params accept: config is their one home
from clip_qlora.runtime.io import UserError

VAL_SHOTS_MAX = 4  # CLIP-LoRA draws min(k, 4) validation shots per class before the training shots


def _key(seed: int, *parts: str) -> bytes:
    return hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()


def keyed_order(seed: int, names: Iterable[str]) -> list[str]:
    """The distinct `names` in an order that looks random and depends only on `seed` and the names."""
    return sorted(set(names), key=lambda name: _key(seed, name))


def draw_shots(train: list[tuple[str, int]], classnames: list[str], shots: int, seed: int,
               readable: Callable[[str], bool], dataset: str) -> tuple[list[list], list[str]]:
    """Draw `shots` images per class; returns ([[path, label], ...] in label order, classes drawn with replacement).

    Candidates are taken in keyed order and checked with `readable` (which reports what it rejects), so an
    unreadable image is replaced by the next one in the same order. Replacement is used only for a class that
    has fewer than `shots` images in the split at all; a class pushed below `shots` by unreadable files is an
    error, since silently repeating images would hide damaged data.
    """
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, label in train:
        by_class[label].append(path)
    drawn: list[list] = []
    replaced: list[str] = []
    for label, name in enumerate(classnames):
        chosen: list[str] = []
        bad: list[str] = []
        for path in keyed_order(seed, by_class[label]):
            if len(chosen) == shots:
                break
            (chosen if readable(path) else bad).append(path)
        if bad and len(chosen) < shots:
            raise UserError(f"{dataset}: class {name!r} has {len(chosen)} readable training images, fewer than "
                            f"{shots} shots, after skipping {len(bad)} unreadable (e.g. {bad[0]})")
        if not chosen:
            raise UserError(f"{dataset}: class {name!r} has no training images")
        n = len(chosen)
        if n < shots:
            # all n distinct images once, the rest drawn with replacement among them
            chosen += [chosen[int.from_bytes(_key(seed, name, str(i))[:8], "big") % n] for i in range(shots - n)]
            replaced.append(name)
        drawn += [[path, label] for path in chosen]
    return drawn, replaced


def _per_label(rng: random.Random, items: list[tuple[str, int]], k: int) -> list[tuple[str, int]]:
    groups: dict[int, list[tuple[str, int]]] = {}  # insertion order: labels in order of first appearance
    for item in items:
        groups.setdefault(item[1], []).append(item)
    out: list[tuple[str, int]] = []
    for group in groups.values():
        out += rng.sample(group, k) if len(group) >= k else rng.choices(group, k=k)
    return out


def draw_clip_lora(train: list[tuple[str, int]], val: list[tuple[str, int]], classnames: list[str], shots: int,
                   seed: int) -> tuple[list[list], list[str]]:
    """CLIP-LoRA's draw (module docstring); returns ([[path, label], ...] in its order, classes with replacement)."""
    rng = random.Random(seed)  # the same stream as random.seed(seed) on the module-level generator
    _per_label(rng, val, min(shots, VAL_SHOTS_MAX))  # consumed only, as theirs is
    drawn = _per_label(rng, train, shots)
    counts: dict[int, int] = defaultdict(int)
    for _, label in train:
        counts[label] += 1
    missing = [name for label, name in enumerate(classnames) if not counts[label]]
    if missing:
        raise ValueError(missing[0])
    replaced = [classnames[label] for label in sorted(counts) if counts[label] < shots]
    return [[path, label] for path, label in drawn], replaced


def describe(draw: str, shots: int, has_val: bool) -> str:
    """One line for the split file saying how its training shots were drawn."""
    if draw == "keyed":
        return (f"keyed: per class the first {shots} readable images in SHA-256(seed, path) order "
                f"(independent of file order; not CLIP-LoRA's draw)")
    val = (f"then {min(shots, VAL_SHOTS_MAX)} validation shots per class from 'val' (unused)" if has_val else
           "no 'val' list in this partition, so no validation shots were drawn (CLIP-LoRA's stream differs)")
    return (f"clip_lora: Python random seeded with the seed, {val}, then {shots} training shots per class "
            f"from 'train' in file order (random.sample; random.choices where a class has fewer)")
