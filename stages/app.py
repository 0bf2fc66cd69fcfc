"""The Typer app every stage command registers on, and the one place errors become exit codes.

A problem the user can fix (UserError) prints one line and exits 2; `--debug` shows the traceback.
A CUDA out-of-memory error exits 3 with the memory seen and the options that reduce it.
"""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import typer

from clip_qlora.core.backends import BACKENDS, METHODS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="clip-qlora pipeline stages. Each reads params.yaml and writes only its declared outputs.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params file to read (the study: params.yaml)")
DebugOpt = typer.Option(False, "--debug", help="show the full traceback on errors")
MethodOpt = typer.Option(..., help=f"{', '.join(METHODS)} (one of params.yaml 'methods')")
BaseOpt = typer.Option(..., help=", ".join(f"{b} (the {s.label} arm's base)" for b, s in BACKENDS.items()))
DatasetOpt = typer.Option(..., help="dataset name from params.yaml 'datasets'")


def load_params(path: Path, stage: str, keys, untracked=()):
    """params.yaml, validated whole (as `check` does), as stage `stage` may read it: `keys` are its dvc.yaml
    `params:` list, `untracked` what it reads without DVC tracking it (dvc.yaml says why). Reading any other
    key raises config.Undeclared: DVC would not rerun the stage when that key changed."""
    from clip_qlora import config

    return config.declared(config.load(path), (*keys, *untracked), stage)


TRAINING_OOM = ("use a method with gradient checkpointing (lora_gc/qlora_gc) or a smaller micro-batch with more "
                "accumulation (train.grad_accum)")
SCORING_OOM = "lower eval.batch_size (test images per forward)"


def scoring_stage(fn):
    """`stage` for the commands that only score (evaluate, zeroshot): their memory is eval.batch_size's."""
    return stage(fn, oom_advice=SCORING_OOM)


def stage(fn, oom_advice: str = TRAINING_OOM):
    """Wrap a stage command: logging set up, user errors as one line, OOM as advice."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        from clip_qlora.runtime.io import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if kwargs.get("debug"):
                raise
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2)
        except Exception as e:
            torch = sys.modules.get("torch")  # not imported: not a CUDA OOM (prepare and aggregate run without it)
            if torch is not None and isinstance(e, torch.OutOfMemoryError) and not kwargs.get("debug"):
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
                print(f"error: CUDA out of memory after a peak of {peak:.2f} GiB allocated; {oom_advice}",
                      file=sys.stderr)
                raise typer.Exit(3)
            raise

    return wrapper
