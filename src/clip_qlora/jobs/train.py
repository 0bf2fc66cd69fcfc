"""Few-shot training: the one training step (used by train, profile and the benchmark) and the loop.

Read top to bottom: `Run` holds what a step needs, `optimizer_step` is the step, `train_seed` the loop.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_qlora.core import adapters as ad
from clip_qlora.core import backends, qkv
from clip_qlora.core.base import load_base
from clip_qlora.core.blocks import BlockDropout
from clip_qlora.runtime.io import UserError, atomic_dir, atomic_path
from clip_qlora.core.memory import CudaPeak, SavedActivations
from clip_qlora.core.model import (TextTokens, cosine_logits, embed_prompts, encode_image, encode_text, layernorms_in_compute_dtype,
                    preprocess_stats, unit)
from clip_qlora.runtime.progress import Bar

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything one optimizer step needs. Built once per (method, seed)."""
    model: nn.Module            # PeftModel around the CLIP module
    clip: nn.Module             # the CLIP module itself (adapters injected in place)
    tokens: torch.Tensor        # class prompts, cut to the shortest exact context, on device
    text_input: torch.Tensor    # their token + position embeddings (frozen: computed once, see run_on_model)
    text_trainable: bool        # text tower has adapters -> class features recomputed with grad every step
    optimizer: torch.optim.Optimizer
    lr_at: object               # step -> learning rate (closed form: no scheduler state to carry)
    compute_dtype: torch.dtype
    device: str
    logit_scale: float
    size: int
    mean: tuple
    std: tuple
    meta: dict                  # the saved base's description
    blocks: BlockDropout        # per-block dropout generators (and checkpointing for the _gc methods)
    text_stream: torch.cuda.Stream | None = None  # CUDA, runtime.overlap_text: the text tower's stream
    step: int = 0               # optimizer steps taken
    _text_cache: torch.Tensor | None = None

    def set_lr(self) -> None:
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # device-side lr: a tiny kernel, no host sync, read by the CUDA graph
            else:
                group["lr"] = lr

    def autocast(self):
        # The same autocast in both arms: matmuls in compute dtype, LayerNorm/softmax/loss in fp32.
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.compute_dtype)

    def class_features(self) -> torch.Tensor:
        if self.text_trainable:
            return unit(encode_text(self.clip, self.tokens, self.text_input))
        if self._text_cache is None:  # frozen text tower: the features cannot change, encode them once
            with torch.no_grad():
                self._text_cache = unit(encode_text(self.clip, self.tokens, self.text_input))
        return self._text_cache

    def class_features_aside(self):
        """`class_features` launched on the side stream; returns (features, join), join() before using them.

        The text tower (100 prompts x ~11 tokens) launches as many small kernels as the image tower but has a
        fraction of its work, so on one stream the GPU idles through much of it. On a stream of its own, the
        graph replays its forward and backward beside the image tower's. Same kernels, same inputs, same RNG
        draws (each block has its own generator): the numbers do not change, only the overlap.
        """
        if self.text_stream is None or not self.text_trainable:
            return self.class_features(), lambda: None
        main = torch.cuda.current_stream()
        self.text_stream.wait_stream(main)
        with torch.cuda.stream(self.text_stream):
            text = self.class_features()

        def join():
            main.wait_stream(self.text_stream)
            text.record_stream(main)  # made on the side stream, read on main: keep the allocator from reusing it
        return text, join


def build_run(base_dir: str | Path, params, method: str, prompts: list[str], device: str, total_steps: int,
              adapter_dir: str | Path | None = None, seed: int = 0, saved=None) -> Run:
    """Load the saved base, add (or load) adapters, and set up the optimizer for `total_steps` steps.

    `seed` initialises the new adapters (lora_A; lora_B starts at zero), as the seed does in CLIP-LoRA.
    `saved`: the base's `read_base` result, when a stage trains several seeds from one read of the file.
    """
    model, meta = load_base(base_dir, device, saved)
    return run_on_model(model, meta, params, method, prompts, device, total_steps, adapter_dir, seed)


