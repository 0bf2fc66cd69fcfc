"""`python -m stages <stage> --help`: one thin command per DVC stage; the logic lives in clip_qlora."""
from stages import (aggregate, evaluate, prepare, profile, quantize, scale, scale_report,  # noqa: F401  (register
                    train, zeroshot)  # commands)
from stages.app import app

if __name__ == "__main__":
    app()
