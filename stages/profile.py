from pathlib import Path

from stages.app import DebugOpt, MethodOpt, ParamsOpt, app, stage


@app.command()
@stage
def profile(method: str = MethodOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Memory and step time of one method on synthetic inputs, for each profile.batches configuration."""
    from clip_qlora import config
    from clip_qlora.runtime import inputs

    p = config.load(params)
    config.require_member("method", method, p.methods)
    inputs.method(method)
    from clip_qlora.jobs.profile_stage import profile as run  # torch: after params are checked

    run(p, method)
