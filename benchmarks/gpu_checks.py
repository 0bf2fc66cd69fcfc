"""GPU checks that CPU CI cannot make (run on a CUDA machine; results go to --out as JSON).

1. The CUDA-graph step gives the same losses and adapter weights as the straightforward eager step (same
   seeds), for every method (checkpointed ones included). Straightforward: one stream (no side stream for
   the text tower) and bitsandbytes' double-quantized absmax dequantised at every use (no expand_absmax).
2. Checkpointing changes nothing but memory and time: lora_gc trains exactly like lora (qlora_gc like qlora),
   dropout on, since every block draws its masks from its own seeded generators (clip_qlora/core/blocks.py).
3. Wall time of the whole 4-shot protocol for one 100-class dataset (2000 steps of 32) through the real
   training loop (`train_seed`: sampling, device augmentation, graph replay, logging windows).
4. eval_input: the evaluation inputs of both eval.decode paths against the reference's pixels (PIL decode,
   PIL bicubic resize of the shorter side, centre crop), in grey levels: (a) photo-like 4:2:0 JPEGs of several
   sizes (scikit-image's sample photos when it imports, else synthetic scenes); (b) PNG (RGB, RGBA, palette,
   grey, 16-bit) and WebP files in batches without a JPEG, through the device decode of the fast path. The
   reference path must be within 0.01 mean (it is PIL's own pipeline: 0 expected); the fast path's numbers
   are what the report's deviation says; (c) the JPEGs a user's own folder may hold that are not plain RGB
   (grey, CMYK, an EXIF orientation tag), through the fast path's device decode alone: grey and CMYK within
   VARIANT_TOLERANCE of PIL's colours (a wrong colour conversion is off by tens of levels); the tagged file at
   PIL's size (orientation not applied, as PIL does not) and equal to the same picture saved untagged (its
   colours differ from PIL's by the decoder's chroma upsampling, as any RGB JPEG's do on this path: 2.7 grey
   levels on this sharp-edged picture on the H200). Needs only torch, torchvision, PIL and numpy; --device cpu
   runs it here (the tests do):

       python benchmarks/gpu_checks.py --checks eval_input --out DIR [--device cpu]
5. adapter_kernel: the masks train.adapter_kernel triton draws (core/lora_triton.py) are torch's own CUDA
   dropout masks, bit for bit, for the shapes the study trains (image tokens at batch 32 and 4, the text
   tower's prompts, a wider model), seeds below and above 2^32, after an earlier draw from the generator;
   and the kernel's h is torch's dropped x times A^T within bf16 rounding. Needs only torch and Triton.
6. quick_gelu: runtime.fused_activation's kernels (core/quick_gelu.py) against open_clip's QuickGELU on the GPU,
   bit for bit, forward and backward (four random output gradients), for every finite bf16 input; also reports
   how many bits differ with multiply-add contraction switched the other way. Needs torch, Triton, open_clip.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

# The training checks' imports are made where they are used: the eval_input check needs none of them
# (open_clip, PEFT, bitsandbytes).

TRAINING_CHECKS = ("graph", "checkpoint", "protocol")
TOLERANCE = 0.01  # grey levels, mean over pixels: the reference path's bound (issue 23)
VARIANT_TOLERANCE = 1.0  # grey levels, mean: the device decode of a grey or CMYK JPEG against PIL's


def run_steps(base_dir, method, use_graph, steps, micro, accum, straight=False, short=0):
    """`steps` steps of micro x accum images; with `short`, every other batch has `short` images (an epoch's
    short last batch, as train.batching: epochs makes them), which the graph path captures separately.
    straight: one stream, and (the base's settings) absmax dequantised at every use; see main()."""
    from clip_qlora import config
    from clip_qlora.jobs.profile import synthetic_prompts
    from clip_qlora.core.step import build_run, optimizer_step, groups_of
    from clip_qlora.core.graphs import make_step

    p = config.load_with({"runtime.overlap_text": not straight})
    torch.manual_seed(0)
    run = build_run(base_dir, method, synthetic_prompts(100), "cuda", steps, **groups_of(p))
    g = torch.Generator(device="cuda").manual_seed(0)
    losses, step_fn, mode = [], None, "eager"
    for s in range(steps):
        n = short if short and s % 2 else micro * accum
        x = torch.randn(n, 3, 224, 224, generator=g, device="cuda")
        y = torch.randint(0, 100, (n,), generator=g, device="cuda")
        batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, n, micro)]
        torch.manual_seed(1000 + s)
        if s == 0 or not use_graph:
            loss = optimizer_step(run, batches)
        else:
            if step_fn is None:
                step_fn, mode = make_step(run, batches, True)
            loss = step_fn(batches)
        losses.append(float(loss))
    params = {n: p.detach().float().cpu() for n, p in run.model.named_parameters() if p.requires_grad}
    return losses, params, mode