def run_on_model(model: nn.Module, meta: dict, params, method: str, prompts: list[str], device: str,
                 total_steps: int, adapter_dir: str | Path | None = None, seed: int = 0) -> Run:
    """`build_run` on a base already in memory (tests and benchmarks that skip the save/load)."""
    set_cublas_workspace(params.runtime.cublas_workspace_kib)
    gc = backends.METHODS[method].checkpointing
    backends.get(meta["base"]).for_training(model, meta["settings"])
    # Seeded here, after the base is built: building a base re-seeds with the fixed init seed (model.INIT_SEED),
    # which would otherwise give every seed the same lora_A.
    torch.manual_seed(seed)
    peft_model = (ad.load_adapters(model, adapter_dir, trainable=True) if adapter_dir
                  else ad.add_adapters(model, params.lora))
    ad.let_autocast_cast_inputs(peft_model)  # loss_on always runs under autocast (or in fp32)
    clip = ad.inner(peft_model)
    compute_dtype = getattr(torch, meta["compute_dtype"])
    if params.runtime.layernorm_in_compute_dtype and compute_dtype != torch.float32:
        layernorms_in_compute_dtype(clip, compute_dtype)
    if params.train.fused_qkv:
        qkv.fuse(clip)
    blocks = BlockDropout(clip, gc, device)
    peft_model.train()
    t = params.train
    trainable = ad.trainable_parameters(peft_model)
    cuda = device.startswith("cuda")
    # On CUDA: one fused kernel for all parameters, and a device-side lr and step count so the whole step
    # can be captured in a CUDA graph (GraphedStep).
    optimizer = torch.optim.AdamW(trainable, lr=torch.tensor(t.lr, device=device) if cuda else t.lr,
                                  weight_decay=t.weight_decay, betas=(0.9, 0.999), fused=cuda, capturable=cuda)
    lr_at = functools.partial(cosine_lr if t.schedule == "cosine" else constant_lr, t.lr, t.min_lr, total_steps)
    size, mean, std = preprocess_stats(clip)
    tokens = TextTokens.from_prompts(prompts, meta["arch"]).tokens.to(device)
    with torch.no_grad():
        text_input = embed_prompts(clip, tokens)
    # Training reads only the class prompts' rows of the frozen token embedding, now in text_input: the table
    # itself (49408 x 512 in bf16, 48 MiB on ViT-B/16, half the NF4 base) waits on the host.
    clip.token_embedding.to("cpu")
    return Run(peft_model, clip, tokens, text_input, ad.text_has_adapters(params.lora), optimizer, lr_at,
               compute_dtype, device, t.logit_scale, size, mean, std, meta, blocks,
               text_stream=torch.cuda.Stream(device=device) if cuda and params.runtime.overlap_text else None)


def set_cublas_workspace(kib: int) -> None:
    """Size torch's cuBLAS and cuBLASLt workspaces (0 keeps torch's default) through torch's own variables.

    torch reads them once, at the first matmul of the process: the stages and the profile's measuring
    processes call this before any. The workspace is memory that every method holds alike (one per handle,
    i.e. per thread that runs matmuls); a smaller one saves that memory but lets cuBLAS pick slower kernels.
    """
    if kib:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = f":{kib}:1"
        os.environ["CUBLASLT_WORKSPACE_SIZE"] = str(kib)


def cosine_lr(lr: float, min_lr: float, total: int, step: int) -> float:
    """Cosine decay from lr to min_lr over `total` steps, no warm-up (CLIP-LoRA's schedule)."""
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * min(step, total) / total)) / 2


def constant_lr(lr: float, min_lr: float, total: int, step: int) -> float:
    return lr


def loss_on(run: Run, images: torch.Tensor, labels: torch.Tensor, text: torch.Tensor | None = None,
            join=lambda: None) -> torch.Tensor:
    """Cross-entropy of the fixed-scale cosine logits (CLIP-LoRA's objective), the logits from fp32 features
    as in evaluation (`cosine_logits`)."""
    with run.autocast():
        if text is None:
            text, join = run.class_features_aside()
        img = unit(encode_image(run.clip, images))
        join()
    return F.cross_entropy(cosine_logits(img, text, run.logit_scale), labels)


def _accumulate(run: Run, micro_batches) -> torch.Tensor:
    """Forward and backward of every micro-batch; gradients sum to the full batch's. Returns the loss.

    Each micro-batch's mean loss is weighted by its share of the batch, so the sum is the batch's mean loss
    also when the last micro-batch of an epoch's short batch is smaller than the others.
    With accumulation the class features are encoded once per step, not once per micro-batch: each
    micro-batch backpropagates into a detached copy, and the summed gradient then flows through the text
    tower in one backward. Same gradients as the full batch, a single text pass instead of `accum`.
    """
    n = len(micro_batches)
    if n == 1:
        loss = loss_on(run, *micro_batches[0])
        loss.backward()
        return loss.detach()
    total_images = sum(len(labels) for _, labels in micro_batches)
    with run.autocast():
        text, join = run.class_features_aside()
    leaf = text.detach().requires_grad_(text.requires_grad)
    total = torch.zeros((), device=run.device)
    for i, (images, labels) in enumerate(micro_batches):
        # the first micro-batch's image tower runs beside the text tower and joins it before the logits
        loss = loss_on(run, images, labels, leaf, join if i == 0 else (lambda: None)) * (len(labels) / total_images)
        loss.backward()
        total += loss.detach()
    if text.requires_grad:
        text.backward(leaf.grad)
    return total


