from pathlib import Path

from stages.app import DatasetOpt, DebugOpt, MethodOpt, ParamsOpt, app, load_params, scoring_stage

PARAMS = ("data.root", "data.seeds", "model.device", "eval")
# more decoding workers: the same images in the same order; the logit scale scales every logit alike: the
# same argmax, all that is scored
UNTRACKED = ("runtime.eval_workers", "train.logit_scale")


@app.command()
@scoring_stage
def evaluate(method: str = MethodOpt, dataset: str = DatasetOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Top-1 accuracy (overall and per class) of each seed's adapters (the base's zero-shot: zeroshot)."""
    from clip_qlora import config
    from clip_qlora.runtime import inputs

    p = load_params(params, "evaluate", PARAMS, UNTRACKED)
    config.require_member("method", method, p.methods)
    config.require_member("dataset", dataset, p.datasets)
    inputs.split(dataset, p.data.root)
    inputs.method(method)
    inputs.adapters(method, dataset, p.data.seeds)
    from clip_qlora.jobs.evaluate import evaluate_dataset  # torch: after params are checked

    evaluate_dataset(method, dataset, data=p.data, eval=p.eval, train=p.train, runtime=p.runtime,
                     device=p.model.device)