def graph_equivalence(base_dir, straight_dir, method, micro, accum, steps=6, short=0):
    le, pe, _ = run_steps(straight_dir, method, False, steps, micro, accum, straight=True, short=short)
    lg, pg, mode = run_steps(base_dir, method, True, steps, micro, accum, short=short)
    diff = max((pe[n] - pg[n]).abs().max().item() for n in pe)
    scale = max(pe[n].abs().max().item() for n in pe)
    return {"mode": mode, "loss_eager": le, "loss_graph": lg,
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(le, lg)),
            "max_abs_param_diff": diff, "max_abs_param": scale}


def checkpoint_equivalence(base_dir, method, micro, accum, steps=4):
    """Eager steps of method and method_gc from the same init and seeds."""
    lp, pp, _ = run_steps(base_dir, method, False, steps, micro, accum)
    lc, pc, _ = run_steps(base_dir, f"{method}_gc", False, steps, micro, accum)
    return {"loss": lp, "loss_gc": lc, "max_abs_loss_diff": max(abs(a - b) for a, b in zip(lp, lc)),
            "max_abs_param_diff": max((pp[n] - pc[n]).abs().max().item() for n in pp),
            "max_abs_param": max(pp[n].abs().max().item() for n in pp)}


def protocol_time(base_dir, method, n_classes=100, shots=4):
    from clip_qlora import config
    from clip_qlora.data.images import TrainImages
    from clip_qlora.jobs.profile import synthetic_prompts
    from clip_qlora.core.step import groups_of
    from clip_qlora.jobs.train import train_seed

    p = config.load_with()
    g = torch.Generator().manual_seed(0)
    # 4:3 images at the stored resolution of a 500x375 photo (decode_short_side 2.0: kept whole)
    pixels = torch.randint(0, 256, (n_classes * shots, 3, 375, 500), dtype=torch.uint8, generator=g)
    images = TrainImages(pixels, [(375, 500)] * len(pixels), torch.arange(n_classes).repeat_interleave(shots))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = train_seed(method, base_dir, synthetic_prompts(n_classes), images, 1, "cuda",
                       Path(tmp) / "adapters", Path(tmp) / "ckpt.pt", description=f"protocol {method}", shots=p.data.shots, **groups_of(p))
        r["wall_seconds_including_load"] = time.perf_counter() - t0
    return r


# ---- 4. eval_input -------------------------------------------------------------------------------------------

# Dataset-like sizes (width, height): Pets/Flowers ~500x375 both ways, FGVCAircraft ~1000x700, UCF101 mid-frames,
# EuroSAT, Caltech101, Food101, and odd sizes whose centre crop falls between pixels.
SIZES = [(500, 375), (375, 500), (1000, 700), (320, 240), (64, 64), (300, 200), (512, 384), (641, 427), (251, 333)]
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
                  "retina", "camera", "coins", "moon", "page", "text", "grass", "gravel", "brick", "clock")


def quick_gelu_exact(device: str = "cuda") -> dict:
    """Check 6 (see the module docstring)."""
    from open_clip.transformer import QuickGELU

    from clip_qlora.core import quick_gelu as Q

    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(device)
    x = x[torch.isfinite(x.float())].contiguous()
    subnormal = (x.float().abs() < 2.0 ** -126) & (x != 0)
    xt = x.clone().requires_grad_(True)
    y_ref = QuickGELU()(xt)
    grads = [(torch.randn(x.shape, device=device, generator=torch.Generator(device).manual_seed(s)) * 4)
             .to(torch.bfloat16) for s in range(4)]
    gx_ref = [torch.autograd.grad(y_ref, xt, g, retain_graph=True)[0] for g in grads]

    def differ(a, b):  # elements whose bits differ: all, and at subnormal inputs
        d = a.view(torch.int16) != b.view(torch.int16)
        return int(d.sum()), int((d & subnormal).sum())

    out, fusion = {"inputs": int(x.numel()), "subnormal_inputs": int(subnormal.sum())}, Q.FP_FUSION
    try:
        for variant in (fusion, not fusion):  # the shipped setting first; the other shows whether it matters
            Q.FP_FUSION = variant
            fwd = differ(Q.forward(x), y_ref.detach())
            bwd = [differ(Q.backward(x, g), r) for g, r in zip(grads, gx_ref)]
            out[f"fp_fusion_{variant}"] = {"forward_differ": fwd, "backward_differ": bwd}
    finally:
        Q.FP_FUSION = fusion
    shipped = out[f"fp_fusion_{fusion}"]
    out["pass"] = shipped["forward_differ"][0] == 0 and all(b[0] == 0 for b in shipped["backward_differ"])
    print(f"quick_gelu: {json.dumps(out)} -> {'PASS' if out['pass'] else 'FAIL'}", flush=True)
    return out


