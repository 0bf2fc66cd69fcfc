from pathlib import Path

import typer

from stages.app import DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def evaluate(method: str = typer.Option(..., help="lora, lora_gc, qlora or qlora_gc"),
             dataset: str = typer.Option(..., help="dataset name from params.yaml 'datasets'"),
             params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Top-1 accuracy (overall and per class) of each seed's adapters, and the base's zero-shot accuracy."""
    from clip_qlora import config, pipeline

    p = config.load(params)
    config.require_member("method", method, p.methods)
    config.require_member("dataset", dataset, p.datasets)
    pipeline.evaluate(p, method, dataset)
