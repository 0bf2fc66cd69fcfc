from pathlib import Path

import typer

from stages.app import DatasetOpt, DebugOpt, ParamsOpt, app, load_params, stage

PARAMS = ("data.root", "data.shots", "data.seeds", "data.download", "data.template", "data.split_draw",
          "own_datasets")


@app.command()
@stage
def prepare(dataset: str = DatasetOpt,
            out: Path = typer.Option(None, help="split file to write [default: data/splits/<dataset>.json]; the "
                                           "digests of its train and test images go beside it"),
            params: Path = ParamsOpt, debug: bool = DebugOpt):
    """The few-shot split of one dataset: k images per class per seed, and the full test list."""
    from clip_qlora import config
    from clip_qlora.data.digest import write_digests
    from clip_qlora.data.splits import prepare_split, write_split
    from clip_qlora.paths import split_path

    p = load_params(params, "prepare", PARAMS)
    config.require_member("dataset", dataset, p.datasets)
    d = p.data
    split = prepare_split(dataset, Path(d.root), d.shots, d.seeds, d.download, d.template, d.split_draw,
                          p.own_datasets)
    out = out or split_path(dataset)
    write_split(out, split)
    write_digests(out, split, Path(d.root))
