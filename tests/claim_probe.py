"""A stand-in for a stage process: claim a GPU with the real clip_qlora.runtime.gpu_claim, hold it, log what happened.

Used by tests/test_gpu_claim.py as a plain subprocess and as the single stage of a tiny DVC project run
through the experiment queue. Every event is one JSON line appended to $CLAIM_PROBE_LOG (small O_APPEND
writes from several processes do not interleave):
  start     before claiming (with the working folder and the claim's environment as this process saw it)
  blocked   the first, non-waiting attempt found every GPU held ($CLAIM_PROBE_TRY_FIRST=1 only)
  claimed   the GPU is held
  released  just before exiting, which releases it
How long it holds ($CLAIM_PROBE_HOLD):
  file:PATH     until PATH exists
  peers:N       until N claims and one 'blocked' are logged: N runs hold GPUs at once and another one is
                waiting for a GPU (give up after 120 s and log 'alone': the runs were not concurrent)
With $CLAIM_PROBE_METRICS it writes {"x": <params.yaml x>, "gpu": <index>} there (the DVC stage's metric).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from clip_qlora.runtime import gpu_claim
from clip_qlora.runtime.io import UserError

LOG = Path(os.environ["CLAIM_PROBE_LOG"])


def note(event: str, **kw) -> None:
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(),
                       "exp": os.environ.get("DVC_EXP_NAME"), **kw}) + "\n"
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def events() -> list[dict]:
    return [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.exists() else []


def hold(spec: str) -> None:
    kind, _, arg = spec.partition(":")
    deadline = time.time() + 120
    while time.time() < deadline:
        if kind == "file" and Path(arg).exists():
            return
        if kind == "peers":
            ev = events()
            if (sum(e["event"] == "claimed" for e in ev) >= int(arg)
                    and any(e["event"] == "blocked" for e in ev)):
                return
        time.sleep(0.05)
    note("alone")


def main() -> int:
    note("start", cwd=os.getcwd(), env={k: v for k, v in os.environ.items()
                                         if k.startswith(("CLIP_QLORA_", "CLAIM_PROBE_")) or k == "DVC_ROOT"})
    if os.environ.get("CLAIM_PROBE_TRY_FIRST") == "1":
        wait = os.environ.get(gpu_claim.ENV_WAIT)
        os.environ[gpu_claim.ENV_WAIT] = "0"
        try:
            c = gpu_claim.claim()
        except UserError:
            note("blocked")
            c = None
        if wait is None:
            del os.environ[gpu_claim.ENV_WAIT]
        else:
            os.environ[gpu_claim.ENV_WAIT] = wait
        c = c or gpu_claim.claim()
    else:
        c = gpu_claim.claim()
    note("claimed", gpu=c.index)
    hold(os.environ.get("CLAIM_PROBE_HOLD", "file:/nonexistent"))
    if os.environ.get("CLAIM_PROBE_METRICS"):
        import yaml

        x = yaml.safe_load(Path("params.yaml").read_text())["x"]
        Path(os.environ["CLAIM_PROBE_METRICS"]).write_text(json.dumps({"x": x, "gpu": c.index}) + "\n")
    note("released", gpu=c.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
