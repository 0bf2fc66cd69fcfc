"""Which protocol ran, and every remaining deviation from CLIP-LoRA's code, in one place.

The train stage records the protocol facts of its run (`record`) in its metrics; the report lists what ran
and the deviations (`deviations`), those that every run of this pipeline has by construction and those that
follow from params. Reads JSON-like dicts only: the report needs no torch for it.
"""
from __future__ import annotations

# CLIP-LoRA's recipe (docs/protocol.md, "Exactly what CLIP-LoRA's code does"): the values a faithful run uses.
CLIP_LORA = {
    "split_draw": "clip_lora", "batching": "epochs", "template": "clip", "iterations_per_shot": 500,
    "batch_size": 32, "lr": 2e-4, "weight_decay": 1e-2, "schedule": "cosine", "min_lr": 1e-6, "logit_scale": 100.0,
    "lora_r": 2, "lora_alpha": 1, "lora_dropout": 0.25, "lora_targets": ["q", "k", "v"],
    "lora_towers": ["vision", "text"], "lora_layers": "all", "lora_scaling": "rslora",
}
WHAT = {
    "split_draw": "few-shot draw", "batching": "batching", "template": "prompt template",
    "iterations_per_shot": "iterations per shot", "batch_size": "batch size", "lr": "learning rate",
    "weight_decay": "weight decay", "schedule": "lr schedule", "min_lr": "final lr", "logit_scale": "logit scale",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
    "lora_targets": "adapted matrices", "lora_towers": "adapted towers", "lora_layers": "adapted blocks",
    "lora_scaling": "LoRA scaling",
}

PRECISION = ("Precision: CLIP-LoRA keeps fp16 weights with the adapted projections and LoRA in fp32, under fp16 "
             "autocast with a GradScaler; here the frozen base computes in {dtype} in both arms (the 4-bit arm "
             "dequantizes to it), adapters fp32, {autocast} and no GradScaler. One dtype policy for both arms is "
             "the point of the comparison.")

# By construction, whatever params say: each with why it is so.
ALWAYS = [
    "Logits: from fp32 unit features in training and evaluation (CLIP-LoRA's cosine matmul runs in fp16 under "
    "autocast).",
    "Evaluation: both arms run the trained function with the adapters unmerged; CLIP-LoRA merges them into fp32 "
    "copies of the weights (the same function up to rounding; a 4-bit base cannot absorb a merge).",
    "First steps: CLIP-LoRA's GradScaler starts at a loss scale of 65536, which overflows its fp16 gradients, "
    "so its first iteration(s) update nothing while its cosine scheduler still steps (its adapters take fewer "
    "updates, from a learning rate already past the start); here every iteration updates the adapters.",
    "Random streams: the split is CLIP-LoRA's draw for the seed (with split_draw clip_lora), but batch order, "
    "crops, flips, dropout masks and lora_A come from generators of this pipeline, seeded by the seed: the same "
    "distributions as CLIP-LoRA's, not the same draws.",
]

# eval.decode fast (measured on an H200 against PIL; data/images.py tensor_batches)
FAST_DECODE = ("Evaluation inputs: decoded and resized by torchvision on the evaluation device (eval.decode fast: "
               "nvJPEG and CUDA bicubic on a GPU), not by PIL as CLIP-LoRA's: about 0.2 grey levels (mean) from "
               "the reference's pixels on an H200.")


# train.fused_qkv, train.adapter_kernel (qkv.py, lora_triton.py; benchmarks/results/2026-12-04-nvidia-h200-step.md,
# -adapter-kernel.md)
FUSED_QKV = ("Adapter arithmetic: each block's q, k, v adapters run in one function at a rank padded with zeros "
             "(train.fused_qkv; on a GPU in Triton kernels that draw the same masks, train.adapter_kernel), "
             "PEFT's mathematics and dropout masks in another float rounding order than PEFT's per-matrix "
             "modules; on an H200 each of the two moved the adapters after 200 steps about as far as swapping "
             "only the attention kernel does (a few percent, Frobenius).")


