"""The step captured in CUDA graphs and replayed: the same arithmetic as `step.optimizer_step`, launched as
one graph instead of over a thousand kernels."""
from __future__ import annotations

import copy
import logging

import torch

from clip_qlora.core.step import Run, _accumulate, optimizer_step

log = logging.getLogger(__name__)


class GraphedStep:
    """`optimizer_step` captured once in a CUDA graph and replayed.

    A ViT-B/16 LoRA step launches well over a thousand small kernels; eager PyTorch spends more time
    launching them than the GPU spends running them. Replaying a captured graph launches the whole step at
    once. Same arithmetic as the eager step: the optimizer is AdamW with a device-side lr (capturable), the
    blocks' dropout generators are registered with the graph and re-seeded before each replay exactly as in
    eager mode (checkpointed blocks included, see blocks.py).
    """

    def __init__(self, run: Run, example: list[tuple[torch.Tensor, torch.Tensor]], pool=None):
        self.run = run
        self.inputs = [(x.clone(), y.clone()) for x, y in example]
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        # Capture needs warm-up iterations, which would train: snapshot and restore everything they touch.
        saved = ([p.detach().clone() for p in params], copy.deepcopy(run.optimizer.state_dict()))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            for p, v in zip(params, saved[0]):
                p.copy_(v)
        _load_optimizer_in_place(run.optimizer, saved[1])
        # Gradients start as None inside the capture too: backward then hands each adapter its freshly computed
        # gradient (no zeroing, no add: 2 kernels less per adapter matrix) in the graph's own memory, at the
        # same address on every replay, and the captured optimizer reads them there.
        run.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        for gen in run.blocks.generators():
            self.graph.register_generator_state(gen)
        # Generators drawn from in the graph start each replay freshly seeded (__call__): the captured draws
        # must start from the same place (kernels that take their offsets from blocks.Draws bake them in).
        run.blocks.seed(torch.initial_seed())
        with torch.cuda.graph(self.graph, pool=pool):
            self.loss = self._body()

    def _body(self) -> torch.Tensor:
        return _graph_body(self.run, self.inputs)

    def __call__(self, micro_batches) -> torch.Tensor:
        for (xs, ys), (x, y) in zip(self.inputs, micro_batches):
            xs.copy_(x, non_blocking=True)
            ys.copy_(y, non_blocking=True)
        self.run.set_lr()  # writes this step's lr into the device tensor the graph reads
        self.run.blocks.seed(torch.initial_seed())  # host-side; the replay hands seed and offset to the kernels
        self.graph.replay()
        self.run.step += 1
        return self.loss


def _load_optimizer_in_place(optimizer, state: dict) -> None:
    # load_state_dict would allocate new state tensors; the graph needs the captured ones, so copy values
    for group_state, (p, st) in zip(state["state"].values(), optimizer.state.items()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                v.copy_(group_state[k])


class GraphedSteps:
    """One captured graph per batch shape: an epoch's short last batch gets a graph of its own.

    The graphs share one memory pool: they never run at once, and what one keeps alive between replays (its
    inputs and loss) is never handed to another, so a second shape costs its capture, not a second set of
    activation buffers.
    """

    def __init__(self, run: Run):
        self.run, self.graphs = run, {}

    def __call__(self, micro_batches) -> torch.Tensor:
        shape = tuple(len(y) for _, y in micro_batches)
        if shape not in self.graphs:
            first = next(iter(self.graphs.values()), None)
            self.graphs[shape] = GraphedStep(self.run, micro_batches, None if first is None else first.graph.pool())
        return self.graphs[shape](micro_batches)


def _graph_body(run: Run, inputs) -> torch.Tensor:
    loss = _accumulate(run, inputs)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss


def make_step(run: Run, example, use_graph: bool):
    """The step function train and profile call: replayed CUDA graphs on CUDA (all methods), else eager."""
    if use_graph and run.device.startswith("cuda"):
        try:
            steps = GraphedSteps(run)
            steps.graphs[tuple(len(y) for _, y in example)] = GraphedStep(run, example)
            return steps, "cuda_graph"
        except Exception as e:  # an op that cannot be captured: measure and train eagerly, say so
            log.warning("CUDA graph capture failed (%s: %s); running eager steps", type(e).__name__, e)
    return (lambda batches: optimizer_step(run, batches)), "eager"
