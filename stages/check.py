from pathlib import Path

from stages.app import DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def check(params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Check the params file (every group every stage reads) without running anything: run it before
    `dvc repro`, which deletes a stage's outputs before the stage sees a bad value (`make run` does)."""
    from clip_qlora import config

    p = config.check_params(params)
    print(f"{params}: ok ({len(p.datasets)} datasets x {len(p.methods)} methods)")
