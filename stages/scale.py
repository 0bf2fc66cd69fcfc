from pathlib import Path

import typer

from stages.app import DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def scale(arch: str = typer.Option(..., help="an architecture of scale.archs, e.g. ViT-B-16"),
          params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Memory and step time of every method on one architecture (random weights), for each scale.batches."""
    from clip_qlora import config
    from clip_qlora.jobs import scale as study

    p = config.load(params)
    config.require_member("arch", arch, p.scale.archs)
    study.run(p, arch)
