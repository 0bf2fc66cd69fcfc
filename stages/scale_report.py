from pathlib import Path

from stages.app import DebugOpt, ParamsOpt, app, load_params, stage

PARAMS = ("methods", "scale.archs", "scale.batches", "scale.gpu_gib")


@app.command("scale_report")
@stage
def scale_report(params: Path = ParamsOpt, debug: bool = DebugOpt):
    """reports/scale.md, plots/scale/ and plots/scale_figures/ from metrics/scale/<arch>.json."""
    from clip_qlora.report import scale

    p = load_params(params, "scale_report", PARAMS)
    scale.report(p)