def adapter_kernel_masks(device: str = "cuda", p: float = 0.25) -> dict:
    """Check 5 (see the module docstring)."""
    from clip_qlora.core import lora_triton as lt
    from clip_qlora.core.blocks import Draws, drawing_from

    cases, ok = {}, True
    for n_rows, d in ((32 * 197, 768), (4 * 197, 768), (100 * 11, 512), (32 * 257, 1024)):
        for seed in (12345, 2**40 + 7):
            x = torch.randn(n_rows, d, device=device).to(torch.bfloat16)
            a = [torch.randn(2, d, device=device) * 0.05 for _ in range(3)]
            gen = torch.Generator(device=device).manual_seed(seed)
            draws = Draws(gen, torch.tensor([seed], device=device))
            with drawing_from(draws):  # what torch's dropout draws from this generator: one draw, then q, k, v
                torch.native_dropout(x, p, True)
                ref = [torch.native_dropout(x, p, True) for _ in range(3)]
            threads, inc = lt.layout(x.numel(), x.device)
            xa, bits = lt.forward(x, a, draws.seed, [inc * (1 + j) for j in range(3)], p, threads, 1.0)
            h = xa[:, d:]
            shifts = torch.arange(4, device=device, dtype=torch.int32)  # bit q of byte g: element 4 g + q
            keep = ((bits[..., None].to(torch.int32) >> shifts) & 1).reshape(3, n_rows, d).bool()
            equal = [bool(torch.equal(keep[j], ref[j][1])) for j in range(3)]
            rel = max(float((h[:, j * lt.HW:j * lt.HW + 2].float() - (ref[j][0] @ a[j].to(torch.bfloat16).t()).float())
                            .norm() / (ref[j][0] @ a[j].to(torch.bfloat16).t()).float().norm()) for j in range(3))
            cases[f"{n_rows}x{d}-seed{seed}"] = {"masks_equal_qkv": equal, "h_rel_frobenius_max": rel,
                                                 "threads": threads, "offset_increment": inc}
            ok = ok and all(equal) and rel < 1e-2
            print("adapter_kernel", n_rows, d, seed, equal, f"{rel:.2e}", flush=True)
    return {"pass": ok, "cases": cases}


def synthetic_scene(width: int, height: int, seed: int):
    """A photo-like RGB image: smooth colour fields, sharp-edged shapes, and sensor-like noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3 + seed % 4, 4 + seed % 3, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def photo_like_images(max_photos: int = 24) -> tuple[str, list]:
    """(source, [(name, RGB image)]): scikit-image's sample photos, each also brought to one of SIZES, when it
    imports; else synthetic scenes at every size of SIZES."""
    from PIL import Image

    try:
        from skimage import data as sk
    except ImportError:
        return "synthetic", [(f"scene{k}", synthetic_scene(w, h, k)) for k, (w, h) in enumerate(SIZES)]
    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            photos.append((name, Image.fromarray(getattr(sk, name)()).convert("RGB")))
        except Exception:  # noqa: BLE001  (a photo this scikit-image does not ship: fetching needs a network)
            continue
    photos += [(f"{name}_{w}x{h}", image.resize((w, h), Image.LANCZOS))
               for k, (name, image) in enumerate(list(photos)) for w, h in [SIZES[k % len(SIZES)]]]
    return "scikit-image", photos[:max_photos]


def other_format_images(root: Path) -> list[str]:
    """Files of every non-JPEG kind a user's folder may hold; the names of those written."""
    import numpy as np
    from PIL import Image

    scene = synthetic_scene(160, 120, 99)
    grey = np.asarray(scene.convert("L"), dtype=np.uint16)
    rgba = scene.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(scene.size))
    files = {"rgb.png": scene, "rgba.png": rgba, "palette.png": scene.quantize(64), "grey.png": scene.convert("L"),
             "grey16.png": Image.fromarray(grey * 257), "lossy.webp": scene, "lossless.webp": scene}
    for name, image in files.items():
        image.save(root / name, **({"lossless": True} if name == "lossless.webp" else {}))
    return list(files)


