#!/usr/bin/env python
"""Several seeds of one method trained side by side on one GPU, against one after another (a GPU probe).

    python benchmarks/seeds_together.py --out $OUT --steps 300 --methods lora qlora_gc

For each method: builds `--seeds` runs on a random ViT-B-16 base (saved and reloaded as the train stage
does), trains them one after another, then builds them again and trains them side by side (`GroupStep`
below: the seeds' steps as branches of one captured graph), and reports ms per seed-step of both and
whether the adapters came out bitwise equal. Every line goes to stdout and <out>/seeds_together.log as it
happens, with a stack dump of every thread if nothing moves for 60 s (a hang shows where it is).
Result of 2026-12-01: benchmarks/results/2026-12-01-nvidia-h200-seeds-together.md.
"""
from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from clip_qlora.core.graphs import _graph_body, _load_optimizer_in_place  # noqa: E402


class GroupStep:
    """One optimizer step of several runs (a dataset's seeds) captured in one CUDA graph, a branch per run.

    The hope: seeds whose steps run side by side on one GPU finish sooner than one after another. Why one
    graph and not one per seed replayed on a stream of its own: on the H200 (driver 580.159.04) replays of
    three graphs on three streams wedged the GPU within 50 steps (the host blocked in `replay()`, the stack
    dumps are in this script's log of 2026-12-01); inside one graph the branches are ordinary parallel nodes.
    Each branch is its run's `GraphedStep` body (same kernels, same inputs, its own dropout generators), so
    every seed computes what it computes alone (checked below, bitwise).
    """

    def __init__(self, runs: list, examples: list[list[tuple[torch.Tensor, torch.Tensor]]], pool=None):
        self.runs = runs
        self.inputs = [[(x.clone(), y.clone()) for x, y in ex] for ex in examples]
        states = []
        for run in runs:
            params = [p for g in run.optimizer.param_groups for p in g["params"]]
            states.append((params, [p.detach().clone() for p in params],
                           copy.deepcopy(run.optimizer.state_dict())))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for run, inputs in zip(runs, self.inputs):
                    _graph_body(run, inputs)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for run, (params, values, opt) in zip(runs, states):
                for p, v in zip(params, values):
                    p.copy_(v)
                _load_optimizer_in_place(run.optimizer, opt)
                run.optimizer.zero_grad(set_to_none=True)
        self.streams = [torch.cuda.Stream() for _ in runs]
        self.graph = torch.cuda.CUDAGraph()
        for run in runs:
            for gen in run.blocks.generators():
                self.graph.register_generator_state(gen)
        with torch.cuda.graph(self.graph, pool=pool):
            main = torch.cuda.current_stream()
            self.losses = []
            for run, inputs, stream in zip(runs, self.inputs, self.streams):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    self.losses.append(_graph_body(run, inputs))
            for stream in self.streams:
                main.wait_stream(stream)

    def __call__(self, step_batches: list, step_seeds: list[int]) -> list[torch.Tensor]:
        """Replay one step of every run: step_batches[i] are run i's micro-batches, step_seeds[i] its step seed."""
        for inputs, batches in zip(self.inputs, step_batches):
            for (xs, ys), (x, y) in zip(inputs, batches):
                xs.copy_(x, non_blocking=True)
                ys.copy_(y, non_blocking=True)
        for run, seed in zip(self.runs, step_seeds):
            run.set_lr()
            run.blocks.seed(seed)
        self.graph.replay()
        for run in self.runs:
            run.step += 1
        return self.losses


