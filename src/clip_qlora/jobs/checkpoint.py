"""Checkpoints of a training run, so that a pre-empted run resumes and reports what an uninterrupted one
would: the adapters, the optimizer, and what was reported so far (`Record`)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from clip_qlora.core.step import Run
from clip_qlora.runtime.io import UserError, atomic_path

log = logging.getLogger(__name__)


def run_fingerprint(method: str, seed: int, shots: int, lora, train, meta: dict, images) -> str:
    """What a checkpoint must match to be resumed: method, seed, adapter and optimisation settings, the base
    and the exact training images. A checkpoint left by other params is discarded, never continued; one left
    with other `runtime` knobs (CUDA graph, checkpoint interval, ...) is continued, as they change no number."""
    import dataclasses
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([method, seed, shots, dataclasses.asdict(lora), dataclasses.asdict(train), meta],
                                  sort_keys=True, default=str).encode())
    h.update(images.pixels.cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(images.sizes).encode())
    h.update(images.labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(run: Run, path: Path, step: int, fingerprint: str = "", record: dict | None = None) -> None:
    """`record`: what the run has reported so far (`Record.state()`), so a resumed run reports the whole run."""
    state = {"step": step, "fingerprint": fingerprint,
             "adapters": {k: v.detach().cpu() for k, v in run.model.named_parameters() if v.requires_grad},
             "optimizer": run.optimizer.state_dict(), "record": record or {}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(run: Run, path: Path, fingerprint: str | None = None, record: Record | None = None) -> int:
    """Restore a checkpoint (and into `record` what the run reported so far) and return its step; 0 (and the
    file removed) if it belongs to another run."""
    try:
        state = torch.load(path, map_location=run.device, weights_only=True)  # tensors only, no pickled code
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to start over") from None
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        log.warning("%s was written with other params, base or data: discarded, training starts over", path)
        path.unlink()
        return 0
    params = dict(run.model.named_parameters())
    with torch.no_grad():
        for k, v in state["adapters"].items():
            params[k].copy_(v)
    run.optimizer.load_state_dict(state["optimizer"])
    run.step = int(state["step"])  # the lr follows from the step
    if record is not None:
        record.restore(state.get("record", {}))
    return run.step


class Record:
    """What a run reports beside its adapters, carried through checkpoints so a resumed run reports the whole
    run: the rows logged to DVCLive (replayed into the new log on resume), the per-window step times and the
    training seconds of the parts already run."""

    def __init__(self, live=None):
        self.live, self.rows, self.window_ms, self.seconds_before = live, [], [], 0.0

    def restore(self, saved: dict) -> None:
        self.window_ms = list(saved.get("window_ms", []))
        self.seconds_before = float(saved.get("seconds", 0.0))
        for row in saved.get("rows", []):
            self.log(row["step"], {k: v for k, v in row.items() if k != "step"})

    def log(self, step: int, metrics: dict) -> None:
        self.rows.append({"step": step, **metrics})
        if self.live is not None:  # DVCLive appends a row per metric at live.step
            self.live.step = step
            for k, v in metrics.items():
                self.live.log_metric(k, v)

    def state(self, seconds: float) -> dict:
        """What a checkpoint saves after `seconds` of this part's training."""
        return {"rows": self.rows, "window_ms": self.window_ms, "seconds": self.seconds_before + seconds}
