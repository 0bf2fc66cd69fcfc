from pathlib import Path

from stages.app import DatasetOpt, DebugOpt, MethodOpt, ParamsOpt, app, scoring_stage


@app.command()
@scoring_stage
def evaluate(method: str = MethodOpt, dataset: str = DatasetOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Top-1 accuracy (overall and per class) of each seed's adapters (the base's zero-shot: zeroshot)."""
    from clip_qlora import config
    from clip_qlora.runtime import inputs

    p = config.load(params)
    config.require_member("method", method, p.methods)
    config.require_member("dataset", dataset, p.datasets)
    inputs.split(dataset, p.data.root)
    inputs.method(method)
    inputs.adapters(method, dataset, p.data.seeds)
    from clip_qlora.jobs.evaluate_stage import evaluate as run  # torch: after params are checked

    run(p, method, dataset)
