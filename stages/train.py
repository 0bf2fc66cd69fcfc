from pathlib import Path

import typer

from stages.app import DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def train(method: str = typer.Option(..., help="lora, lora_gc, qlora or qlora_gc"),
          dataset: str = typer.Option(..., help="dataset name from params.yaml 'datasets'"),
          params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Train adapters for every seed; resumes from .ckpt/ after an interruption."""
    from clip_qlora import config, pipeline

    p = config.load(params)
    config.require_member("method", method, p.methods)
    config.require_member("dataset", dataset, p.datasets)
    pipeline.train(p, method, dataset)
