"""Loading an open_clip CLIP and making it adaptable: split attention, one precision policy, text encoding.

Both arms of the study start here with identical weights and dtypes; the backends (bf16, nf4) differ only in
how the frozen block Linears are stored afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from clip_qlora.core import archs
from clip_qlora.core.archs import CONFIG_DIR
from clip_qlora.runtime.io import UserError

log = logging.getLogger(__name__)

# Random-init weights must be the same in both arms (and across stages), so they come from a fixed seed.
INIT_SEED = 0
BLOCK_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


def register_configs() -> None:
    """Make the shipped architectures (clip-tiny) known to open_clip by name."""
    if "clip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


class SplitAttention(nn.Module):
    """Multi-head attention with separate q, k, v and out Linears.

    open_clip packs q, k and v into one `in_proj_weight` of `nn.MultiheadAttention`; PEFT LoRA and
    bitsandbytes both need ordinary `nn.Linear` modules, so the packed weight is split once here.
    """

    def __init__(self, mha: nn.MultiheadAttention, causal: bool):
        super().__init__()
        d, self.num_heads, self.causal = mha.embed_dim, mha.num_heads, causal
        bias = mha.in_proj_bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                lin.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if bias:
                    lin.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        # Called like nn.MultiheadAttention by open_clip's block (batch_first). The text tower's float mask is
        # the plain causal mask, so `is_causal` replaces it and lets SDPA pick its flash/efficient kernels.
        k_x = q_x if k_x is None else k_x
        v_x = q_x if v_x is None else v_x
        b, n, d = q_x.shape
        h = self.num_heads

        def heads(t):
            return t.view(b, -1, h, d // h).transpose(1, 2)

        fused = getattr(self, "fused_qkv", None)  # clip_qlora.core.qkv, set for training by train.fused_qkv
        if fused is not None and self.training and k_x is q_x and v_x is q_x:
            q, k, v = (t.transpose(1, 2) for t in fused(q_x).view(b, n, 3, h, d // h).unbind(2))
        else:
            q, k, v = heads(self.q_proj(q_x)), heads(self.k_proj(k_x)), heads(self.v_proj(v_x))
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = None if attn_mask is None else attn_mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


def split_attention(model: nn.Module) -> nn.Module:
    """Replace every nn.MultiheadAttention in both towers by SplitAttention (in place)."""
    for tower, causal in ((model.visual, False), (model, True)):
        for block in tower.transformer.resblocks:
            if isinstance(block.attn, nn.MultiheadAttention):
                if not block.attn.batch_first:
                    raise UserError("model: only batch-first open_clip transformers are supported")
                block.attn = SplitAttention(block.attn, causal=causal)
    return model


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a local checkpoint safely: safetensors, or torch.load with weights_only=True (no pickled code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        raise UserError(f"model.pretrained: {path} does not fit the architecture "
                        f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")


def resolve_quick_gelu(arch: str, pretrained: str, setting) -> bool:
    """The activation the weights were trained with: QuickGELU (x * sigmoid(1.702 x)) or exact GELU.

    OpenAI's CLIP weights were trained with QuickGELU, but open_clip's plain configs (ViT-B-16) build nn.GELU
    and only warn when the `openai` tag's weights are loaded into them: every number would come from a model
    running another function than the one it was trained with. `auto` reads the tag's pretrained config (the
    fact open_clip keeps for each tag), uses the architecture's own config for random weights, and refuses to
    guess for a local checkpoint, whose file does not say.
    """
    archs.check_quick_gelu(setting)
    if isinstance(setting, bool):
        return setting
    if pretrained in ("none", "", None):
        return bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if _is_local(pretrained):
        raise UserError(f"model.quick_gelu: auto cannot tell which activation the local checkpoint {pretrained} "
                        f"was trained with; set model.quick_gelu to true (OpenAI CLIP weights) or false")
    return bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))


def stand_in_quick_gelu(arch: str, model) -> bool:
    """The activation random weights standing in for the configured model's train with (the benchmarks).

    model: params' model group. For `model.arch` it is what `model.pretrained` would run (`resolve_quick_gelu`:
    QuickGELU for OpenAI's ViT-B/16, which the study trains); for another architecture, that architecture's
    own. Speed and memory depend on the activation (QuickGELU is three elementwise kernels and keeps one more
    tensor per block; GELU one), so a resource benchmark must build the function the study runs.
    """
    pretrained = model.pretrained if arch == model.arch else "none"
    return resolve_quick_gelu(arch, pretrained, model.quick_gelu)


def _is_local(pretrained: str) -> bool:
    path = Path(str(pretrained)).expanduser()
    return path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.exists()


def activation_kwargs(quick_gelu: bool) -> dict:
    # force_quick_gelu is open_clip's switch for True; a `-quickgelu` config is turned back with the model kwarg
    return {"force_quick_gelu": True} if quick_gelu else {"quick_gelu": False}


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init():
    """open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger for every model
    built without a tag; for a skeleton that saved weights fill, that line is wrong, so it is dropped here."""
    root = logging.getLogger()
    f = _DropRandomInitNotice()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def uses_quick_gelu(model: nn.Module) -> bool:
    """True when every block MLP of both towers runs QuickGELU (open_clip builds all of them alike)."""
    acts = [type(block.mlp.gelu).__name__ for tower in (model.visual, model)
            for block in tower.transformer.resblocks]
    return all(a == "QuickGELU" for a in acts)


def create_clip(arch: str, pretrained: str, quick_gelu="auto", device: str = "cpu") -> tuple[nn.Module, bool]:
    """Build an fp32 open_clip CLIP. Returns (model, pretrained?) — random init is not a result.

    `quick_gelu`: auto, True or False (see `resolve_quick_gelu`); `uses_quick_gelu(model)` tells which ran.
    `device="meta"`: a skeleton with no values (for saved weights to fill; no "random weights" warning).
    """
    archs.check(arch, "model.arch")
    register_configs()
    if not (pretrained in ("none", "", None) or _is_local(pretrained)
            or pretrained in open_clip.list_pretrained_tags_by_model(arch)):
        raise UserError(f"model.pretrained: {pretrained!r} is not an open_clip tag for {arch} "
                        f"(known: {open_clip.list_pretrained_tags_by_model(arch)}), a local checkpoint, or 'none'")
    path = Path(str(pretrained)).expanduser()
    if _is_local(pretrained) and not path.exists():
        raise UserError(f"model.pretrained: checkpoint {path} not found")
    act = activation_kwargs(resolve_quick_gelu(arch, pretrained, quick_gelu))
    torch.manual_seed(INIT_SEED)
    if pretrained in ("none", "", None):
        if device != "meta":
            log.warning("model.pretrained is 'none': random weights. Memory and time are real, accuracy is not.")
        # open_clip's own "initialized randomly" line: a second one beside ours, or, for a skeleton that saved
        # weights fill, a wrong one
        with _quiet_random_init():
            return open_clip.create_model(arch, pretrained=None, device=device, **act), False
    if _is_local(pretrained):
        model = open_clip.create_model(arch, pretrained=None, **act)
        _load_checkpoint(model, path)
        return model, True
    try:
        return open_clip.create_model(arch, pretrained=pretrained, **act), True
    except Exception as e:  # hub errors come in many types; all mean the weights are not here
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        raise UserError(
            f"model.pretrained: weights {arch}/{pretrained} are not in the Hugging Face cache"
            f"{' and HF_HUB_OFFLINE is set' if offline else ' and could not be downloaded'} ({type(e).__name__}); "
            f"either run once with network to cache them, or set model.pretrained to a local "
            f".safetensors/.pt checkpoint") from None


def prepare_precision(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """One precision policy for both arms: everything in compute_dtype except LayerNorms, kept in fp32."""
    model.to(compute_dtype)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()
    return model


def autocast(device: str, compute_dtype: torch.dtype):
    """The one autocast policy, training's and scoring's: matmuls in the compute dtype, what autocast keeps in
    fp32 (LayerNorm, softmax, the loss) in fp32; in fp32 nothing to cast."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=compute_dtype)


