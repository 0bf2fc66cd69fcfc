from pathlib import Path

from stages.app import DebugOpt, ParamsOpt, app, load_params, stage

PARAMS = ("datasets", "methods")


@app.command()
@stage
def aggregate(params: Path = ParamsOpt, debug: bool = DebugOpt):
    """metrics/summary.json, reports/results.md and plots/ from every stage's metrics."""
    from clip_qlora.report.aggregate import aggregate

    p = load_params(params, "aggregate", PARAMS)
    aggregate(p.methods, p.datasets, Path("."), Path("reports/results.md"), Path("plots/figures"))
