from pathlib import Path

from stages.app import BaseOpt, DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def quantize(base: str = BaseOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Load (and quantize) a base once: models/<base>/, the method pointers and metrics/static/<base>.json."""
    from clip_qlora.core import backends
    from clip_qlora import config

    p = config.load(params)
    config.require_member("base", base, list(backends.BACKENDS))
    from clip_qlora.jobs.quantize import quantize as run  # torch: after params are checked

    run(p, base)