def _layernorm_in(ln: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor):
    if x.dtype != weight.dtype:
        return type(ln).forward(ln, x)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, ln.normalized_shape, weight, bias, ln.eps)


def layernorms_in_compute_dtype(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Let LayerNorms take compute-dtype input as it is, instead of autocast's fp32 round trip (training).

    The precision policy keeps LayerNorm weights in fp32, so autocast runs every LayerNorm in fp32: a copy of
    the bf16 input up to fp32, the kernel, a copy back down, and the same casts again in backward. torch's
    LayerNorm kernel on bf16 input already computes in fp32 and rounds once at the end; with the weights held
    in bf16 (exact: they were bf16 values before the policy widened them) its output and input gradient were
    bitwise those of the round trip on the H200, at the study's shapes (runtime.layernorm_in_compute_dtype;
    benchmarks/results/2026-12-04-nvidia-h200-step.md). A LayerNorm whose weights do not survive the cast
    unchanged keeps the round trip. Returns how many were switched.
    """
    n = 0
    for ln in model.modules():
        if not isinstance(ln, nn.LayerNorm) or ln.weight is None:
            continue
        w = ln.weight.detach().to(compute_dtype)
        b = None if ln.bias is None else ln.bias.detach().to(compute_dtype)
        if torch.equal(w.float(), ln.weight.float()) and (b is None or torch.equal(b.float(), ln.bias.float())):
            # an instance attribute shadows the class's forward for this module only (as blocks.py does)
            ln.forward = functools.partial(_layernorm_in, ln, w, b)
            n += 1
    return n


def build_base(arch: str, pretrained: str, compute_dtype: torch.dtype, quick_gelu="auto",
               device: str = "cpu") -> tuple[nn.Module, bool]:
    """open_clip CLIP with split attention in the common precision, frozen, on CPU (or a meta skeleton)."""
    model, is_pretrained = create_clip(arch, pretrained, quick_gelu, device)
    split_attention(model)
    prepare_precision(model, compute_dtype)
    model.requires_grad_(False)
    model.eval()
    return model, is_pretrained


def block_linears(model: nn.Module):
    """(name, parent, attr, Linear) for every q/k/v/out/c_fc/c_proj Linear of both towers' blocks."""
    for prefix, tower in (("visual.transformer", model.visual.transformer), ("transformer", model.transformer)):
        for i, block in enumerate(tower.resblocks):
            for path in BLOCK_LINEARS:
                parent_name, attr = path.split(".")
                parent = getattr(block, parent_name)
                yield f"{prefix}.resblocks.{i}.{path}", parent, attr, getattr(parent, attr)


