from pathlib import Path

import typer

from stages.app import DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def quantize(base: str = typer.Option(..., help="bf16 (the LoRA arm's base) or nf4 (the QLoRA arm's)"),
             params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Load (and quantize) a base once: models/<base>/, the method pointers and metrics/static/<base>.json."""
    from clip_qlora import config, pipeline

    p = config.load(params)
    config.require_member("base", base, list(pipeline.BASES))
    pipeline.quantize(p, base)
