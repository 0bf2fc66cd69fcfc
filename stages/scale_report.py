from pathlib import Path

from stages.app import DebugOpt, ParamsOpt, app, stage


@app.command("scale_report")
@stage
def scale_report(params: Path = ParamsOpt, debug: bool = DebugOpt):
    """reports/scale.md, plots/scale/ and plots/scale_figures/ from metrics/scale/<arch>.json."""
    from clip_qlora import config
    from clip_qlora.report import scale as report

    p = config.load(params)
    report.report(p)