def optimizer_step(run: Run, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One eager optimizer step over the micro-batches of one batch (the last may be smaller).

    Dropout masks follow from the seed last given to `torch.manual_seed` (the loops seed every step).
    """
    run.blocks.seed(torch.initial_seed())
    run.set_lr()
    total = _accumulate(run, micro_batches)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return total


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


# ---- the data side of a step ---------------------------------------------------------------------------

def _step_seed(seed: int, step: int) -> int:
    # Each step's randomness (sampling, augmentation, dropout) derives from (seed, step) alone, so a resumed
    # run replays exactly what an uninterrupted one would have done, with no RNG state to carry over.
    return (seed * 1_000_003 + step) % (2**63 - 1)


def batch_indices(n: int, batch: int, seed: int, step: int, batching: str = "epochs") -> torch.Tensor:
    """Indices of `step`'s batch, every image once per epoch, each epoch a permutation of its own.

    epochs (CLIP-LoRA's DataLoader, shuffle=True, drop_last=False): ceil(n / batch) batches per epoch, the last
    one short (n mod batch images), each counted as one iteration. full: consecutive slices of the permutations
    run across epoch ends, so every batch has `batch` images.
    """
    def perm(epoch: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(seed, -1 - epoch)))

    if batching == "epochs":
        per_epoch = -(-n // batch)
        epoch, b = divmod(step, per_epoch)
        return perm(epoch)[b * batch:(b + 1) * batch]
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = perm(e)[offsets[sel]]
    return out


def make_micro_batches(run: Run, images, seed: int, step: int, micro: int, accum: int, batching: str = "epochs"):
    """The step's batch, augmented, as micro-batches of `micro` images (a short batch gives fewer, or a
    smaller last one). All of its randomness comes from (seed, step), drawn on the host."""
    from clip_qlora.data.images import augment

    idx = batch_indices(len(images), micro * accum, seed, step, batching)
    gen = torch.Generator().manual_seed(_step_seed(seed, step))
    x = augment(images, idx.tolist(), gen, run.size, run.mean, run.std)
    y = images.labels[idx]
    if x.is_cuda:  # pinned and asynchronous: a plain copy would make the host wait for the queued steps
        y = y.pin_memory().to(x.device, non_blocking=True)
    return [(x[i:i + micro], y[i:i + micro]) for i in range(0, len(idx), micro)]


# ---- checkpoints (resume after pre-emption) ---------------------------------------------------------------

def run_fingerprint(params, method: str, seed: int, meta: dict, images) -> str:
    """What a checkpoint must match to be resumed: method, seed, adapter and optimisation settings, the base
    and the exact training images. A checkpoint left by other params is discarded, never continued; one left
    with other `runtime` knobs (CUDA graph, checkpoint interval, ...) is continued, as they change no number."""
    import dataclasses
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([method, seed, params.data.shots, dataclasses.asdict(params.lora),
                                   dataclasses.asdict(params.train), meta],
                                  sort_keys=True, default=str).encode())
    h.update(images.pixels.cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(images.sizes).encode())
    h.update(images.labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(run: Run, path: Path, step: int, fingerprint: str = "", record: dict | None = None) -> None:
    """`record`: what the run has reported so far (`Record.state()`), so a resumed run reports the whole run."""
    state = {"step": step, "fingerprint": fingerprint,
             "adapters": {k: v.detach().cpu() for k, v in run.model.named_parameters() if v.requires_grad},
             "optimizer": run.optimizer.state_dict(), "record": record or {}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(run: Run, path: Path, fingerprint: str | None = None, record: Record | None = None) -> int:
    """Restore a checkpoint (and into `record` what the run reported so far) and return its step; 0 (and the
    file removed) if it belongs to another run."""
    try:
        state = torch.load(path, map_location=run.device, weights_only=True)  # tensors only, no pickled code
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to start over") from None
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        log.warning("%s was written with other params, base or data: discarded, training starts over", path)
        path.unlink()
        return 0
    params = dict(run.model.named_parameters())
    with torch.no_grad():
        for k, v in state["adapters"].items():
            params[k].copy_(v)
    run.optimizer.load_state_dict(state["optimizer"])
    run.step = int(state["step"])  # the lr follows from the step
    if record is not None:
        record.restore(state.get("record", {}))
    return run.step


class Record:
    """What a run reports beside its adapters, carried through checkpoints so a resumed run reports the whole
    run: the rows logged to DVCLive (replayed into the new log on resume), the per-window step times and the
    training seconds of the parts already run."""

    def __init__(self, live=None):
        self.live, self.rows, self.window_ms, self.seconds_before = live, [], [], 0.0

    def restore(self, saved: dict) -> None:
        self.window_ms = list(saved.get("window_ms", []))
        self.seconds_before = float(saved.get("seconds", 0.0))
        for row in saved.get("rows", []):
            self.log(row["step"], {k: v for k, v in row.items() if k != "step"})

    def log(self, step: int, metrics: dict) -> None:
        self.rows.append({"step": step, **metrics})
        if self.live is not None:  # DVCLive appends a row per metric at live.step
            self.live.step = step
            for k, v in metrics.items():
                self.live.log_metric(k, v)

    def state(self, seconds: float) -> dict:
        """What a checkpoint saves after `seconds` of this part's training."""
        return {"rows": self.rows, "window_ms": self.window_ms, "seconds": self.seconds_before + seconds}


# ---- the loop ------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_seed(params, method: str, base_dir, prompts, images, seed: int, device: str,
               adapter_out: Path, ckpt_path: Path, live=None, description: str = "train", saved=None) -> dict:
    """Train one seed's adapters and save them (PEFT format). Resumes from `ckpt_path` if present.

    A resumed run reports what an uninterrupted one does (its DVCLive log from step 0, the median step time of
    every window); `train_seconds` is the sum of its parts.
    """
    t = params.train
    steps = t.iterations_per_shot * params.data.shots
    run = build_run(base_dir, params, method, prompts, device, steps, seed=seed, saved=saved)
    fingerprint = run_fingerprint(params, method, seed, run.meta, images)
    record = Record(live)
    start = load_checkpoint(run, ckpt_path, fingerprint, record) if ckpt_path.exists() else 0
    images = images.to(device)
    peak = CudaPeak(device)
    acts = SavedActivations(run.model)
    window, loss = 50, None
    bar = Bar(steps, description, done=start)
    peak.reset()
    _sync(device)
    t0 = tw = time.perf_counter()
    step_fn, mode = None, "eager"
    for step in bar(range(start, steps)):
        torch.manual_seed(_step_seed(seed, step))  # dropout masks of this step (also inside a CUDA graph)
        batches = make_micro_batches(run, images, seed, step, t.micro_batch, t.grad_accum, t.batching)
        if step == start:  # the first step eagerly, counting saved activations (hooks cannot be captured)
            with acts.track():
                loss = optimizer_step(run, batches)
        else:
            if step_fn is None:
                step_fn, mode = make_step(run, batches, params.runtime.cuda_graph)
            loss = step_fn(batches)
        ckpt_due = (step + 1) % params.runtime.checkpoint_every == 0 and step + 1 < steps
        if (step + 1) % window == 0 or step + 1 == steps or ckpt_due:
            value = float(loss)  # syncs the device, so only once per window (and before a checkpoint)
            if not math.isfinite(value):
                if ckpt_path.exists():
                    ckpt_path.unlink()  # resuming from it would only repeat the failure
                raise UserError(f"train: loss became {value} by step {step + 1} ({method}, seed {seed}); "
                                f"lower train.lr or use compute_dtype fp32 to find the cause")
        if (step + 1) % window == 0 or step + 1 == steps:
            now = time.perf_counter()
            # a window that a resume cut holds fewer steps: the steps run since the window began or the start
            n = step + 1 - max(start, step + 1 - ((step + 1) % window or window))
            record.window_ms.append((now - tw) * 1000 / n)
            tw = now
            bar.note(f"loss {value:.3f} at step {step + 1}")
            row = {"train/loss": value, "train/lr": run.lr_at(step)}
            mem = peak.read()
            if mem["peak_allocated_bytes"] is not None:
                row["train/peak_allocated_gib"] = mem["peak_allocated_bytes"] / 2**30
            record.log(step + 1, row)
        if ckpt_due:
            save_checkpoint(run, ckpt_path, step + 1, fingerprint, record.state(time.perf_counter() - t0))
    _sync(device)
    seconds = record.seconds_before + time.perf_counter() - t0
    with atomic_dir(adapter_out) as tmp:
        ad.save_adapters(run.model, tmp)
    if ckpt_path.exists():
        ckpt_path.unlink()
    window_ms = record.window_ms
    return {"train_seconds": seconds, "steps": steps, "resumed_from": start,
            "final_loss": float(loss) if loss is not None else None,
            "saved_activation_bytes": acts.bytes, "step_mode": mode, "step_ms_median": statistics.median(window_ms) if window_ms else None,
            "trainable_params": sum(p.numel() for p in ad.trainable_parameters(run.model)),
            "train_images_bytes": images.nbytes,
            "is_pretrained": run.meta["is_pretrained"], **peak.read()}
