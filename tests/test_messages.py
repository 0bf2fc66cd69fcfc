"""Lines a user reads once, not twice: building a random-weight model says so in one warning."""
from __future__ import annotations

import logging

from clip_qlora.core.model import create_clip


def test_random_weights_are_announced_once_per_build(caplog):
    caplog.set_level(logging.WARNING)
    create_clip("clip-tiny", "none")
    said = [r.getMessage() for r in caplog.records if "random" in r.getMessage()]
    assert len(said) == 1 and "model.pretrained is 'none'" in said[0]
