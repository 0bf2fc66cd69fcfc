"""Decoding one image (PIL only): prepare checks every image of a split with it, without torch."""
from __future__ import annotations

from pathlib import Path

from clip_qlora.runtime.io import UserError


def open_rgb(path: Path):
    """Decode fully (so truncation shows up here, not later), or raise one line naming the file."""
    from PIL import Image  # here, not at the top: checking params imports the data layer and needs no PIL

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot decode image ({e})") from None
