from pathlib import Path

from stages.app import DatasetOpt, DebugOpt, MethodOpt, ParamsOpt, app, stage


@app.command()
@stage
def train(method: str = MethodOpt, dataset: str = DatasetOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Train adapters for every seed; resumes from .ckpt/ after an interruption."""
    from clip_qlora import config
    from clip_qlora.runtime import inputs

    p = config.load(params)
    config.require_member("method", method, p.methods)
    config.require_member("dataset", dataset, p.datasets)
    inputs.split(dataset, p.data.root, p.data.shots, p.data.seeds)
    inputs.method(method)
    from clip_qlora.jobs.train_stage import train as run  # torch: after params are checked

    run(p, method, dataset)
