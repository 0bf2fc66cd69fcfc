from pathlib import Path

from stages.app import BaseOpt, DebugOpt, ParamsOpt, app, load_params, stage


def params_of(base: str) -> tuple[str, ...]:
    """model, and the group the base's backend takes its settings from (quant for nf4)."""
    from clip_qlora.core.backends import BACKENDS

    return tuple(dict.fromkeys(("model", BACKENDS[base].params)))


@app.command()
@stage
def quantize(base: str = BaseOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Load (and quantize) a base once: models/<base>/, the method pointers and metrics/static/<base>.json."""
    from clip_qlora import config
    from clip_qlora.core import backends

    config.require_member("base", base, list(backends.BACKENDS))
    p = load_params(params, f"quantize@{base}", params_of(base))
    from clip_qlora.jobs.quantize import quantize_base  # torch: after params are checked

    quantize_base(base, p)