class GroupSteps:
    """`GroupStep`s by batch shapes (an epoch's short last batch gets its own graph), sharing one memory pool
    as `GraphedSteps` does."""

    def __init__(self, runs: list):
        self.runs, self.graphs = runs, {}

    def __call__(self, step_batches: list, step_seeds: list[int]) -> list[torch.Tensor]:
        shape = tuple(tuple(len(y) for _, y in batches) for batches in step_batches)
        if shape not in self.graphs:
            first = next(iter(self.graphs.values()), None)
            self.graphs[shape] = GroupStep(self.runs, step_batches, None if first is None else first.graph.pool())
        return self.graphs[shape](step_batches, step_seeds)




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["lora", "lora_gc", "qlora", "qlora_gc"])
    ap.add_argument("--n-classes", type=int, default=101)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "seeds_together.log", "a", buffering=1)
    faulthandler.dump_traceback_later(60, repeat=True, file=logf)
    t00 = time.perf_counter()

    def log(msg):
        line = f"[{time.perf_counter() - t00:6.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")

    from clip_qlora.core import backends
    from clip_qlora import config
    from clip_qlora.core.base import make_base, read_base, save_base
    from clip_qlora.core.model import stand_in_quick_gelu
    from clip_qlora.data.images import TrainImages
    from clip_qlora.core.step import build_run, optimizer_step, groups_of
    from clip_qlora.data.batches import make_micro_batches
    from clip_qlora.core.graphs import make_step
    from clip_qlora.core.seeds import mix as _step_seed

    p = config.load(REPO / "params.yaml")
    quick_gelu = stand_in_quick_gelu("ViT-B-16", p.model)  # the activation of the weights random ones stand in for
    p.model.pretrained = "none"
    device = "cuda"
    tmp = Path(tempfile.mkdtemp())
    for base in backends.BACKENDS:
        model, meta = make_base("ViT-B-16", "none", base, backends.get(base).settings(p), torch.bfloat16, device,
                                quick_gelu)
        save_base(model, meta, tmp / base)
        del model
    torch.cuda.empty_cache()
    log("bases saved")
    prompts = [f"a photo of a class number {i}." for i in range(args.n_classes)]
    n = 4 * args.n_classes
    g = torch.Generator().manual_seed(0)
    images = TrainImages(torch.randint(0, 255, (n, 3, 336, 448), dtype=torch.uint8, generator=g).to(device),
                         [(336, 448)] * n, torch.arange(n) % args.n_classes)
    t = p.train
    seeds = list(range(1, args.seeds + 1))
    results = {}

    def build(method, saved, seed, capture=True):
        run = build_run(tmp / backends.METHODS[method].base, method, prompts, device, args.steps, seed=seed,
                        saved=saved, **groups_of(p))
        torch.manual_seed(_step_seed(seed, 0))
        optimizer_step(run, make_micro_batches(run, images, seed, 0, t.micro_batch, t.grad_accum, t.batching))
        if not capture:
            return run, None
        ex = make_micro_batches(run, images, seed, 1, t.micro_batch, t.grad_accum, t.batching)
        step, mode = make_step(run, ex, True)
        return run, step

    def one(run, step, seed, k):
        torch.manual_seed(_step_seed(seed, k))
        return step(make_micro_batches(run, images, seed, k, t.micro_batch, t.grad_accum, t.batching))

    def adapters(run):
        return {k: v.detach().float().cpu() for k, v in run.model.named_parameters() if v.requires_grad}

    for method in args.methods:
        saved = read_base(tmp / backends.METHODS[method].base)
        # one after another
        seq, seq_s = {}, 0.0
        for seed in seeds:
            run, step = build(method, saved, seed)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for k in range(1, args.steps):
                loss = one(run, step, seed, k)
                if k % 50 == 0:
                    float(loss)
            torch.cuda.synchronize()
            seq_s += time.perf_counter() - t0
            seq[seed] = adapters(run)
            log(f"{method} seed {seed} alone: {args.steps - 1} steps, loss {float(loss):.4f}")
            del run, step
            torch.cuda.empty_cache()
        log(f"{method}: one after another {seq_s:.2f} s ({seq_s * 1000 / (len(seeds) * (args.steps - 1)):.2f} ms/step)")
        # side by side: the seeds' steps as branches of one captured graph (GroupStep)
        runs = []
        for seed in seeds:
            run, _ = build(method, saved, seed, capture=False)
            runs.append((seed, run))
            log(f"{method} seed {seed} built")
        ex = [make_micro_batches(run, images, seed, 1, t.micro_batch, t.grad_accum, t.batching) for seed, run in runs]
        group = GroupSteps([run for _, run in runs])
        group(ex, [_step_seed(seed, 1) for seed, _ in runs])  # captures (and takes step 1)
        log(f"{method}: group graph captured")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(2, args.steps):
            batches = [make_micro_batches(run, images, seed, k, t.micro_batch, t.grad_accum, t.batching)
                       for seed, run in runs]
            losses = group(batches, [_step_seed(seed, k) for seed, _ in runs])
            if k % 50 == 0:
                [float(x) for x in losses]
                log(f"{method} together: step {k}")
        torch.cuda.synchronize()
        tog_s = time.perf_counter() - t0
        equal = all(torch.equal(seq[seed][name], v) for seed, run in runs
                    for name, v in adapters(run).items())
        seq_ms = seq_s * 1000 / (len(seeds) * (args.steps - 1))
        tog_ms = tog_s * 1000 / (len(seeds) * (args.steps - 2))
        log(f"{method}: together {tog_s:.2f} s ({tog_ms:.2f} ms per seed-step), "
            f"speed-up {seq_ms / tog_ms:.2f}x, adapters bitwise equal: {equal}")
        results[method] = {"sequential_ms_per_seed_step": seq_ms, "together_ms_per_seed_step": tog_ms,
                           "timed_steps": [args.steps - 1, args.steps - 2], "seeds": len(seeds),
                           "bitwise_equal": equal}
        (out / "seeds_together.json").write_text(json.dumps(results, indent=2))
        del runs, group
        torch.cuda.empty_cache()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