def jpeg_variant_images(root: Path) -> list[str]:
    """JPEGs that are not plain RGB: grey, CMYK, and one whose EXIF tag asks for a 90-degree turn, with the same
    picture saved without the tag (plain.jpg, the last name); their names."""
    scene = synthetic_scene(160, 120, 98)
    exif = scene.getexif()
    exif[0x0112] = 6
    scene.convert("L").save(root / "grey.jpg", quality=90)
    scene.convert("CMYK").save(root / "cmyk.jpg", quality=90)
    scene.save(root / "exif_turned.jpg", quality=90, exif=exif.tobytes())
    scene.save(root / "plain.jpg", quality=90)
    return ["grey.jpg", "cmyk.jpg", "exif_turned.jpg", "plain.jpg"]


def reference_input(path: Path, size: int):
    """uint8 (size, size, 3): what CLIP-LoRA's evaluation feeds, from PIL alone (protocol.md): decode, convert
    to RGB, bicubic resize of the shorter side to `size` (the longer side truncated, as torchvision's Resize
    computes it), centre crop (torchvision's rounding)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _grey_level_diffs(batches, refs) -> list[dict]:
    """Per image: mean and max |ours - reference| in grey levels (batches normalised with mean 0, std 1: both
    paths' x are uint8 / 255, rounded back here)."""
    import numpy as np

    ours = np.concatenate([(x.float().cpu() * 255).round().permute(0, 2, 3, 1).numpy() for x, _ in batches])
    assert len(ours) == len(refs), (len(ours), len(refs))
    return [{"mean": float(np.abs(a - r).mean()), "max": float(np.abs(a - r).max())} for a, r in zip(ours, refs)]


def _summary(diffs: list[dict], names: list[str]) -> dict:
    import numpy as np

    worst = int(np.argmax([d["mean"] for d in diffs]))
    mean = float(np.mean([d["mean"] for d in diffs]))
    return {"n": len(diffs), "mean": mean, "max": max(d["max"] for d in diffs), "worst_image": names[worst],
            "worst_image_mean": diffs[worst]["mean"], "pass": mean < TOLERANCE}


def eval_input(root: Path, device: str, size: int = 224, batch_size: int = 16, workers: int = 2,
               max_photos: int = 24) -> dict:
    """Check 4 (module docstring) in folder `root`; {"pass": ...} says whether the reference path and the
    decoding of JPEG-free batches hold."""
    import numpy as np
    import torchvision
    from PIL import Image
    from torchvision.io import decode_jpeg, read_file

    from clip_qlora.data.images import _decode_many, eval_batches

    root = Path(root)
    source, photos = photo_like_images(max_photos)
    jpegs = []
    for name, image in photos:
        image.save(root / f"{name}.jpg", quality=90, subsampling=2)  # 4:2:0, as photo datasets are stored
        jpegs.append(f"{name}.jpg")
    others = other_format_images(root)
    out = {"device": str(device), "jpeg_source": source, "size": size, "tolerance_grey_levels": TOLERANCE,
           "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "pillow": Image.__version__}}

    def run(key, names, decode, batch):
        """One path over `names`, against the PIL reference; an exception is recorded, not raised."""
        split = {"test": [[n, 0] for n in names]}
        try:
            diffs = _grey_level_diffs(eval_batches(split, root, size, (0, 0, 0), (1, 1, 1), batch, workers, device,
                                                   decode), [reference_input(root / n, size) for n in names])
            out[key] = _summary(diffs, names)
        except Exception as e:  # noqa: BLE001
            out[key] = {"pass": False, "error": f"{type(e).__name__}: {e}"}
        r = out[key]
        print(f"eval_input {key}: " + (r.get("error") or f"{r['n']} images, mean {r['mean']:.4f}, max {r['max']:.0f}"
                                       f", worst image {r['worst_image']} {r['worst_image_mean']:.4f}")
              + f" -> {'pass' if r['pass'] else 'FAIL'} (mean < {TOLERANCE})", flush=True)

    # (a) photo-like JPEGs: both paths; the fast path's decode alone, at full resolution
    for decode in ("reference", "fast"):
        run(f"jpeg_{decode}", jpegs, decode, batch_size)
    decoded = _decode_many([read_file(str(root / n)) for n in jpegs], [root / n for n in jpegs], device, decode_jpeg)
    full = [float(np.abs(d.permute(1, 2, 0).cpu().numpy().astype(np.float32)
                         - np.asarray(Image.open(root / n).convert("RGB"), dtype=np.float32)).mean())
            for d, n in zip(decoded, jpegs)]
    out["jpeg_fast_decode_only"] = {"mean": float(np.mean(full)), "worst_image_mean": max(full)}
    print(f"eval_input jpeg_fast_decode_only (full resolution): mean {np.mean(full):.4f}, worst image "
          f"{max(full):.4f}", flush=True)
    # (b) batches without a JPEG, one file per batch and all in one; then a JPEG among them
    for decode in ("reference", "fast"):
        for batch in (1, len(others)):
            run(f"other_{decode}_batch{batch}", others, decode, batch)
    run("mixed_fast", [jpegs[0], *others], "fast", len(others) + 1)
    try:  # the device decode of a JPEG-free batch is PIL's: the very same pixels
        decoded = _decode_many([read_file(str(root / n)) for n in others], [root / n for n in others], device,
                               decode_jpeg)
        exact = all(np.array_equal(d.permute(1, 2, 0).cpu().numpy(), np.asarray(Image.open(root / n).convert("RGB")))
                    for d, n in zip(decoded, others))
        out["other_decode_only"] = {"files": others, "equal_to_pil": exact, "pass": exact}
    except Exception as e:  # noqa: BLE001
        out["other_decode_only"] = {"files": others, "pass": False, "error": f"{type(e).__name__}: {e}"}
    print(f"eval_input other_decode_only: {out['other_decode_only']}", flush=True)
    # (c) grey, CMYK and EXIF-tagged JPEGs: the device decode keeps PIL's size and colours
    variants = jpeg_variant_images(root)
    try:
        decoded = _decode_many([read_file(str(root / n)) for n in variants], [root / n for n in variants], device,
                               decode_jpeg)
        files = {}
        for d, n in zip(decoded, variants):
            ours = d.permute(1, 2, 0).cpu().numpy().astype(np.float32)
            ref = np.asarray(Image.open(root / n).convert("RGB"), dtype=np.float32)
            files[n] = {"shape": list(ours.shape), "pil_shape": list(ref.shape),
                        "mean": float(np.abs(ours - ref).mean()) if ours.shape == ref.shape else None}
        # grey and CMYK: PIL's colours. An RGB JPEG's colours differ by the decoder's chroma upsampling (the fast
        # path's known deviation, jpeg_fast_decode_only), so the EXIF-tagged one is held to what matters: the
        # tag changes nothing (same size as PIL's unturned picture, the same pixels as the untagged file)
        turned, plain = decoded[variants.index("exif_turned.jpg")], decoded[variants.index("plain.jpg")]
        files["exif_turned.jpg"]["equal_to_untagged"] = bool(torch.equal(turned, plain))
        ok = (all(files[n]["mean"] is not None and files[n]["mean"] < VARIANT_TOLERANCE for n in ("grey.jpg", "cmyk.jpg"))
              and files["exif_turned.jpg"]["shape"] == files["exif_turned.jpg"]["pil_shape"]
              and files["exif_turned.jpg"]["equal_to_untagged"])
        out["jpeg_variants_decode_only"] = {"files": files, "tolerance_grey_levels": VARIANT_TOLERANCE, "pass": ok}
    except Exception as e:  # noqa: BLE001
        out["jpeg_variants_decode_only"] = {"files": variants, "pass": False, "error": f"{type(e).__name__}: {e}"}
    print(f"eval_input jpeg_variants_decode_only: {out['jpeg_variants_decode_only']}", flush=True)
    # what must hold: the default (reference) path everywhere, and every JPEG-free batch decoded by the fast path
    # (its resize is not the reference's: its numbers are the deviation the report lists)
    reference = [k for k in out if "_reference" in k]
    fast_other = [k for k in out if k.startswith("other_fast") or k == "mixed_fast"]
    out["pass"] = (all(out[k]["pass"] for k in reference) and all("error" not in out[k] for k in fast_other)
                   and out["other_decode_only"]["pass"] and out["jpeg_variants_decode_only"]["pass"])
    print(f"eval_input: {'PASS' if out['pass'] else 'FAIL'} (device {device})", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method")
    ap.add_argument("--shapes", nargs="+", default=["32x1", "4x8"],
                    help="micro x accumulation for the graph check; '32x1+8': every other batch has 8 images")
    ap.add_argument("--checks", nargs="+", default=list(TRAINING_CHECKS),
                    choices=(*TRAINING_CHECKS, "eval_input", "adapter_kernel", "quick_gelu"))
    ap.add_argument("--protocol-methods", nargs="+", default=["lora", "qlora", "qlora_gc"])
    ap.add_argument("--device", default="cuda", help="eval_input only: cpu runs it without a GPU")
    args = ap.parse_args()
    cuda = str(args.device).startswith("cuda")
    out = {"gpu": torch.cuda.get_device_name(args.device) if cuda else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        if "eval_input" in args.checks:
            (Path(tmp) / "eval_input").mkdir()
            out["eval_input"] = eval_input(Path(tmp) / "eval_input", args.device)
        if "adapter_kernel" in args.checks:
            out["adapter_kernel"] = adapter_kernel_masks(args.device)
        if "quick_gelu" in args.checks:
            out["quick_gelu"] = quick_gelu_exact(args.device)
        if set(args.checks) & set(TRAINING_CHECKS):
            out.update(training_checks(args, Path(tmp)))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = ("gpu_checks.json" if set(args.checks) & set(TRAINING_CHECKS)
            else f"gpu_checks_{'_'.join(sorted(args.checks))}.json")
    (Path(args.out) / name).write_text(json.dumps(out, indent=2))
    if any(not out[c]["pass"] for c in ("eval_input", "adapter_kernel", "quick_gelu") if c in args.checks):
        sys.exit(1)


def training_checks(args, tmp: Path) -> dict:
    """Checks 1-3 on CUDA, on random ViT-B-16 bases of each backend made in `tmp`."""
    from clip_qlora.core import backends
    from clip_qlora import config
    from clip_qlora.core.base import make_base, save_base
    from clip_qlora.core.model import stand_in_quick_gelu
    from clip_qlora.runtime.io import versions
    from clip_qlora.runtime.processes import FreshProcesses

    out = {"versions": versions(), "graph": {}, "checkpoint": {}, "protocol": {}}
    study = config.load_with()
    for base in backends.BACKENDS:
        s = backends.get(base).settings(study)
        m, meta = make_base("ViT-B-16", "none", base, s, torch.bfloat16, "cuda",
                            stand_in_quick_gelu("ViT-B-16", study.model))  # the study's activation
        save_base(m, meta, tmp / base)
        if s and s.get("expand_absmax"):  # the straightforward twin: the same tensors, absmax kept 8-bit
            save_base(m, {**meta, "settings": {**s, "expand_absmax": False}}, tmp / f"{base}-straight")
        del m

    def base_of(method, straight=False):
        base = backends.METHODS[method].base
        return tmp / (f"{base}-straight" if straight and (tmp / f"{base}-straight").exists() else base)

    # each check in a fresh process, none importing while another measures (protocol_time times a run)
    with FreshProcesses("cuda", ahead=0) as fresh:
        if "graph" in args.checks:
            for method in args.methods or list(backends.METHODS):
                for spec in args.shapes:
                    shape, _, short = spec.partition("+")
                    micro, accum = config.parse_batch(shape)
                    key = f"{method}-{spec}"
                    out["graph"][key] = fresh(graph_equivalence, base_of(method), base_of(method, True), method,
                                              micro, accum, 6, int(short or 0))
                    print("graph", key, json.dumps(out["graph"][key])[:400], flush=True)
        if "checkpoint" in args.checks:
            for arm in (b.method for b in backends.BACKENDS.values()):
                out["checkpoint"][arm] = fresh(checkpoint_equivalence, base_of(arm), arm, 32, 1)
                print("checkpoint", arm, json.dumps(out["checkpoint"][arm])[:400], flush=True)
        if "protocol" in args.checks:
            for method in args.protocol_methods:
                out["protocol"][method] = fresh(protocol_time, base_of(method), method)
                print("protocol", method, json.dumps(out["protocol"][method]), flush=True)
    return out


if __name__ == "__main__":
    main()
