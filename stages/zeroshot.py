from pathlib import Path

from stages.app import BaseOpt, DebugOpt, ParamsOpt, app, load_params, scoring_stage

PARAMS = ("datasets", "own_datasets", "data.root", "data.template", "model.device", "eval")
# more decoding workers: the same images in the same order; the logit scale scales every logit alike: the
# same argmax, all that is scored
UNTRACKED = ("runtime.eval_workers", "train.logit_scale")


@app.command()
@scoring_stage
def zeroshot(base: str = BaseOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Zero-shot accuracy of one base (no adapters) on every dataset's test split, with every prompt set."""
    from clip_qlora import config
    from clip_qlora.core.backends import BACKENDS
    from clip_qlora.runtime import inputs

    p = load_params(params, "zeroshot", PARAMS, UNTRACKED)
    config.require_member("base", base, list(BACKENDS))
    for dataset in p.datasets:
        inputs.split(dataset, p.data.root)
    inputs.base(base)
    from clip_qlora.jobs.zeroshot import zeroshot_base  # torch: after params are checked

    zeroshot_base(base, p.datasets, data=p.data, own_datasets=p.own_datasets, eval=p.eval, train=p.train,
                  runtime=p.runtime, device=p.model.device)
