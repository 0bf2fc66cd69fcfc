from pathlib import Path

import typer

from stages.app import DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def profile(method: str = typer.Option(..., help="lora, lora_gc, qlora or qlora_gc"),
            params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Memory and step time of one method on synthetic inputs, for each profile.batches configuration."""
    from clip_qlora import config, pipeline

    p = config.load(params)
    config.require_member("method", method, p.methods)
    pipeline.profile(p, method)
