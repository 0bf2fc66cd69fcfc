from pathlib import Path

from stages.app import BaseOpt, DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def quantize(base: str = BaseOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Load (and quantize) a base once: models/<base>/, the method pointers and metrics/static/<base>.json."""
    from clip_qlora import backends, config

    p = config.load(params)
    config.require_member("base", base, list(backends.BACKENDS))
    from clip_qlora.pipeline.quantize import quantize as run  # torch: after params are checked

    run(p, base)
