from pathlib import Path

from stages.app import DatasetOpt, DebugOpt, MethodOpt, ParamsOpt, app, load_params, stage

PARAMS = ("data.root", "data.shots", "data.seeds", "data.template", "data.split_draw", "model.device", "lora",
          "train")
UNTRACKED = ("runtime",)  # speed and memory only, same adapters (dvc.yaml says why)


@app.command()
@stage
def train(method: str = MethodOpt, dataset: str = DatasetOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Train adapters for every seed; resumes from .ckpt/ after an interruption."""
    from clip_qlora import config
    from clip_qlora.runtime import inputs

    p = load_params(params, "train", PARAMS, UNTRACKED)
    config.require_member("method", method, p.methods)
    config.require_member("dataset", dataset, p.datasets)
    inputs.split(dataset, p.data.root, p.data.shots, p.data.seeds)
    inputs.method(method)
    from clip_qlora.jobs.train import train_dataset  # torch: after params are checked

    train_dataset(method, dataset, data=p.data, lora=p.lora, train=p.train, runtime=p.runtime,
                  device=p.model.device)
