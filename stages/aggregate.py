from pathlib import Path

from stages.app import DebugOpt, ParamsOpt, app, stage


@app.command()
@stage
def aggregate(params: Path = ParamsOpt, debug: bool = DebugOpt):
    """metrics/summary.json, reports/results.md and plots/ from every stage's metrics."""
    from clip_qlora import config
    from clip_qlora.report import aggregate as report

    p = config.load(params)
    report.aggregate(p.methods, p.datasets, Path("metrics"), Path("metrics/summary.json"),
                     Path("reports/results.md"), Path("plots/figures"))
