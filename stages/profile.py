from pathlib import Path

from stages.app import DebugOpt, MethodOpt, ParamsOpt, app, load_params, stage

PARAMS = ("model.device", "lora", "train", "profile", "runtime.cuda_graph", "runtime.cublas_workspace_kib",
          "runtime.overlap_text", "runtime.layernorm_in_compute_dtype", "runtime.fused_activation")


@app.command()
@stage
def profile(method: str = MethodOpt, params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Memory and step time of one method on synthetic inputs, for each profile.batches configuration."""
    from clip_qlora import config
    from clip_qlora.runtime import inputs

    p = load_params(params, "profile", PARAMS)
    config.require_member("method", method, p.methods)
    inputs.method(method)
    from clip_qlora.jobs.profile import profile_method  # torch: after params are checked

    profile_method(method, lora=p.lora, train=p.train, runtime=p.runtime, profile=p.profile,
                   device=p.model.device)