# ---- features ----------------------------------------------------------------------------------------

@dataclass
class TextTokens:
    """Class prompts tokenised and cut after the longest prompt's end-of-text token."""
    tokens: torch.Tensor  # (n_classes, context)

    @classmethod
    def from_prompts(cls, prompts: list[str], arch: str, truncate: bool = True) -> "TextTokens":
        tok = open_clip.get_tokenizer(arch)(prompts)
        if truncate:
            # The text tower is causal and pools at the EOT token (the largest id), so tokens after the
            # longest prompt's EOT cannot change any class feature: drop them (9 instead of 77 tokens typically).
            tok = tok[:, : int(tok.argmax(dim=-1).max()) + 1]
        return cls(tok)


def embed_prompts(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The text tower's input: token plus position embeddings, in the tower's cast dtype."""
    n = tokens.shape[1]
    cast = model.transformer.get_cast_dtype()
    return model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)


def encode_text(model: nn.Module, tokens: torch.Tensor, embedded: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's encode_text for any context length <= the model's (unnormalised features).

    `embedded`: `embed_prompts(model, tokens)` computed beforehand (both embeddings are frozen, so a training
    run computes it once and need not keep the 49408-row token table on the GPU).
    """
    n = tokens.shape[1]
    x = embed_prompts(model, tokens) if embedded is None else embedded
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n] if model.attn_mask is not None else None)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type)
    if isinstance(model.text_projection, nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def encode_image(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.visual(images)


def unit(features: torch.Tensor) -> torch.Tensor:
    """Features in fp32 on the unit sphere: what training and evaluation both take their logits from."""
    return F.normalize(features.float(), dim=-1)


def cosine_logits(image_unit: torch.Tensor, text_unit: torch.Tensor, scale: float) -> torch.Tensor:
    """scale x cosine similarity, computed in fp32 whatever autocast is on (the matmul would otherwise run in
    the compute dtype, and bf16 rounds the cosines of 100 close classes to a few significant digits)."""
    with torch.autocast(image_unit.device.type, enabled=False):
        return scale * image_unit @ text_unit.t()


def preprocess_stats(model: nn.Module) -> tuple[int, tuple, tuple]:
    """Input size and normalisation of the vision tower."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return int(size), tuple(mean), tuple(std)