def with_evaluation(record: dict, eval_metrics: dict | None) -> dict:
    """A training run's record with how the evaluate stage decoded its test images (eval.decode, from its
    metrics: the train stage does not read the eval group)."""
    decode = (eval_metrics or {}).get("eval_decode")
    return {**record, "eval_decode": decode} if decode else record


def record(data, lora, train, split: dict, meta: dict) -> dict:
    """The protocol facts of one training run, for its metrics file (data, lora, train: those params groups)."""
    t, lo = train, lora
    return {
        "split_draw": data.split_draw, "split_draw_detail": split.get("draw"), "batching": t.batching,
        "template": data.template, "decode_short_side": t.decode_short_side,
        "iterations_per_shot": t.iterations_per_shot, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "lr": t.lr, "weight_decay": t.weight_decay, "schedule": t.schedule, "min_lr": t.min_lr,
        "logit_scale": t.logit_scale, "lora_r": lo.r, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout,
        "lora_targets": list(lo.targets), "lora_towers": list(lo.towers), "lora_layers": lo.layers,
        "lora_scaling": lo.scaling, "activation": meta["activation"], "pretrained": meta["pretrained"],
        "compute_dtype": meta["compute_dtype"], "fused_qkv": t.fused_qkv,
    }


def deviations(protocol: dict) -> list[str]:
    """Every difference from CLIP-LoRA of a run with this protocol record, one sentence each."""
    out = [f"{WHAT[k][0].upper()}{WHAT[k][1:]}: {protocol[k]!r} where CLIP-LoRA uses {v!r}."
           for k, v in CLIP_LORA.items() if protocol.get(k) != v]
    if protocol.get("pretrained") == "openai" and protocol.get("activation") != "quick_gelu":
        out.append("Activation: OpenAI's weights run with exact GELU, but they were trained with QuickGELU "
                   "(model.quick_gelu).")
    side = protocol.get("decode_short_side")
    if side:
        out.append(f"Training images: decoded once with the shorter side at most {side:g}x the input size; on "
                   f"larger files, crops covering less than about {1 / side ** 2:.0%} of the image come from fewer "
                   f"source pixels than CLIP-LoRA's crops of the full-resolution file (data/images.py says why).")
    if protocol.get("eval_decode") == "fast":
        out.append(FAST_DECODE)
    if protocol.get("fused_qkv"):
        out.append(FUSED_QKV)
    dtype = protocol.get("compute_dtype", "bfloat16")
    autocast = "no autocast" if dtype == "float32" else f"{dtype} autocast (bf16 has fp32's exponent range)" \
        if dtype == "bfloat16" else f"{dtype} autocast"
    return out + [PRECISION.format(dtype=dtype, autocast=autocast)] + ALWAYS


def summary_line(protocol: dict) -> str:
    """What ran, in one line."""
    return (f"few-shot draw {protocol['split_draw']} ({protocol.get('split_draw_detail') or 'n/a'}); batching "
            f"{protocol['batching']}; {protocol['iterations_per_shot']} x shots iterations of {protocol['batch_size']}"
            f" ({protocol['grad_accum']} micro-batches); activation {protocol['activation']}; "
            f"prompt template {protocol['template']}")


def markdown(protocols: dict[str, dict]) -> list[str]:
    """The report's section: the protocol of each distinct record, then its deviations."""
    lines = ["## Protocol and deviations from CLIP-LoRA", ""]
    if not protocols:
        return lines + ["No training run recorded its protocol.", ""]
    distinct: dict[str, list[str]] = {}
    for where, protocol in protocols.items():
        distinct.setdefault(repr(sorted(protocol.items(), key=lambda kv: kv[0])), []).append(where)
    for key, wheres in distinct.items():
        protocol = protocols[wheres[0]]
        if len(distinct) > 1:
            lines += [f"Runs {', '.join(wheres)}:", ""]
        lines += [f"What ran: {summary_line(protocol)}.", "", "Deviations:", ""]
        lines += [f"- {d}" for d in deviations(protocol)] + [""]
    return lines
