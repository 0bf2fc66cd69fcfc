from pathlib import Path

from stages.app import BaseOpt, DebugOpt, ParamsOpt, app, scoring_stage


@app.command()
@scoring_stage
def zeroshot(base: str = BaseOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Zero-shot accuracy of one base (no adapters) on every dataset's test split, with every prompt set."""
    from clip_qlora import config
    from clip_qlora.runtime import inputs
    from clip_qlora.core.backends import BACKENDS

    p = config.load(params)
    config.require_member("base", base, list(BACKENDS))
    for dataset in p.datasets:
        inputs.split(dataset, p.data.root)
    inputs.base(base)
    from clip_qlora.jobs.zeroshot import zeroshot as run  # torch: after params are checked

    run(p, base)
