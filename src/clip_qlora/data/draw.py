"""k-shot sampling.

The random order is a sort by SHA-256 of (seed, path). That is a pseudo-random permutation fixed by the seed
and the path alone, so the draw cannot depend on file-listing order, dict order, or the version of Python,
NumPy or torch (whose generators do not promise the same stream forever), and adding one image to a class
does not reshuffle the others.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Callable, Iterable

from ..io import UserError


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
