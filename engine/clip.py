"""Image conditioning: the CLIP ViT-H/14 visual tower as Animate uses it, and its preprocessing.

What Animate feeds the DiT as `clip_fea` (reference NOTES §5, §15.5):

    reference image (uint8 RGB) ─► letterbox to the video's H×W (black bars)   `letterbox`
        ─► x / 127.5 - 1, float64 then cast                                    `to_pixels`
        ─► bicubic stretch to 224×224 (no crop, no antialias), x*0.5+0.5,
           CLIP mean/std, all in fp32                                          `clip_input`
        ─► patch conv ─► [cls; patches] + pos ─► pre-norm ─► all blocks but the last
           (no post-norm, no head)                                             `CLIPVisual`
        ─► [B, 257, 1280]

The tower is the visual half of the XLM-RoBERTa open-clip checkpoint
(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth). Parameter names are that file's `visual.*`
keys (manifests/clip.json). The module builds only the blocks Animate runs, so the checkpoint's
text tower, logit scale, last block, post-norm and head are unused: `clip_key_filter` names exactly
those keys for the loader's ignore list. `hf_clip_vision_to_official` converts a transformers
CLIPVisionModel state dict (the -Diffusers layout's image_encoder/) to these names.

Known differences from diffusers' WanAnimatePipeline (NOTES §15.5), where this module follows the
official: diffusers runs CLIPImageProcessor on the raw, un-letterboxed image (shortest side to 224,
then a center crop, antialiased resize), whereas the official stretches the letterboxed frame
without antialias (0.23 max abs apart at the CLIP input on the fixture); its weights are laion's
CLIP-ViT-H-14 hidden_states[-2] (believed to be the same tower, not verified against the real files).

Precision: the official runs CLIP with fp16 weights under fp16 autocast, so LayerNorms compute in
fp32 and everything else in fp16 (NOTES §10); casting this module to fp16 reproduces that, fp32 is
the reference path. The preprocessing always runs in fp32, on bf16-rounded pixels in the pipeline
(the official's outer bf16 autocast runs upsample_bicubic2d in fp32).
"""
from __future__ import annotations

import re

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .errors import CheckpointError, MediaError, ValidationError


# ---------------------------------------------------------------------------------------------
# Modules (parameter names follow the official checkpoint's visual.* keys)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weight/activation dtype, result in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        qkv = self.to_qkv(x).view(b, length, 3, self.num_heads, -1)        # [B, L, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                    # 3 x [B, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v)                     # scale 1/sqrt(D)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))      # [B, L, dim]


