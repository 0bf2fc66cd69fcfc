"""`python -m stages <stage> --help`: one thin command per DVC stage; the logic lives in clip_qlora."""
import os
import sys

if os.environ.get("CLIP_QLORA_WARM"):  # run in a fork of the warm server, which has the libraries loaded
    from clip_qlora.runtime import warm

    if sys.argv[1:2] and sys.argv[1] in warm.SERVED_STAGES:
        served = warm.forward()
        if served is not None:
            warm.exit_with(served)

from stages import (aggregate, check, evaluate, prepare, profile, quantize, scale,  # noqa: F401  (register
                    scale_report, train, zeroshot)  # commands)
from stages.app import app

if __name__ == "__main__":
    app()
