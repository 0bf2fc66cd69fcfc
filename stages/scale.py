from pathlib import Path

import typer

from stages.app import DebugOpt, ParamsOpt, app, load_params, stage

PARAMS = ("methods", "model.compute_dtype", "model.device", "quant", "lora", "train", "scale.batches",
          "scale.n_classes", "scale.warmup", "scale.steps", "runtime.cuda_graph", "runtime.cublas_workspace_kib",
          "runtime.overlap_text", "runtime.layernorm_in_compute_dtype", "runtime.fused_activation")


@app.command()
@stage
def scale(arch: str = typer.Option(..., help="an architecture of scale.archs, e.g. ViT-B-16"),
          params: Path = ParamsOpt, debug: bool = DebugOpt):
    """Memory and step time of every method on one architecture (random weights), for each scale.batches."""
    from clip_qlora import config

    # scale.archs names the stage instances (foreach), as methods and datasets do: read, not a DVC param
    p = load_params(params, "scale", PARAMS, ("scale.archs",))
    config.require_member("arch", arch, p.scale.archs)
    from clip_qlora.jobs.scale import scale_arch

    scale_arch(p, arch)