class CLIPBlock(nn.Module):
    """Pre-norm transformer block; `mlp` is a Sequential so its keys are mlp.0 / mlp.2."""

    def __init__(self, dim: int, mlp_hidden: int, num_heads: int, eps: float):
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps=eps)
        self.attn = CLIPAttention(dim, num_heads)
        self.norm2 = LayerNorm32(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTower(nn.Module):
    """Embeddings, pre-norm and the first `num_blocks` transformer blocks of the ViT."""

    def __init__(self, config: CLIPConfig, num_blocks: int):
        super().__init__()
        dim = config.dim
        grid = config.image_size // config.patch_size
        # pre-norm ViTs have no patch bias (the LayerNorm right after would cancel a constant)
        self.patch_embedding = nn.Conv2d(3, dim, config.patch_size, stride=config.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.pre_norm = LayerNorm32(dim, eps=config.eps)
        hidden = int(dim * config.mlp_ratio)
        self.transformer = nn.ModuleList(
            CLIPBlock(dim, hidden, config.num_heads, config.eps) for _ in range(num_blocks))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [B, dim, g, g]
        x = x.flatten(2).transpose(1, 2)                                      # [B, g*g, dim]
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)                  # [B, 1, dim]
        x = torch.cat([cls, x], dim=1) + self.pos_embedding                  # [B, 1+g*g, dim]
        x = self.pre_norm(x)
        for block in self.transformer:
            x = block(x)
        return x


class CLIPVisual(nn.Module):
    """The CLIP image features Animate uses: [B, 3, 224, 224] normalised pixels -> [B, 257, dim],
    the output of block num_layers-2 (block 31 of 32 at ViT-H, 1-based), no post-norm, no head.

    Only num_layers-1 blocks are built. Keys: `visual.*` as in the official checkpoint.
    Output dtype = the module's dtype (fp16 for the official precision).
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        if config.num_layers < 1:
            raise ValidationError(f"CLIP num_layers must be >= 1 (got {config.num_layers})")
        if config.dim % config.num_heads:
            raise ValidationError(f"CLIP dim {config.dim} is not divisible by num_heads {config.num_heads}")
        if config.image_size % config.patch_size:
            raise ValidationError(
                f"CLIP image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        if int(config.dim * config.mlp_ratio) < 1:
            raise ValidationError(f"CLIP mlp_ratio {config.mlp_ratio} leaves no MLP width at dim {config.dim}")
        self.config = config
        self.visual = VisionTower(config, config.num_layers - 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValidationError(
                f"CLIP expects normalised pixels [B, 3, {size}, {size}] (see clip_input); "
                f"got {tuple(pixels.shape)}")
        return self.visual(pixels)


# ---------------------------------------------------------------------------------------------
# Checkpoint keys

# Keys of the official CLIP checkpoint that Animate never reads (besides the last block, whose
# index depends on the layer count): the XLM-R text tower, the contrastive logit scale, and the
# visual post-norm and projection head (Animate takes block features before them).
CLIP_UNUSED_KEY_PATTERNS: tuple[str, ...] = (
    r"textual\..*",
    r"log_scale",
    r"visual\.post_norm\.(weight|bias)",
    r"visual\.head",
)


def clip_key_filter(key: str, num_layers: int = 32) -> bool:
    """True if CLIPVisual consumes this official checkpoint key; False only for the documented
    unused keys (CLIP_UNUSED_KEY_PATTERNS and visual.transformer.<num_layers-1>.*).

    Unknown keys return True so that a strict load still reports them as unexpected.
    """
    if any(re.fullmatch(p, key) for p in CLIP_UNUSED_KEY_PATTERNS):
        return False
    return not key.startswith(f"visual.transformer.{num_layers - 1}.")


def hf_clip_vision_to_official(state_dict: dict[str, torch.Tensor],
                               num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """transformers CLIPVisionModel keys -> official `visual.*` keys, for CLIPVisual.

    Separate q/k/v projections are concatenated into to_qkv (q, k, v order, as the official's
    view(..., 3, heads, head_dim) splits it); the class embedding and the position table gain the
    official's leading singleton dims. The last layer and post_layernorm are dropped when
    num_layers (the tower's layer count) is given; otherwise they are kept under official names.
    Raises CheckpointError on an unknown key or an incomplete q/k/v triple.
    """
    per_layer = {
        "layer_norm1": "norm1", "layer_norm2": "norm2",
        "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        # checkpoints on disk prefix every key with vision_model.; transformers 5 state dicts do not
        name = key[len("vision_model."):] if key.startswith("vision_model.") else key
        if name == "embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif name == "embeddings.patch_embedding.weight":
            out["visual.patch_embedding.weight"] = value
        elif name.startswith("pre_layrnorm."):
            out["visual.pre_norm." + name.split(".", 1)[1]] = value
        elif name.startswith("post_layernorm."):
            out["visual.post_norm." + name.split(".", 1)[1]] = value
        elif name in ("embeddings.position_ids", "visual_projection.weight"):
            # an index buffer; the projection head of CLIPVisionModelWithProjection (unused, like
            # the official visual.head)
            continue
        elif name.startswith("encoder.layers."):
            index, rest = name[len("encoder.layers."):].split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((index, param), {})[module[-6]] = value
            elif module in per_layer:
                out[f"visual.transformer.{index}.{per_layer[module]}.{param}"] = value
            else:
                raise CheckpointError(f"unknown CLIPVisionModel key {key!r}")
        else:
            raise CheckpointError(f"unknown CLIPVisionModel key {key!r}")
    for (index, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"layer {index} {param}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"visual.transformer.{index}.attn.to_qkv.{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    if num_layers is not None:
        out = {k: v for k, v in out.items() if clip_key_filter(k, num_layers)}
    return out


# ---------------------------------------------------------------------------------------------
# Preprocessing


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit an HxWx3 uint8 RGB image into height x width with black bars (official padding_resize).

    The side that limits the fit is scaled to the target; the other becomes int(target * ratio)
    (truncated, not rounded), resized with cv2 INTER_LINEAR and pasted at offset
    int((target - size) / 2). Bit-identical to the official output.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MediaError(
            "reference image must be a uint8 H x W x 3 RGB array; got "
            f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    if height < 1 or width < 1:
        raise ValidationError(f"letterbox size must be positive (got {height}x{width})")
    src_h, src_w = image.shape[:2]
    if src_h < 1 or src_w < 1:
        raise MediaError(f"reference image is empty ({src_h}x{src_w})")
    out = np.zeros((height, width, 3), dtype=np.uint8)
    if src_h / src_w > height / width:
        new_w = int(height / src_h * src_w)
        if new_w < 1:
            raise MediaError(f"reference image {src_w}x{src_h} is too narrow to fit {width}x{height}")
        resized = cv2.resize(image, (new_w, height), interpolation=cv2.INTER_LINEAR)
        left = int((width - new_w) / 2)
        out[:, left:left + new_w] = resized
    else:
        new_h = int(width / src_w * src_h)
        if new_h < 1:
            raise MediaError(f"reference image {src_w}x{src_h} is too flat to fit {width}x{height}")
        resized = cv2.resize(image, (width, new_h), interpolation=cv2.INTER_LINEAR)
        top = int((height - new_h) / 2)
        out[top:top + new_h] = resized
    return out


def to_pixels(image: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [H, W, 3] (or [N, H, W, 3]) -> [1 or N, 3, H, W] in [-1, 1]: x / 127.5 - 1 in float64
    as the official computes it, then cast to `dtype` (the pipeline uses bf16)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (3, 4) \
            or image.shape[-1] != 3:
        raise MediaError(f"expected uint8 [H, W, 3] or [N, H, W, 3]; got "
                         f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    x = torch.from_numpy(image.astype(np.float64) / 127.5 - 1)
    if x.ndim == 3:
        x = x.unsqueeze(0)                                                # [1, H, W, 3]
    return x.permute(0, 3, 1, 2).contiguous().to(dtype)                   # [N, 3, H, W]


def clip_input(pixels: torch.Tensor, config: CLIPConfig | None = None) -> torch.Tensor:
    """[B, 3, H, W] pixels in [-1, 1] -> [B, 3, 224, 224] float32 CLIP input.

    A bicubic stretch (align_corners=False, no antialias: neither crop nor aspect preservation),
    then [-1,1] -> [0,1] and CLIP mean/std. Always fp32, whatever the pixel dtype, because the
    official resize runs in fp32 under its bf16 autocast.
    """
    config = config or CLIPConfig()
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValidationError(f"clip_input expects pixels [B, 3, H, W]; got {tuple(pixels.shape)}")
    size = (config.image_size, config.image_size)
    x = F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
